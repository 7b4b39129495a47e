"""Fault injection for subprocess tests. With this folder first on PYTHONPATH (Python imports this file at start-up),
TEST_FAULT="module:attr:process:calls[:kind]" (several joined by ",") changes module.attr (a function or a class's
method) on JAX process `process` once it has been called `calls` times: it raises OSError (ENOSPC for names
containing "save" or "write", else EIO); with kind "empty" it returns [] without calling it (a listing that differs
between processes); with kind "sleep" it waits TEST_FAULT_SLEEP_S seconds (default 60) first (a long piece of work
only that process does, a slow write)."""

import errno
import functools
import importlib
import os
import time

SLEEP_S = float(os.environ.get("TEST_FAULT_SLEEP_S", "60"))


def _inject(spec):
  """Replaces the function `spec` names by its faulty version."""
  module_name, attr, process, calls, *kind = spec.split(":")
  owner_name, _, member = attr.rpartition(".")
  module = importlib.import_module(module_name)
  owner = functools.reduce(getattr, owner_name.split("."), module) if owner_name else module
  original = getattr(owner, member)
  count = [0]

  def faulty(*args, **kwargs):
    import jax  # pylint: disable=g-import-not-at-top  (after jax.distributed.initialize: the process index)

    if jax.process_index() == int(process):
      count[0] += 1
      if count[0] > int(calls):
        if kind == ["empty"]:
          return []
        if kind == ["sleep"]:
          time.sleep(SLEEP_S)
          return original(*args, **kwargs)
        if "save" in member or "write" in member:
          raise OSError(errno.ENOSPC, f"No space left on device (injected into {attr})")
        raise OSError(errno.EIO, f"Input/output error (injected into {attr} on process {process})")
    return original(*args, **kwargs)

  setattr(owner, member, faulty)


for _spec in filter(None, os.environ.get("TEST_FAULT", "").split(",")):
  _inject(_spec)

"""Fault injection for subprocess tests. With this folder first on PYTHONPATH (Python imports this file at start-up),
TEST_FAULT="module:attr:process:calls[:empty]" changes module.attr (a function or a class's method) on JAX process
`process` once it has been called `calls` times: it raises (OSError ENOSPC for names containing "save" or "write",
else RuntimeError), or with ":empty" returns [] without calling it (a listing that differs between processes)."""

import errno
import functools
import importlib
import os

_SPEC = os.environ.get("TEST_FAULT")
if _SPEC:
  _module_name, _attr, _process, _calls, *_kind = _SPEC.split(":")
  _owner_name, _, _member = _attr.rpartition(".")
  _module = importlib.import_module(_module_name)
  _owner = functools.reduce(getattr, _owner_name.split("."), _module) if _owner_name else _module
  _original = getattr(_owner, _member)
  _count = [0]

  def _faulty(*args, **kwargs):
    import jax  # pylint: disable=g-import-not-at-top  (after jax.distributed.initialize: the process index)

    if jax.process_index() == int(_process):
      _count[0] += 1
      if _count[0] > int(_calls):
        if _kind == ["empty"]:
          return []
        if "save" in _member or "write" in _member:
          raise OSError(errno.ENOSPC, f"No space left on device (injected into {_attr})")
        raise RuntimeError(f"injected failure of {_attr} on process {_process}")
    return _original(*args, **kwargs)

  setattr(_owner, _member, _faulty)

"""Test-session setup."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """Subprocesses started by tests share XLA's persistent compilation cache, so each program compiles once."""
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))

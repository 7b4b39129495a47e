"""Test-session setup."""

import importlib.util
import os
import re

import jax
import numpy as np
import pytest

import precision_sim
from ddpm_jax import runtime


def pytest_addoption(parser):
  """--precision-sim=tf32|bf16: float32 matmuls and convolutions at default precision rounded as GPUs / TPUs do."""
  parser.addoption("--precision-sim", choices=sorted(precision_sim.MANTISSA_BITS), default=None,
                   help="simulate accelerator matmul / convolution precision on the CPU (tests/precision_sim.py)")


def pytest_configure(config):
  """Installs the precision simulation the command line asks for, before anything is compiled."""
  simulated = config.getoption("--precision-sim")
  if simulated:
    precision_sim.install(simulated)


def pytest_report_header(config):
  """Says which matmul precision the session runs at."""
  return f"precision-sim: {precision_sim.mode() or 'off (exact float32)'}"


def pytest_runtest_setup(item):
  """Skips a `bitwise` test off the CPU unless XLA's deterministic GPU ops are on: elsewhere two runs of one
  program need not give the same bits (a GPU's atomics and autotuning vary between runs)."""
  if item.get_closest_marker("bitwise") and jax.default_backend() != "cpu" and \
      runtime.DETERMINISTIC_OPS not in os.environ.get("XLA_FLAGS", "").split():
    pytest.skip(f"compares runs bit for bit: on {jax.default_backend()} only with "
                f"XLA_FLAGS={runtime.DETERMINISTIC_OPS}")


def pytest_collection_modifyitems(items):
  """Runs the multi-process and slow tests first: with several workers (-n 2) none of them is left to run alone at
  the end while the other workers idle."""
  items.sort(key=lambda item: not (item.get_closest_marker("multiprocess") or item.get_closest_marker("slow")))


@pytest.fixture(autouse=True)
def quick_compiles(request):
  """On the CPU, compiles a test's programs with most of XLA's optimisations off (jax_disable_most_optimizations:
  half the compile time, slower programs; CONTRIBUTING.md has the numbers): the tests compile much and run little.
  A test marked `optimized` (long loops, or bits compared with a program compiled elsewhere) keeps them. Module and
  session fixtures are set up before this one, so at the default settings; a jitted function already compiled by an
  earlier test keeps that program (the setting is not part of jit's cache key)."""
  if request.node.get_closest_marker("optimized") or jax.default_backend() != "cpu":
    yield
    return
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """This process, the other pytest-xdist workers and the subprocesses started by tests share XLA's persistent
  compilation cache, so each program compiles once."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # xdist: every worker's base folder sits in one shared by all of them
    root = root.parent
  path = str(root / "xla_cache")
  os.makedirs(path, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  jax.config.update("jax_compilation_cache_dir", path)


@pytest.fixture(scope="session")
def inception_variables():
  """FID Inception-v3 variables with He-initialised kernels and identity batch norms (activations keep their scale)."""
  from ddpm_jax import inception  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)

  def leaf(path, spec):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(spec.shape[:-1])), spec.shape).astype(np.float32)
    return (np.ones if name in ("scale", "var") else np.zeros)(spec.shape, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, inception.template())


@pytest.fixture(scope="session")
def inception_weights(inception_variables, tmp_path_factory):
  """A weight file of inception_variables, as tools/convert_inception_weights.py writes it."""
  from ddpm_jax import inception  # pylint: disable=g-import-not-at-top

  path = str(tmp_path_factory.mktemp("inception") / "inception.msgpack")
  inception.save_variables(inception_variables, path)
  return path


@pytest.fixture(scope="session")
def imported_tensorflow():
  """stderr of `python -X importtime ...` -> the TensorFlow modules it lists as imported."""
  return lambda stderr: re.findall(r"\|\s+(tensorflow(?:\.\S+)?)$", stderr, flags=re.MULTILINE)


@pytest.fixture
def emulator(monkeypatch):
  """A Cloud Storage emulator's environment (tests/gcs_emulator.py; also set in this process); skipped when the
  emulator cannot run here."""
  pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed (requirements-dev.txt)")
  if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gcsfs is not installed (gs:// workdirs need it: requirements-dev.txt)")
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  port = gcs_emulator.free_port()
  try:
    server = gcs_emulator.start(port)
  except OSError as e:
    pytest.skip(f"the Cloud Storage emulator cannot start on 127.0.0.1:{port}: {e}")
  env = gcs_emulator.environment(port)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  import gcsfs  # pylint: disable=g-import-not-at-top  # after the environment, which it reads on import

  gcsfs.GCSFileSystem.clear_instance_cache()  # one made for an earlier test's emulator would call its port
  yield env
  server.stop()

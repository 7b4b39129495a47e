"""The package's shape: one module reads configs, imports flow one way, configs are plain data."""

import ast
import dataclasses
import pathlib

from configs import common
from ddpm_jax.unet import UNet
from helpers import ROOT


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module a file imports, anywhere in it (top level or inside functions)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def library_graph() -> dict[str, set[str]]:
  """ddpm_jax module -> the ddpm_jax modules it imports."""
  modules = {p.stem: p for p in (ROOT / "ddpm_jax").glob("*.py") if p.stem != "__init__"}
  return {name: {m.split(".")[1] for m in imported_modules(path) if m.startswith("ddpm_jax.")} & set(modules)
          for name, path in modules.items()}


def test_only_the_config_edge_reads_configs():
  readers = sorted(p.stem for p in (ROOT / "ddpm_jax").glob("*.py")
                   if any(m.split(".")[0] == "ml_collections" for m in imported_modules(p)))
  assert readers == ["builders"]


def test_library_imports_form_no_cycle():
  graph = library_graph()
  state: dict[str, str] = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      assert state.get(nxt) != "open", " -> ".join(path + [nxt])
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert "training" not in graph["train_state"] and "sampling" not in graph["images"]


def test_configs_import_nothing_from_the_library():
  for path in (ROOT / "configs").glob("*.py"):
    assert not any(m.startswith("ddpm_jax") for m in imported_modules(path)), path.name


def test_the_config_model_section_lists_every_unet_field():
  fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
  assert set(common.model("tiny")) - {"preset"} == fields

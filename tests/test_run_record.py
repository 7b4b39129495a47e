"""The run record (runs.jsonl): what a row says, the deterministic switch, which start a checkpoint came from."""

import hashlib
import os
import textwrap

import jax
import numpy as np
import pytest

from ddpm_jax import data, run_record, runtime
from helpers import git, run_python, xla_flags


def test_deterministic_sets_xla_flags_and_float32_precision_before_the_backend_and_the_row_says_so():
  code = textwrap.dedent("""
      import json, os
      from ddpm_jax import run_record, runtime
      runtime.make_deterministic()
      import jax, jax.numpy as jnp
      jnp.ones(2).sum().block_until_ready()  # the backend starts with the flag (an unknown one would abort)
      row = run_record.describe(config={}, dataset=None, parallelism="single", command=[])
      print(json.dumps([os.environ["XLA_FLAGS"], row["deterministic"], row["xla_flags"],
                        row["jax_settings"]["jax_default_matmul_precision"]]))
  """)
  out = run_python("-c", code, devices=2, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  given = xla_flags(2)  # the user's flags kept, the deterministic one added once
  flags = given if runtime.DETERMINISTIC_OPS in given.split() else f"{given} {runtime.DETERMINISTIC_OPS}"
  assert out.stdout.strip() == f'["{flags}", true, "{flags}", "float32"]'


def test_deterministic_after_the_backend_started_is_refused():
  jax.devices()
  with pytest.raises(RuntimeError, match="before JAX starts its backends"):
    runtime.make_deterministic()
  assert runtime.DETERMINISTIC_OPS not in os.environ.get("XLA_FLAGS", "")


def test_the_row_records_the_matmul_precision_in_force(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", runtime.DETERMINISTIC_OPS)
  assert not runtime.is_deterministic()  # the flag alone: TF32 would still round the matmuls
  with jax.default_matmul_precision("float32"):
    assert runtime.is_deterministic()
  with jax.default_matmul_precision("bfloat16"):
    assert run_record.jax_settings()["jax_default_matmul_precision"] == "bfloat16"


def test_code_version_of_a_checkout_clean_and_dirty_and_of_no_checkout(tmp_path):
  assert run_record.code_version(str(tmp_path)) is None
  repo = tmp_path / "repo"
  repo.mkdir()
  git("init", "-q", cwd=repo)
  (repo / "a.py").write_text("x = 1\n")
  git("add", "a.py", cwd=repo)
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a", cwd=repo)
  head = git("rev-parse", "HEAD", cwd=repo)
  assert len(head) == 40 and run_record.code_version(str(repo)) == {"commit": head, "dirty": False}
  (repo / "b.py").write_text("y = 2\n")  # an untracked file changes what runs too
  assert run_record.code_version(str(repo)) == {"commit": head, "dirty": True}


def test_a_folder_is_named_by_the_hash_of_its_sorted_listing(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for name in ("b/2.png", "a/1.png", "a/0.png"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
  listing = hashlib.sha256(b"a/0.png\na/1.png\nb/2.png").hexdigest()
  assert data.folder_source(str(tmp_path)).identity == {"name": f"folder:{tmp_path}", "files": 3,
                                                        "listing_sha256": listing}
  os.rename(tmp_path / "b" / "2.png", tmp_path / "b" / "3.png")
  assert data.folder_source(str(tmp_path)).identity["listing_sha256"] != listing


def test_a_checkpoint_comes_from_the_last_start_before_its_step():
  rows = [{"run_id": "a", "resumed_from": None}, {"run_id": "b", "resumed_from": 6},
          {"run_id": "c", "resumed_from": 12}]  # c resumed at 12 and trained no further
  assert [run_record.run_of_step(rows, s)["run_id"] for s in (1, 6, 7, 12)] == ["a", "a", "b", "b"]
  assert run_record.run_of_step(rows, 13)["run_id"] == "c"
  assert run_record.run_of_step([], 5) is None


def test_rows_are_appended_and_a_torn_last_line_is_left_out(tmp_path):
  first = run_record.append(str(tmp_path), {"run_id": "a"}, None)
  run_record.append(str(tmp_path), {"run_id": "b"}, 6)
  with open(tmp_path / run_record.RUNS, "a") as f:
    f.write('{"run_id": "c", "resu')  # a start killed mid-write
  rows = run_record.read(str(tmp_path))
  assert [(r["run_id"], r["resumed_from"]) for r in rows] == [("a", None), ("b", 6)] and rows[0] == first

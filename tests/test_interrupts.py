"""SIGINT / SIGTERM during train.py's start-up and first compile: one line, exit 128 + N within seconds, no traceback,
the workdir given back (no lock held, no empty folder); a Ctrl-C to the whole job (input workers included) during
training: one line. More of training: test_training; sampling: test_sample_cli."""

import glob
import os
import pathlib
import signal
import time

import numpy as np
import pytest
from PIL import Image

from helpers import run_train, stop


def wait_for(predicate, proc, seconds=240):
  """Polls until predicate() holds (the process still running)."""
  deadline = time.time() + seconds
  while not predicate():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)


def test_sigint_during_start_up_ends_at_once_with_one_line_and_writes_nothing(tmp_path):
  proc = run_train(tmp_path / "run", "--stop_at_step=5", background=True)
  time.sleep(1.0)  # importing JAX and the package takes longer
  seconds, lines = stop(proc)
  assert proc.returncode == 130 and seconds < 5, (proc.returncode, seconds)
  assert len(lines) == 1 and lines[0].startswith("train.py: stopped by SIGINT"), lines
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # 10 s here on an idle machine, 25 s on a loaded one
def test_sigint_during_the_first_compile_abandons_it_and_gives_the_workdir_back(tmp_path):
  run = tmp_path / "run"
  # No compilation cache: the train step compiles for seconds (a minute on a loaded machine).
  proc = run_train(run, "--stop_at_step=5", "--compilation_cache=", background=True)
  wait_for(lambda: (run / "tensorboard").exists(), proc)  # the metric writer: made just before the first step
  time.sleep(0.5)
  seconds, lines = stop(proc)
  assert proc.returncode == 130 and seconds < 5, (proc.returncode, seconds)
  assert lines == ["train.py: stopped by SIGINT; kept: no checkpoint"]
  assert (run / "train.lock").read_text() == ""  # released (a lock holds its holder's pid and host)
  assert not (run / "checkpoints").exists()  # made empty at start, removed
  assert (run / "metrics.jsonl").read_text() == ""  # the first step never ended


def worker_pids(pid):
  """The pids of process pid's spawned worker processes (children of any of its threads; Linux)."""
  pids = []
  for children in glob.glob(f"/proc/{pid}/task/*/children"):
    with open(children, encoding="ascii") as f:
      pids += [int(p) for p in f.read().split()]
  return [p for p in pids if "spawn_main" in pathlib.Path(f"/proc/{p}/cmdline").read_text(errors="replace")]


def test_ctrl_c_to_the_whole_job_prints_one_line_not_one_per_input_worker(tmp_path):
  # A terminal's Ctrl-C reaches every process of the job: train.py and the worker processes decoding a folder.
  images = tmp_path / "images"
  images.mkdir()
  for i in range(32):
    Image.fromarray(np.full((16, 16), i * 8, np.uint8)).save(images / f"{i:02d}.png")  # resized: decoded by workers
  run = tmp_path / "run"
  proc = run_train(run, f"--config.dataset=folder:{images}", "--config.data.worker_count=2", background=True,
                   new_session=True)
  # both workers have started, and batches have come out of them (a logged row: steps ran)
  wait_for(lambda: len(worker_pids(proc.pid)) >= 2 and (run / "metrics.jsonl").exists()
           and (run / "metrics.jsonl").read_text(), proc, 120)
  os.killpg(proc.pid, signal.SIGINT)
  _, err = proc.communicate(timeout=60)  # no worker outlives it holding its output open
  stops = [line for line in err.splitlines() if line.startswith("train.py: stopped by")]
  assert proc.returncode == 130 and len(stops) == 1, (proc.returncode, stops, err[-3000:])

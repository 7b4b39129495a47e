"""A gs:// workdir, against a local Cloud Storage emulator: train, resume, sample, train as two processes; what lands
in the bucket."""

import json

import pytest

from helpers import MODEL, run_sample, run_train, run_two

pytestmark = [pytest.mark.gcs, pytest.mark.slow]
FLAGS = ["--config.sample.num_steps=4", "--config.sample.num_samples=4"]  # the end-of-run grid: 4 samples, 4 steps


def bucket_objects(prefix):
  """name -> bytes of every object under prefix in the emulator's bucket (STORAGE_EMULATOR_HOST)."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  client = storage.Client(project="test")
  return {b.name: b.download_as_bytes() for b in client.list_blobs("bucket", prefix=prefix)}


def test_a_gs_workdir_trains_resumes_and_samples(emulator, tmp_path):
  from ddpm_jax import preflight  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=r"workdir 'gs://nobucket/run' cannot be written .*bucket exists"):
    preflight.check_workdir("gs://nobucket/run")
  first = run_train("gs://bucket/run", "--stop_at_step=6", *FLAGS, env_extra=emulator)
  assert first.returncode == 0, first.stderr[-2000:]
  second = run_train("gs://bucket/run", "--stop_at_step=12", *FLAGS, env_extra=emulator)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed from the checkpoint of step 6" in second.stderr
  out = tmp_path / "s.png"
  sampled = run_sample("--workdir=gs://bucket/run", "--num_samples=2", f"--out={out}")
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  assert "sampling 2 images in batches of 2 at step 12" in sampled.stdout and out.exists()
  made = json.loads((tmp_path / "s.json").read_text())  # beside the samples: which checkpoint, which start

  objects = bucket_objects("run/")
  names = set(objects)
  for step in (6, 12):
    assert f"run/checkpoints/{step}/commit_success.txt" in names
    assert f"run/samples/step_{step:08d}.png" in names
  rows = [json.loads(line) for line in objects["run/metrics.jsonl"].decode().splitlines()]
  assert [row["step"] for row in rows] == [5, 6, 10, 12]  # the resumed run continued it: no row lost or repeated
  assert json.loads(objects["run/config.json"])["batch_size"] == 16
  runs = [json.loads(line) for line in objects["run/runs.jsonl"].decode().splitlines()]
  assert [run["resumed_from"] for run in runs] == [None, 6]  # appended to in the bucket: one row per start
  assert made["checkpoint_step"] == 12 and made["run"]["run_id"] == runs[1]["run_id"]
  assert json.loads(objects["run/end_of_run.json"]) == {"step": 12, "done": ["samples", "curves.png"]}
  assert objects["run/curves.png"].startswith(b"\x89PNG")
  assert len([n for n in names if n.startswith("run/tensorboard/events.out.tfevents.")]) == 2  # one per run
  assert "run/train.lock" not in names  # released
  assert not [n for n in names if n.startswith("run/.write_check")]  # the probe removed


@pytest.mark.multiprocess
def test_two_processes_train_in_a_gs_workdir(emulator):
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  # the flags of test_multiprocess (their compiled programs shared) but for the stop: saves at steps 5 and 6; no
  # sample grid (a compile of its own)
  ends = run_two("gs://bucket/two", "--stop_at_step=6", "--config.checkpoint_every_steps=5",
                 "--config.parallelism=fsdp", *MODEL, "--config.sample.every_steps=0")
  assert [code for code, _, _ in ends] == [0, 0], [err[-2000:] for _, err, _ in ends]
  names = set(bucket_objects("two/"))
  for step in (5, 6):
    assert f"two/checkpoints/{step}/commit_success.txt" in names
  assert [json.loads(line)["step"] for line in bucket_objects("two/metrics.jsonl")["two/metrics.jsonl"].splitlines()
          ] == [5, 6]
  assert "two/train.lock" not in names and not [n for n in names if n.startswith("two/.write_check")]
  assert len([n for n in gcs_emulator.uploads() if n.startswith("two/.write_check")]) == 1  # process 0's probe alone

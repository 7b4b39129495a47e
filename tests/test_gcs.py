"""A gs:// workdir, against a local Cloud Storage emulator: train, resume, sample; what lands in the bucket."""

import json

import pytest

from helpers import run_sample, run_train

pytestmark = [pytest.mark.gcs, pytest.mark.slow]
FLAGS = ["--config.sample.num_steps=4", "--config.sample.num_samples=4"]  # the end-of-run grid: 4 samples, 4 steps


@pytest.fixture
def emulator(monkeypatch):
  """The emulator's environment (also set in this process); skipped when the emulator cannot run here."""
  pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed (requirements-dev.txt)")
  pytest.importorskip("gcsfs", reason="gcsfs is not installed (gs:// workdirs need it: requirements-dev.txt)")
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  port = gcs_emulator.free_port()
  try:
    server = gcs_emulator.start(port)
  except OSError as e:
    pytest.skip(f"the Cloud Storage emulator cannot start on 127.0.0.1:{port}: {e}")
  env = gcs_emulator.environment(port)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  yield env
  server.stop()


def bucket_objects(prefix):
  """name -> bytes of every object under prefix in the emulator's bucket (STORAGE_EMULATOR_HOST)."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  client = storage.Client(project="test")
  return {b.name: b.download_as_bytes() for b in client.list_blobs("bucket", prefix=prefix)}


def test_a_gs_workdir_trains_resumes_and_samples(emulator, tmp_path):
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=r"workdir 'gs://nobucket/run' cannot be written .*bucket exists"):
    builders.check_workdir("gs://nobucket/run")
  first = run_train("gs://bucket/run", "--stop_at_step=6", *FLAGS, env_extra=emulator)
  assert first.returncode == 0, first.stderr[-2000:]
  second = run_train("gs://bucket/run", "--stop_at_step=12", *FLAGS, env_extra=emulator)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed from the checkpoint of step 6" in second.stderr
  out = tmp_path / "s.png"
  sampled = run_sample("--workdir=gs://bucket/run", "--num_samples=2", f"--out={out}")
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  assert "sampling 2 images at step 12" in sampled.stdout and out.exists()

  objects = bucket_objects("run/")
  names = set(objects)
  for step in (6, 12):
    assert f"run/checkpoints/{step}/commit_success.txt" in names
    assert f"run/samples/step_{step:08d}.png" in names
  rows = [json.loads(line) for line in objects["run/metrics.jsonl"].decode().splitlines()]
  assert [row["step"] for row in rows] == [5, 6, 10, 12]  # the resumed run continued it: no row lost or repeated
  assert json.loads(objects["run/config.json"])["batch_size"] == 16
  assert json.loads(objects["run/end_of_run.json"]) == {"step": 12, "done": ["samples", "curves.png"]}
  assert objects["run/curves.png"].startswith(b"\x89PNG")
  assert len([n for n in names if n.startswith("run/tensorboard/events.out.tfevents.")]) == 2  # one per run
  assert "run/train.lock" not in names and "run/.write_check" not in names  # released; the probe removed

"""A gs:// workdir's parts, in this process against the Cloud Storage emulator (which enforces generation
preconditions): the lock (one start of several wins, a stale lock is taken over and a live one is not whatever this
host's clock says, a run that loses its lock stops at once), the start's probe, uncommitted step folders, the bytes
the metrics upload, the W&B run id."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from helpers import python_path

pytestmark = pytest.mark.gcs
WORKDIR = "gs://bucket/run"
LOCK = "run/train.lock"


def blob(name):
  """The emulator's object `name` (STORAGE_EMULATOR_HOST)."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  return storage.Client(project="test").bucket("bucket").blob(name)


def write_lock(record, age_s=0.0):
  """Writes the lock object as a run with `record` did `age_s` seconds ago on the emulator's clock."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  gcs_emulator.shift_clock(-age_s)
  try:
    blob(LOCK).upload_from_string(json.dumps(record))
  finally:
    gcs_emulator.shift_clock(0.0)


def holder():
  """The lock object's record, or None when there is none."""
  lock = blob(LOCK)
  return json.loads(lock.download_as_bytes()) if lock.exists() else None


def race(n):
  """n threads constructing a BucketLock at once -> (the locks they got, the errors they met)."""
  from ddpm_jax import workdir_lock  # pylint: disable=g-import-not-at-top

  start, won, lost = threading.Barrier(n), [], []

  def attempt():
    start.wait()
    try:
      won.append(workdir_lock.BucketLock(WORKDIR))
    except workdir_lock.WorkdirBusy as e:
      lost.append(e)

  threads = [threading.Thread(target=attempt) for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return won, lost


@pytest.mark.parametrize("before", ["no lock", "a stale lock"])
def test_of_starts_racing_for_a_workdir_exactly_one_wins(emulator, before):
  from ddpm_jax import workdir_lock  # pylint: disable=g-import-not-at-top

  if before == "a stale lock":  # a run killed with -9 left it LEASE_S + 30 s ago
    write_lock({"pid": 1, "host": "dead", "since": "then"}, age_s=workdir_lock.LEASE_S + 30)
  won, lost = race(3)
  try:
    assert len(won) == 1 and len(lost) == 2, (won, lost)
    assert holder()["token"] == json.loads(won[0]._record)["token"]  # pylint: disable=protected-access
    assert all("is in use by another run" in str(e) for e in lost)
  finally:
    for lock in won:
      lock.release()
  assert holder() is None


def test_a_live_lock_is_kept_and_a_stale_one_taken_over_when_the_services_clock_is_an_hour_behind(emulator):
  from ddpm_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  write_lock({"pid": 1, "host": "dead", "since": "then"}, age_s=3600 + workdir_lock.LEASE_S + 30)
  gcs_emulator.shift_clock(-3600)  # every time the service stamps or sends is an hour behind this host's clock
  first = workdir_lock.BucketLock(WORKDIR)  # took the stale lock over: LEASE_S + 30 s old on the service's clock
  try:
    with pytest.raises(workdir_lock.WorkdirBusy, match=rf"pid {os.getpid()} on host .*, lock renewed [01] s ago"):
      workdir_lock.BucketLock(WORKDIR)  # a live lock: a second old on the service's clock, an hour by this host's
  finally:
    first.release()
  assert holder() is None


def test_a_start_whose_stale_lock_vanishes_while_it_looks_creates_it(emulator, monkeypatch):
  from ddpm_jax import workdir_lock  # pylint: disable=g-import-not-at-top

  write_lock({"pid": 1, "host": "ending", "since": "then"})
  read = workdir_lock.BucketLock._read  # pylint: disable=protected-access

  def read_after_its_run_removed_it(self):
    blob(LOCK).delete()  # the holder ended between this start's create and its read
    return read(self)

  monkeypatch.setattr(workdir_lock.BucketLock, "_read", read_after_its_run_removed_it)
  lock = workdir_lock.BucketLock(WORKDIR)
  assert holder()["pid"] == os.getpid()
  lock.release()
  assert holder() is None


def test_release_waits_for_a_renewal_in_flight_and_removes_the_lock(emulator, monkeypatch):
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  from ddpm_jax import workdir_lock  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(workdir_lock, "RENEW_S", 0.05)
  lock = workdir_lock.BucketLock(WORKDIR)
  upload, renewing = storage.Blob.upload_from_string, threading.Event()

  def slow_answer(self, *args, **kwargs):
    upload(self, *args, **kwargs)  # written: a new generation
    renewing.set()
    time.sleep(0.5)  # its answer slow to come back

  monkeypatch.setattr(storage.Blob, "upload_from_string", slow_answer)
  assert renewing.wait(10)
  lock.release()
  assert holder() is None


def test_the_lease_outlasts_the_time_a_holder_takes_to_notice_and_stop():
  from ddpm_jax import consensus, workdir_lock  # pylint: disable=g-import-not-at-top

  # the latest a holder ends after its last renewal: STOP_S, one more wait and renewal (a write, then a read of the
  # lock, each up to REQUEST_TIMEOUT_S), then the wait for the other processes; a takeover comes LEASE_S after it
  latest = workdir_lock.STOP_S + workdir_lock.RENEW_S + 2 * workdir_lock.REQUEST_TIMEOUT_S + consensus.LEAVE_WAIT_S
  assert latest <= workdir_lock.LEASE_S / 2, latest  # half of the lease left for slow storage and process exit


HOLD = """import sys, time
from ddpm_jax import workdir_lock
workdir_lock.RENEW_S, workdir_lock.STOP_S = 0.1, float(sys.argv[1])
workdir_lock.acquire("gs://bucket/run")
print("held", flush=True)
time.sleep(30)
"""


def hold(tmp_path, stop_s):
  """A process (hold.py) that takes the workdir's lock and renews it every 0.1 s, ending when no renewal succeeded
  for stop_s; returns once it holds the lock."""
  script = tmp_path / "hold.py"
  script.write_text(HOLD)
  proc = subprocess.Popen([sys.executable, str(script), str(stop_s)], env=dict(os.environ, PYTHONPATH=python_path()),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "held\n", proc.communicate(timeout=30)
  return proc


def test_a_run_whose_lock_is_taken_over_stops_at_once_with_one_line(emulator, tmp_path):
  proc = hold(tmp_path, stop_s=60.0)
  write_lock({"pid": 7, "host": "newcomer", "since": "now"})  # another start took the lock over
  taken = time.monotonic()
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 1 and time.monotonic() - taken < 5, (proc.returncode, err)
  assert err.strip().splitlines()[-1].startswith(
      "hold.py: error: lost the lock of workdir 'gs://bucket/run': it was taken over by pid 7 on host newcomer, "
      "running since now; stopped at once"), err
  assert "Traceback" not in err
  assert holder()["host"] == "newcomer"  # the newcomer's lock is left alone


def test_a_run_whose_renewals_fail_stops_before_its_lock_can_be_taken_over(emulator, tmp_path):
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  port = gcs_emulator.free_port()  # an emulator of its own, stopped under the holder's feet
  server = gcs_emulator.start(port)
  os.environ.update(gcs_emulator.environment(port))
  try:
    proc = hold(tmp_path, stop_s=1.0)
  finally:
    server.stop()
  away = time.monotonic()
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 1 and time.monotonic() - away < 5, (proc.returncode, err)
  assert err.strip().splitlines()[-1].startswith(
      "hold.py: error: lost the lock of workdir 'gs://bucket/run': no renewal of it succeeded for 1 s"), err


class ProcessZerosAnswer:
  """The coordination service's client as process 1 of 2 sees it: every decision is the scripted answer of
  process 0."""

  def __init__(self, answer):
    self.answer, self.asked = json.dumps(answer), []

  def blocking_key_value_get(self, key, timeout_ms):
    self.asked.append(key)
    return self.answer


def test_a_bucket_is_probed_by_process_zero_alone_the_others_take_its_answer(emulator, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import consensus, preflight  # pylint: disable=g-import-not-at-top
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  sent = gcs_emulator.bytes_received()
  yes = ProcessZerosAnswer({"value": None})
  monkeypatch.setattr(consensus, "_client", lambda: yes)
  preflight.check_workdir("gs://nobucket/run")  # no such bucket: only process 0's answer lets it pass
  no = ProcessZerosAnswer({"error": consensus.describe(ValueError("workdir 'gs://bucket/run' cannot be written"))})
  monkeypatch.setattr(consensus, "_client", lambda: no)
  with pytest.raises(ValueError, match=r"^workdir 'gs://bucket/run' cannot be written$"):
    preflight.check_workdir("gs://bucket/run")
  assert len(yes.asked) == 1 and len(no.asked) == 1
  assert gcs_emulator.bytes_received() == sent  # process 1 wrote nothing


def test_two_starts_probing_a_bucket_at_once_both_pass(emulator, monkeypatch):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from ddpm_jax import preflight  # pylint: disable=g-import-not-at-top

  probe_class = type(epath.Path(WORKDIR))
  unlink, others = probe_class.unlink, []

  def unlink_after_another_start_probed(self, *args, **kwargs):
    if not others:  # the second start probes, whole, between this one's write and its delete
      others.append(WORKDIR)
      preflight.check_remote_workdir(WORKDIR)
    return unlink(self, *args, **kwargs)

  monkeypatch.setattr(probe_class, "unlink", unlink_after_another_start_probed)
  preflight.check_remote_workdir(WORKDIR)
  assert others and not [b.name for b in blob(LOCK).bucket.list_blobs(prefix="run/")]  # both probes removed


def test_an_uncommitted_step_folder_in_a_bucket_is_no_checkpoint_and_is_removed(emulator):
  from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top

  for name in ("5/commit_success.txt", "5/params/d/0", "7/params/d/0"):  # step 7: a save cut short, in place
    blob(f"run/checkpoints/{name}").upload_from_string("x")
  folder = checkpoint.checkpoint_dir(WORKDIR)
  assert checkpoint.steps_on_disk(folder) == [5]
  checkpoint.remove_leftovers(folder)
  assert sorted(b.name for b in blob(LOCK).bucket.list_blobs(prefix="run/checkpoints/")) == [
      "run/checkpoints/5/commit_success.txt", "run/checkpoints/5/params/d/0"]


def rows_of(text):
  """metrics.jsonl's text -> its rows."""
  return [json.loads(line) for line in text.splitlines()]


def test_metrics_and_event_files_in_a_bucket_grow_by_what_is_added_at_a_bounded_rate(emulator, tmp_path, monkeypatch):
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from ddpm_jax import reporting, storage  # pylint: disable=g-import-not-at-top
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(storage, "UPLOAD_EVERY_S", 0.0)  # every row uploaded: the most bytes the writer can send
  writer = reporting.MetricWriter(WORKDIR)
  sent = [gcs_emulator.bytes_received()]
  for half in range(2):  # the bytes sent for rows 40..79 are those for rows 0..39: each byte is uploaded once
    for step in range(40 * half, 40 * half + 40):
      writer.write(step, {"loss": 1.0 / (step + 1), "lr": 1e-4})
    sent.append(gcs_emulator.bytes_received())
  first, second = sent[1] - sent[0], sent[2] - sent[1]
  assert 0.9 < second / first < 1.1, (first, second)  # whole rewrites: the second half would cost about 3 times more
  monkeypatch.setattr(storage, "UPLOAD_EVERY_S", 3600.0)
  for step in range(80, 90):  # within the hour since the last upload: nothing sent until close
    writer.write(step, {"loss": 1.0 / (step + 1), "lr": 1e-4})
  assert gcs_emulator.bytes_received() == sent[2]
  writer.flush()  # what the end-of-run curves read: every row
  assert [row["step"] for row in rows_of(blob("run/metrics.jsonl").download_as_text())] == list(range(90))
  writer.close()
  events, = [b for b in blob(LOCK).bucket.list_blobs(prefix="run/tensorboard/")]
  (tmp_path / "events").write_bytes(events.download_as_bytes())
  loss = {e.step: e.summary.value[0].tensor.float_val[0] for e in event_file_loader.EventFileLoader(
      str(tmp_path / "events")).Load() if e.summary.value and e.summary.value[0].tag == "loss"}
  assert sorted(loss) == list(range(90)) and loss[9] == pytest.approx(0.1, rel=1e-6)  # float32 of 1/10


def test_weights_and_biases_keeps_its_run_id_in_a_bucket_workdir(emulator, monkeypatch):
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from ddpm_jax import reporting  # pylint: disable=g-import-not-at-top

  # wandb stands in for the real package (not a dependency; it would call its servers): what the writer hands it
  calls = []
  wandb = types.ModuleType("wandb")
  wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
  wandb.init = lambda **kwargs: calls.append(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                                finish=lambda: None)
  monkeypatch.setitem(sys.modules, "wandb", wandb)
  for start in (0, 5):  # a first run, then its resumption
    reporting.MetricWriter(WORKDIR, start, wandb_project="p", config={"seed": 0}).close()
  assert [c["id"] for c in calls] == [blob("run/wandb_run_id").download_as_text()] * 2
  assert all(c["dir"] is None and c["resume"] == "allow" for c in calls)  # W&B's own files stay local

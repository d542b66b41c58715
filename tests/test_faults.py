"""Faults injected on purpose: damaged checkpoints, a full disk, a read-only or unmounted
workdir, another model's checkpoint. Each is detected or harmless, never silently wrong, and
ends in one line.

To add a fault: damage a copy of `finished` (a small run's workdir), say what must follow.
"""

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax import train
from vit_jax.checkpoints import CheckpointError, Checkpoints, WriteError
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.model_configs import get_model_config
from vit_jax.train_state import create_train_state
from vit_jax.workdir import prepare_workdir

FLIPS_PER_KIND = 20
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))


def small_config(**overrides) -> ExperimentConfig:
  """16 steps of the `testing` ViT on 512 synthetic digits: checkpoints at 8, 12 and 16."""
  fields = dict(model=get_model_config("testing"), batch_size=64, num_epochs=2,
                learning_rate=3e-3, warmup_steps=2, log_every_steps=4, checkpoint_every_steps=4,
                keep_checkpoints=3, eval_batch_size=256, parallel="jit")
  return ExperimentConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def data(digits):
  """512 training digits: 8 steps of 64 an epoch."""
  return {"train": {k: v[:512] for k, v in digits["train"].items()}, "test": digits["test"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
  workdir = tmp_path_factory.mktemp("finished") / "run"
  train.train_and_evaluate(small_config(), workdir, data=data)
  return workdir


def restore(workdir: Path, config: ExperimentConfig | None = None):
  config = config or small_config()
  checkpoints = Checkpoints(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  try:
    return checkpoints.restore_latest(create_train_state(config, total_steps=1))
  finally:
    checkpoints.close()


def same_arrays(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)),
                                                  jax.tree_util.tree_leaves(jax.device_get(b)),
                                                  strict=True))


def file_kinds(workdir: Path, step: int) -> dict[str, list[Path]]:
  """The files of a checkpoint, and its digests, by kind: their path with hashes and numbers
  as '*'."""
  kinds: dict[str, list[Path]] = {}
  files = [p for p in (workdir / "checkpoints" / str(step)).rglob("*") if p.is_file()]
  for path in sorted([*files, workdir / "checkpoint_digests" / f"{step}.json"]):
    if path.stat().st_size:
      kind = re.sub(r"[0-9a-f]{8,}|\d+", "*", str(path.relative_to(workdir)))
      kinds.setdefault(kind, []).append(path)
  return kinds


def flip(path: Path, offset: int, count: int = 8) -> None:
  data = bytearray(path.read_bytes())
  for i in range(offset, min(offset + count, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def outcome(original, workdir: Path) -> str:
  """'harmless' (the latest step, bit-identical) or 'detected' (an older step, the latest set
  aside); anything else fails the test."""
  state = restore(workdir)
  if state is not None and int(state.step) == 16:
    assert same_arrays(state, original), "a damaged checkpoint restored different numbers"
    return "harmless"
  assert state is None or int(state.step) < 16
  assert list((workdir / "checkpoints_unreadable").iterdir())
  return "detected"


@pytest.mark.slow
def test_flipped_or_truncated_bytes_in_every_kind_of_file_are_detected_or_harmless(
    finished, tmp_path):
  original = restore(finished)
  kinds = file_kinds(finished, 16)
  assert any("/d/" in kind for kind in kinds), kinds  # ocdbt's data files are among them
  assert "checkpoint_digests/*.json" in kinds
  rng = np.random.default_rng(0)
  seen = {}
  for kind, paths in kinds.items():
    for trial in range(FLIPS_PER_KIND + 1):  # the last trial truncates instead
      copy = tmp_path / f"copy{len(seen)}"
      shutil.copytree(finished, copy)
      target = copy / paths[rng.integers(len(paths))].relative_to(finished)
      size = target.stat().st_size
      if trial < FLIPS_PER_KIND:
        flip(target, int(rng.integers(size)))
      else:
        target.write_bytes(target.read_bytes()[:size // 2])
      seen[kind, trial] = outcome(original, copy)
      shutil.rmtree(copy)
  # Flips in the arrays' data restore without a word from orbax: only the digests see them.
  data_kinds = [k for k in kinds if "/d/" in k]
  assert any(seen[k, t] == "detected" for k in data_kinds for t in range(FLIPS_PER_KIND))


def test_an_array_changed_where_orbax_cannot_see_is_caught_and_the_previous_checkpoint_resumed(
    finished, tmp_path, data, caplog):
  """Bit rot that decodes cleanly: checkpoint 16 saved again with other numbers, its digests
  kept. (A flipped byte in the compressed files may instead break zstd's framing.)"""
  workdir = shutil.copytree(finished, tmp_path / "run")
  digests, state = workdir / "checkpoint_digests" / "16.json", restore(workdir)
  shutil.rmtree(workdir / "checkpoints" / "16")
  (checkpoints := Checkpoints(workdir)).save(16, state.replace(params={
      **state.params, "cls_token": state.params["cls_token"] + 1.0}), force=True)
  checkpoints.close()
  digests.write_bytes((finished / "checkpoint_digests" / "16.json").read_bytes())
  longer = small_config(num_epochs=3)  # on to step 24, from the checkpoint at 12
  train.train_and_evaluate(longer, workdir, data=data)
  assert re.search(r"checkpoint at step 16 cannot be read \(its array \.params\['cls_token'\] "
                   r"differs from the digest", caplog.text), caplog.text
  # The same as a run that resumed from step 12 of its own accord.
  clean = shutil.copytree(finished, tmp_path / "clean")
  shutil.rmtree(clean / "checkpoints" / "16")
  train.train_and_evaluate(longer, clean, data=data)
  assert same_arrays(restore(workdir, longer), restore(clean, longer))


def test_a_checkpoint_without_digests_still_restores_with_a_warning(finished, tmp_path, caplog):
  workdir = shutil.copytree(finished, tmp_path / "run")
  shutil.rmtree(workdir / "checkpoint_digests")  # as a checkpoint saved before digests
  assert int(restore(workdir).step) == 16
  assert "checkpoint at step 16 has no digests" in caplog.text


def test_another_model_s_checkpoint_is_refused_and_kept(finished, tmp_path):
  workdir = shutil.copytree(finished, tmp_path / "run")
  (workdir / "config.json").unlink()  # nothing else says what model this was
  wider = small_config(model=get_model_config("testing", hidden_size=32))
  with pytest.raises(CheckpointError, match=r"checkpoint at step 16 in \S+ holds another "
                     r"model: its array .params\['cls_token'\] is float32 \(1, 1, 16\), this "
                     r"model's float32 \(1, 1, 32\); use another workdir$"):
    restore(workdir, wider)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [8, 12, 16]


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
  """A tmpfs mounted on `folder` with `options` for the block; yields whether this process
  could mount one (tests then inject the fault another way, or skip)."""
  folder.mkdir(exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                           capture_output=True).returncode == 0
  try:
    yield mounted
  finally:
    if mounted:  # lazily: a file the run left open must not keep the tmpfs mounted
      subprocess.run(["umount", "--lazy", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, kilobytes: int, monkeypatch):
  """A folder on a tmpfs of `kilobytes`, or, where this process may not mount one, a folder
  whose checkpoints fail to write from the third on, as tensorstore reports a full disk.
  Yields a function that frees the disk (a larger tmpfs, or the fault undone)."""
  with tmpfs(folder, f"size={kilobytes}k") as mounted:
    if mounted:
      yield lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(folder)],
                                   check=True)
      return
    real_save, calls = ocp.CheckpointManager.save, []

    def save_until_full(self, step, *args, **kwargs):
      calls.append(step)
      if len(calls) > 2:
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.head/0" in OCDBT database: '
                         "Failed to write 4096 bytes to file 17: No space left on device "
                         "[os_error_code='28']")
      return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
    yield monkeypatch.undo


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(tmp_path, data,
                                                                       monkeypatch):
  config = small_config(num_epochs=20, keep_checkpoints=100)  # about 2 MB of checkpoints
  run = tmp_path / "disk" / "run"
  with small_disk(tmp_path / "disk", 400, monkeypatch) as free:
    with pytest.raises(WriteError) as error:
      train.train_and_evaluate(config, run, data=data)
    message = str(error.value)
    assert "\n" not in message
    # Whichever write finds the disk full first (a checkpoint, the metrics), the line says it.
    found = re.search(r"could not be written.* \(no space left on device\); the latest complete "
                      r"checkpoint (is step (\d+), in \S+|there is none); details in \S+run.log$",
                      message)
    assert found, message
    restored = restore(run, config)
    assert (restored is None) if found.group(2) is None else (
        int(restored.step) == int(found.group(2)))  # intact, and verified
    free()
    result = train.train_and_evaluate(config, run, data=data)  # the same command, with room
    assert result["step"] == 160


def test_a_workdir_on_a_missing_mount_is_refused_and_nothing_is_created():
  missing = Path("/mnt") / "vit_jax-test-not-mounted"
  assert not missing.exists()
  with pytest.raises(ValueError, match=f"{missing} does not exist \\(a filesystem that is not "
                     "mounted\\?\\)"):
    prepare_workdir(missing / "runs" / "a")
  assert not missing.exists()
  prepare_workdir(Path.cwd() / "runs-test-unused" / "a")  # ordinary missing folders are made
  shutil.rmtree(Path.cwd() / "runs-test-unused")


def test_a_read_only_workdir_is_refused(tmp_path, monkeypatch):
  # Root may write through permission bits; a read-only mount refuses even root. Where this
  # process may not mount one, the check itself is made to see a read-only folder.
  with tmpfs(tmp_path / "ro", "ro,size=64k") as mounted:
    if not mounted:
      monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(ValueError, match="is not writable"):
      prepare_workdir(tmp_path / "ro")


@pytest.mark.slow
def test_a_full_disk_under_launch_is_one_error_line_and_no_traceback(tmp_path, tfds_dir):
  from test_cli import launch

  disk = tmp_path / "disk"
  with tmpfs(disk, "size=3m") as mounted:
    if not mounted:
      pytest.skip("cannot mount a small tmpfs here (the in-process test injects the fault)")
    result = launch("--config=experiments/tiny.py", f"--workdir={disk / 'run'}",
                    f"--config.tfds_data_dir={tfds_dir}")
    line = one_error_line(result)
    assert "could not be written" in line and "(no space left on device)" in line
    if line.startswith("error: checkpoint at step"):  # orbax's threads met the full disk first
      assert "Traceback" in (disk / "run" / "run.log").read_text()  # the details are kept
    latest = int(re.search(r"latest complete checkpoint is step (\d+)", line).group(1))
    import tiny

    config = validate(tiny.get_config())
    assert int(restore(disk / "run", config).step) == latest  # intact, and verified


def one_error_line(result) -> str:
  """The single `error:` line of a launch.py run that stopped on a fault, with no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
  assert len(errors) == 1, errors
  return errors[0]


def test_a_read_only_workdir_under_launch_is_one_error_line(tmp_path):
  from test_cli import launch

  folder = tmp_path / "ro"
  with tmpfs(folder, "ro,size=64k") as mounted:
    if not mounted:
      pytest.skip("cannot mount a read-only tmpfs here (the in-process test fakes one)")
    line = one_error_line(launch("--config=experiments/tiny.py", f"--workdir={folder}"))
    assert line == f"error: workdir={str(folder)!r} is not writable"


@pytest.mark.slow
def test_another_model_s_checkpoint_under_launch_is_one_error_line(tmp_path, tfds_dir):
  from test_cli import launch

  run = [f"--workdir={tmp_path / 'run'}", "--config=experiments/tiny.py",
         f"--config.tfds_data_dir={tfds_dir}", "--config.num_epochs=0.25"]
  assert launch(*run).returncode == 0
  (tmp_path / "run" / "config.json").unlink()
  line = one_error_line(launch(*run, "--config.model.hidden_size=32", "--config.num_epochs=0.5"))
  assert re.match(r"error: checkpoint at step 16 in \S+ holds another model: its array "
                  r"\S+ is float32 \(.*64.*\), this model's float32 \(.*32.*\); use another "
                  r"workdir$", line), line
  assert (tmp_path / "run" / "checkpoints" / "16").is_dir()  # kept


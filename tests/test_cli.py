"""launch.py end to end, in subprocesses, as a researcher runs it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import MNIST_IDX_DIR, REPO


def launch(*args, cwd=REPO):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user
  return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def final_metrics(stdout):
  """'test accuracy: 0.9123 (loss 0.2345, step 32)' -> {'accuracy', 'loss', 'step'}."""
  words = stdout.strip().splitlines()[-1].replace(",", " ").replace(")", " ").split()
  assert words[:2] == ["test", "accuracy:"], stdout
  return {"accuracy": float(words[2]), "loss": float(words[4]), "step": int(words[6])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp("cli") / "run"
  common = ["--config=experiments/tiny.py", f"--workdir={workdir}",
            f"--config.tfds_data_dir={tfds_dir}"]
  # Learning is tested in test_train; here a short run is enough.
  result = launch(*common, "--config.train_examples=2048", "--config.num_epochs=2")
  assert result.returncode == 0, result.stderr[-3000:]
  return common, result, workdir


@pytest.mark.slow
def test_train_prints_progress_and_final_accuracy(trained):
  _, result, _ = trained
  assert "step 32/32" in result.stderr  # plain progress lines when not on a terminal
  assert "ETA" in result.stderr
  assert 0.2 < final_metrics(result.stdout)["accuracy"] <= 1.0  # 32 steps: past chance


@pytest.mark.slow
def test_a_second_run_loads_its_compiled_steps_from_the_persistent_cache(tmp_path, tfds_dir):
  cache = tmp_path / "xla_cache"
  common = ["--config=experiments/tiny.py", f"--config.tfds_data_dir={tfds_dir}",
            "--config.train_examples=512", "--config.num_epochs=1",
            f"--compilation_cache_dir={cache}",
            "--cpu_devices=1"]  # one device: jit, whose entries carry the steps' names
  first = launch(*common, f"--workdir={tmp_path / 'first'}")
  assert first.returncode == 0, first.stderr[-3000:]
  def entries():  # name -> last modification: a failed load would recompile and rewrite
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

  written = entries()
  steps = {name.split("-")[0] for name in written}
  assert {"jit_train_steps", "jit__eval_on_indices"} <= steps, sorted(written)
  second = launch(*common, f"--workdir={tmp_path / 'second'}")
  assert second.returncode == 0, second.stderr[-3000:]
  # Every entry the first run wrote was loaded, none rewritten. The second run may add entries:
  # a small function that compiled under the 0.1 s threshold the first time may not the second.
  after = entries()
  assert {name: after.get(name) for name in written} == written
  assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]


@pytest.mark.slow
def test_eval_reports_the_checkpoint(trained):
  common, train_result, _ = trained
  result = launch(*common, "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == train_result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_modes_after_training_take_the_runs_own_config(trained):
  common, train_result, workdir = trained
  result = launch(f"--workdir={workdir}", "--mode=eval")  # tiny.py's run, no --config
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"config: {workdir / 'config.json'}, the run's own" in result.stdout
  assert final_metrics(result.stdout) == final_metrics(train_result.stdout)
  shifted = launch(f"--workdir={workdir}", "--mode=eval", "--config.eval_max_shift=1")
  assert shifted.returncode == 0, shifted.stderr[-3000:]  # --config.x flags change it
  assert "evaluating with eval_max_shift=1" in shifted.stderr
  assert final_metrics(shifted.stdout)["step"] == final_metrics(result.stdout)["step"]
  default = launch(f"--workdir={workdir}", "--mode=eval", "--config=experiments/mnist.py")
  assert default.returncode == 2  # an explicit --config is taken: not this run's model
  assert "holds a run of a different model" in default.stderr


@pytest.mark.slow
def test_a_run_resumed_without_config_goes_on_with_its_own(trained, tmp_path):
  _, train_result, trained_workdir = trained
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)  # the fixture's run stays as it is
  # tiny.py's model and 2,048 images; experiments/mnist.py's model would be refused.
  result = launch(f"--workdir={workdir}", "--config.num_epochs=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"config: {workdir / 'config.json'}, the run's own" in result.stdout
  assert f"resuming {workdir} at step 32" in result.stderr
  assert (f"warning: resuming {workdir} with changed settings: num_epochs (the old ones "
          "appended to config_history.jsonl)") in result.stderr.splitlines()  # no absl prefix
  assert final_metrics(result.stdout)["step"] == 48  # 16 steps of 128 an epoch: 2,048 images
  assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 3


def test_seeds_trained_as_one_are_not_resumed_as_one_run(tmp_path):
  from vit_jax.seeds import SEEDS_FILE

  (tmp_path / SEEDS_FILE).write_text("[0, 1, 2]\n")  # a sweep's group of stacked seeds
  result = launch(f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert (f"error: workdir={str(tmp_path)!r} holds seeds trained as one step (its {SEEDS_FILE} "
          "lists them), not one run") in result.stderr


@pytest.mark.slow
def test_eval_split_over_two_cpu_devices_gives_the_same_result(trained):
  common, train_result, _ = trained
  result = launch(*common, "--mode=eval", "--cpu_devices=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "devices: [CpuDevice(id=0), CpuDevice(id=1)]" in result.stdout
  # Two devices add the per-example losses in another order: the same up to float rounding.
  split, single = (final_metrics(r.stdout) for r in (result, train_result))
  assert split["accuracy"] == single["accuracy"] and split["step"] == single["step"]
  assert split["loss"] == pytest.approx(single["loss"], abs=2e-4)


@pytest.mark.slow
def test_predict_reads_png_and_npy(trained, mnist, tmp_path):
  from PIL import Image

  common, _, workdir = trained
  images = mnist["test"]["image"][:2, ..., 0]
  Image.fromarray(images[0]).save(tmp_path / "a.png")
  np.save(tmp_path / "b.npy", images[1])
  files = f"{tmp_path / 'a.png'},{tmp_path / 'b.npy'}"
  result = launch(*common, "--mode=predict", f"--images={files}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()[-2:]
  for line, path in zip(lines, ("a.png", "b.npy"), strict=True):
    assert line.startswith(str(tmp_path / path) + ": digit ")
    probs = [float(p) for p in line.split("[")[1].rstrip("]").split()]
    assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=0.01)
  # The same probabilities as the library gives for the same checkpoint.
  from vit_jax import inference
  from vit_jax.workdir import read_config

  expected = inference.predict(read_config(workdir), workdir, images[..., None])
  for line, row in zip(lines, expected, strict=True):
    assert int(line.split("digit ")[1].split()[0]) == int(np.argmax(row))
    shown = [float(p) for p in line.split("[")[1].rstrip("]").split()]
    np.testing.assert_allclose(shown, row, atol=1e-3)


@pytest.mark.slow
def test_predict_bad_image_is_one_clear_line(trained, tmp_path):
  common, _, workdir = trained
  (tmp_path / "x.png").write_text("not a png")
  result = launch(*common, "--mode=predict", f"--images={tmp_path / 'x.png'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: {tmp_path / 'x.png'}: not an image Pillow can read")


@pytest.mark.parametrize("flag,message", [
    ("--config.model.num_heads=3",
     "error: config.model.num_heads=3 does not divide hidden_size=64"),
    ("--config.learning_rate=-1", "error: config.learning_rate=-1.0 must be positive"),
    ("--config.dataset=cifar10", "error: config.dataset='cifar10' is not one of"),
    ("--config.model.heads=4", "error: config.model.heads is not a known key of the config"),
    ("--config.model.nmu_heads=4", "error: config.model.nmu_heads is not a known key of the "
     'config; did you mean "num_heads" instead of "nmu_heads"?'),
    ("--config.modle.num_heads=2", "error: config.modle is not a known key of the config; "
     'did you mean "model" instead of "modle"?'),
    ("--workdir=/mnt/vit_jax-test-not-mounted/run", "error: workdir='/mnt/vit_jax-test-not-"
     "mounted/run': /mnt/vit_jax-test-not-mounted does not exist (a filesystem that is not "
     "mounted?)"),
    ("--images=digit.png", "error: --images is for --mode=predict, not --mode=train"),
    ("--mode=predict", "error: --mode=predict needs --images=FILE[,FILE...]"),
    ("--num_processes=2", "error: --num_processes is for a run of several processes: add "
     "--coordinator_address or --distributed"),
])
@pytest.mark.parametrize("config", ["--config=experiments/tiny.py", None],
                         ids=["named", "default"])
def test_bad_config_is_one_clear_line_before_any_work(flag, message, config, tmp_path):
  """With --config named or not: without it, the default file is read as the flag is defined."""
  result = launch(*filter(None, [config]), f"--workdir={tmp_path / 'run'}", flag)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message)
  assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1


def test_auto_idx_dir_is_the_first_known_folder_that_exists(tmp_path, monkeypatch):
  import dataclasses

  from vit_jax import mnist_source

  spec = mnist_source.dataset_spec("mnist")
  assert spec.default_idx_dirs == (str(MNIST_IDX_DIR),)  # ../shared/data/mnist, beside the repo
  folders = (str(tmp_path / "missing"), str(tmp_path), "/")
  monkeypatch.setitem(mnist_source.DATASETS, "mnist",
                      dataclasses.replace(spec, default_idx_dirs=folders))
  assert mnist_source.resolve_idx_dir("mnist", "auto") == str(tmp_path)
  assert mnist_source.resolve_idx_dir("mnist", "/given") == "/given"  # a named folder stands
  monkeypatch.setitem(mnist_source.DATASETS, "mnist",
                      dataclasses.replace(spec, default_idx_dirs=folders[:1]))
  assert mnist_source.resolve_idx_dir("mnist", "auto") is None  # TFDS downloads


@pytest.mark.slow
def test_visualize_writes_pngs(trained):
  common, _, workdir = trained
  result = launch(*common, "--mode=visualize", "--num_images=2")
  assert result.returncode == 0, result.stderr[-3000:]
  written = sorted(p.name for p in (workdir / "visualize").glob("*.png"))
  assert written == ["attention_0.png", "attention_1.png", "position_similarity.png",
                     "rollout.png", "training_statistics.png"]
  assert f"wrote {workdir / 'visualize' / 'rollout.png'}" in result.stdout
  result = launch(*common, "--mode=visualize", "--num_images=0")  # not the default 4
  assert result.returncode == 2
  assert result.stderr.strip() == "error: num_images=0 must be at least 1"


@pytest.mark.slow
def test_analyze_writes_every_instrument_as_csv_and_png(trained, tmp_path):
  common, _, _ = trained
  result = launch(*common, "--mode=analyze", "--num_images=100",
                  f"--output_dir={tmp_path / 'analysis'}")
  assert result.returncode == 0, result.stderr[-3000:]
  written = sorted(p.name for p in (tmp_path / "analysis").iterdir())
  assert written == sorted(
      ["head_importance.csv", "head_importance.png", "pruning_curve.csv", "pruning_curve.png",
       "projection_spectra.csv", "projection_spectra.png", "attention_statistics.csv",
       "head_redundancy.csv", "head_redundancy.png", "attention_distance.png", "done_zero"])
  from vit_jax import analyze
  assert analyze.is_done(tmp_path / "analysis", "zero", 100)  # what a sweep would skip
  layers, heads = 2, 4  # experiments/tiny.py
  rows = (tmp_path / "analysis" / "head_importance.csv").read_text().splitlines()
  assert len(rows) == 1 + layers * heads
  curve = (tmp_path / "analysis" / "pruning_curve.csv").read_text().splitlines()
  assert len(curve) == 1 + 1 + layers * heads  # header, nothing removed, then one by one
  spectra = (tmp_path / "analysis" / "projection_spectra.csv").read_text().splitlines()
  assert len(spectra) == 1 + layers * heads * 5
  result = launch(*common, "--mode=analyze", "--num_images=100", "--ablation=mean",
                  f"--output_dir={tmp_path / 'analysis'}")
  assert result.returncode == 0, result.stderr[-3000:]
  mean = (tmp_path / "analysis" / "head_importance_mean.csv").read_text().splitlines()
  assert len(mean) == 1 + layers * heads and mean != rows  # another ablation, other drops
  assert (tmp_path / "analysis" / "pruning_curve_mean.png").exists()
  assert (tmp_path / "analysis" / "done_mean").exists()
  result = launch(*common, "--mode=analyze", "--ablation=half")
  assert result.returncode != 0 and "ablation" in result.stderr

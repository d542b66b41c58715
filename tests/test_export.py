"""`--mode=export`: a SavedModel that TensorFlow alone runs, as the JAX model does."""

import dataclasses
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from test_cli import launch

from vit_jax import export, inference, input_pipeline, models, train, visualize
from vit_jax.experiment_config import validate

sys.path.insert(0, str(REPO / "experiments"))
import tiny  # noqa: E402

# Run by a Python that can import TensorFlow and NumPy only: JAX, Flax and vit_jax are
# blocked (TensorFlow would otherwise import JAX where it is installed, as here).
LOAD_WITH_TENSORFLOW = """
import importlib.abc, json, sys
class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("jax", "jaxlib", "flax", "vit_jax"):
      raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Blocked())
import numpy as np
import tensorflow as tf
images = np.load(sys.argv[2])
outputs = tf.saved_model.load(sys.argv[1]).signatures["serving_default"](tf.constant(images))
print(json.dumps({k: v.numpy().tolist() for k, v in outputs.items()}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
  """A `tiny` run trained for 16 steps on the synthetic digits: (its config, its workdir)."""
  config = validate({**tiny.get_config().to_dict(), "num_epochs": 1, "train_examples": None,
                     "eval_batch_size": 256, "augment_max_shift": 0, "warmup_steps": 2})
  workdir = tmp_path_factory.mktemp("export") / "run"
  train.train_and_evaluate(config, workdir, data=digits)
  return config, workdir


def snapshot(folder):
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("shift, flip", [(0, False), (1, False), (1, True)])
def test_the_served_function_averages_the_views_and_draws_the_image_s_own_attention(
    digits, shift, flip):
  config = validate({**tiny.get_config().to_dict(), "eval_max_shift": shift, "eval_flip": flip,
                     "dataset": "fashion_mnist" if flip else "mnist"})  # flips: clothes only
  model = models.ViT(config.model)
  images = digits["test"]["image"][:3]
  params = model.init(jax.random.key(0), input_pipeline.normalize(images, config.dataset))[
      "params"]
  serve = export.serving_function(config, params)
  probabilities, attention = jax.jit(serve)(images)
  def matmuls(function, *args):
    return str(jax.make_jaxpr(function)(*args)).count("dot_general")

  views = input_pipeline.evaluation_views(images, shift, flip)
  one_pass = matmuls(lambda x: model.apply({"params": params}, x), views.reshape(-1, 28, 28, 1))
  assert matmuls(serve, images) == one_pass  # the views' pass also gives the attention
  np.testing.assert_allclose(
      probabilities, inference.probabilities(config, model.apply, params, images), atol=1e-6)
  _, variables = model.apply({"params": params}, input_pipeline.normalize(images, config.dataset),
                             mutable=["intermediates"])
  own = np.moveaxis(models.attention_maps(variables["intermediates"]), 0, 1)  # one view each
  assert attention.shape == own.shape == (3, 2, 4, 17, 17)
  np.testing.assert_allclose(attention, own, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("views", [0, 1])
def test_the_saved_model_gives_the_jax_probabilities_and_attention(run, tmp_path, digits,
                                                                   views):
  config, workdir = run
  # eval_max_shift=1: the exported probabilities average the 9 shifted views, as predict does.
  config = dataclasses.replace(config, eval_max_shift=views)
  result = launch("--config=experiments/tiny.py", f"--workdir={workdir}", "--mode=export",
                  f"--config.eval_max_shift={views}", f"--output_dir={tmp_path / 'exported'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote {tmp_path / 'exported'}" in result.stdout
  # TensorFlow's writer logs each file at INFO (absl's 'I1206 10:00:00.1 ...'): not here.
  assert not re.search(r"^I\d{4} ", result.stderr, re.MULTILINE), result.stderr[-2000:]
  images = digits["test"]["image"][:5]
  np.save(tmp_path / "images.npy", images)
  loaded = subprocess.run([sys.executable, "-c", LOAD_WITH_TENSORFLOW,
                           str(tmp_path / "exported"), str(tmp_path / "images.npy")],
                          capture_output=True, text=True, timeout=300)
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  outputs = json.loads(loaded.stdout.strip().splitlines()[-1])
  expected = inference.predict(config, workdir, images)
  np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)
  single = inference.predict(dataclasses.replace(config, eval_max_shift=0), workdir, images)
  assert single.std(axis=0).max() > 0.05  # a trained model's: each image its own answer
  # The export follows the flag either way: the other count of views gives other numbers.
  other = single if views else inference.predict(dataclasses.replace(config, eval_max_shift=1),
                                                 workdir, images)
  assert np.abs(np.asarray(outputs["probabilities"]) - other).max() > 1e-3
  attention = np.asarray(outputs["attention"])
  assert attention.shape == (5, 2, 4, 17, 17)  # tiny: 2 layers, 4 heads, 1 + 16 tokens
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_evaluating_predicting_drawing_and_exporting_write_nothing_into_the_workdir(
    run, tmp_path, digits):
  config, workdir = run
  before = snapshot(workdir)
  inference.evaluate_checkpoint(config, workdir, data=digits)
  inference.predict(config, workdir, digits["test"]["image"][:2])
  drawn = visualize.visualize_checkpoint(config, workdir, 1, digits["test"], tmp_path / "pics")
  assert drawn and all(p.parent == tmp_path / "pics" for p in drawn)
  export.export_saved_model(config, workdir, tmp_path / "exported")
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_export_replaces_only_a_saved_model_or_an_empty_folder(run, tmp_path):
  config, workdir = run
  kept = tmp_path / "notes"
  kept.mkdir()
  (kept / "results.txt").write_text("mine")
  for taken in (kept, workdir, kept / "results.txt"):
    with pytest.raises(ValueError, match=rf"^output_dir='{taken}' exists and is not a "
                                         "SavedModel, which export would replace; name a new"):
      export.export_saved_model(config, workdir, taken)
  assert (kept / "results.txt").read_text() == "mine" and (workdir / "checkpoints").is_dir()
  (tmp_path / "empty").mkdir()
  first = export.export_saved_model(config, workdir, tmp_path / "empty")
  created = (first / "saved_model.pb").stat().st_mtime_ns
  assert export.export_saved_model(config, workdir, first) == first  # an export: replaced
  assert (first / "saved_model.pb").stat().st_mtime_ns != created

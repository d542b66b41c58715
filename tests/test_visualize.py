"""The pictures (`vit_jax.visualize`): from a real (tiny) checkpoint, and how panels are named."""

import numpy as np
import pytest
from PIL import Image
from test_experiments import base_config

from vit_jax import analysis, inference, train, visualize
from vit_jax.model_configs import get_model_config


@pytest.mark.slow
def test_visualize_draws_each_digit_s_attention(tmp_path, mnist, monkeypatch):
  config = base_config()
  data = {"train": {k: v[:256] for k, v in mnist["train"].items()},
          "test": {k: v[:200] for k, v in mnist["test"].items()}}
  train.train_and_evaluate(config, tmp_path, data=data)
  drawn, plot_attention = [], visualize.plot_attention

  def recording(image, per_head, *args):
    drawn.append((image, per_head))
    return plot_attention(image, per_head, *args)

  monkeypatch.setattr(visualize, "plot_attention", recording)
  (tmp_path / "visualize").mkdir()
  (tmp_path / "visualize" / "attention_7.png").write_bytes(b"an earlier call's 8th digit")
  (tmp_path / "visualize" / "attention_distance.png").write_bytes(b"--mode=analyze's, kept")
  paths = visualize.visualize_checkpoint(config, tmp_path, num_images=3, test_data=data["test"])
  assert not (tmp_path / "visualize" / "attention_7.png").exists()
  assert (tmp_path / "visualize" / "attention_distance.png").exists()
  names = sorted(p.name for p in paths)
  assert names == ["attention_0.png", "attention_1.png", "attention_2.png",
                   "position_similarity.png", "rollout.png", "training_statistics.png"]
  assert Image.open(tmp_path / "visualize" / "attention_0.png").size[0] > 100
  with pytest.raises(ValueError, match=r"^num_images=201 exceeds the 200 test images of mnist$"):
    visualize.visualize_checkpoint(config, tmp_path, num_images=201, test_data=data["test"])
  # Each digit's picture shows its own attention: the model's on that image alone.
  state = inference.restore_state(config, tmp_path)
  for image, per_head in drawn:
    _, maps = analysis.collect_attention(state, image[None], config.dataset)
    np.testing.assert_allclose(
        per_head, analysis.query_attention(maps, config.model.classifier)[:, 0],
        rtol=1e-5, atol=1e-6)
  assert len(drawn) == 3 and not np.allclose(drawn[0][1], drawn[1][1])


def test_attention_panels_count_layers_and_heads_from_0_and_rollout_keeps_to_one_row(
    tmp_path, monkeypatch):
  """As the metrics, the analyses and the README count them: 'layer 0 head 0' is the first."""
  figures = []
  monkeypatch.setattr(visualize.plt, "close", figures.append)
  config = get_model_config("testing")  # 2 layers, 2 heads, 4x4 grid
  image = np.zeros((28, 28, 1), np.uint8)
  per_head = np.full((2, 2, config.num_patches), 1 / config.num_patches)
  visualize.plot_attention(image, per_head, config, 3, 3, tmp_path / "a.png")
  titles = [ax.get_title() for ax in figures[0].axes]
  assert titles == ["layer 0 head 0", "layer 0 head 1", "layer 1 head 0", "layer 1 head 1"]
  many = visualize.ROLLOUT_IMAGES + 5
  rollout = np.full((many, config.num_patches + 1, config.num_patches + 1), 0.1)
  visualize.plot_rollout(np.zeros((many, 28, 28, 1), np.uint8), rollout, config,
                         tmp_path / "r.png")
  assert len(figures[1].axes) == visualize.ROLLOUT_IMAGES


def test_a_picture_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  from vit_jax import figures

  plt, path = figures.pyplot(), tmp_path / "a.png"
  first, ax = plt.subplots()
  ax.plot([0, 1])
  assert figures.save_png(first, path) == path
  before = path.read_bytes()
  assert before.startswith(b"\x89PNG")
  fig, _ = plt.subplots()

  def killed_halfway(partial, **_):
    partial.write_bytes(b"\x89PNG half")
    raise OSError("No space left on device")

  monkeypatch.setattr(fig, "savefig", killed_halfway)
  with pytest.raises(OSError, match="No space"):
    figures.save_png(fig, path)
  assert path.read_bytes() == before  # the last whole picture, no partial file beside it
  assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
  assert not {first.number, fig.number} & set(plt.get_fignums())  # both closed

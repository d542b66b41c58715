"""A run resumed on another number of devices: one device to eight and eight to one.

The update is the same maths on any device count (the batch's mean gradient), but the sums
are grouped otherwise (per device, then across devices), so the parameters agree with an
uninterrupted run up to float rounding, not bit for bit (README: "Resuming elsewhere").
"""

import jax
import numpy as np
import pytest
from test_train import params_of, read_losses, small_config, subset, train_until_crash_after_saving

from vit_jax import train


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [("jit", "pmap"), ("pmap", "jit")])
def test_a_run_resumes_on_another_device_count_and_continues_its_trajectory(
    tmp_path, digits, monkeypatch, before, after):
  assert jax.local_device_count() == 8  # conftest: pmap takes eight devices, jit one
  data = subset(digits, 1024, 512)  # 16 steps an epoch: 32 steps, checkpoints every 4
  config = small_config(num_epochs=2, augment_max_shift=0, parallel=before)
  train.train_and_evaluate(config, tmp_path / "straight", data=data)
  train_until_crash_after_saving(config, tmp_path / "moved", data, 16, monkeypatch)
  moved = small_config(num_epochs=2, augment_max_shift=0, parallel=after)
  result = train.train_and_evaluate(moved, tmp_path / "moved", data=data)
  assert result["step"] == 32
  straight, resumed = read_losses(tmp_path / "straight"), read_losses(tmp_path / "moved")
  assert [s for s, _ in resumed] == [s for s, _ in straight]  # no step lost or repeated
  np.testing.assert_allclose([loss for _, loss in resumed], [loss for _, loss in straight],
                             rtol=1e-3)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                         params_of(config, tmp_path / "straight"),
                         params_of(moved, tmp_path / "moved"))

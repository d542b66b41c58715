"""`attention.patchify` against a numpy reference written from its definition."""

import numpy as np
import pytest

from vit_jax import attention as A


def rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ref_patchify(images, p, overlap=0):
  b, h, w, c = images.shape
  side = p + 2 * overlap

  def pixel(img, r, s):  # the image padded with its edge: the index clamped into it
    return img[min(max(r, 0), h - 1), min(max(s, 0), w - 1)]

  out = []
  for img in images:
    patches = [np.stack([pixel(img, r - overlap + i, s - overlap + j)
                         for i in range(side) for j in range(side)]).reshape(-1)
               for r in range(0, h, p) for s in range(0, w, p)]
    out.append(np.stack(patches))
  return np.stack(out)


@pytest.mark.parametrize("p,c", [(7, 1), (4, 1), (2, 3)])
def test_patchify_matches_reference(p, c):
  images = rand(2, 28, 28, c)
  np.testing.assert_allclose(A.patchify(images, p), ref_patchify(images, p), rtol=0, atol=0)


@pytest.mark.parametrize("p,overlap,c,h,w", [(4, 1, 1, 28, 28), (4, 2, 1, 28, 28),
                                             (7, 3, 2, 28, 28), (2, 1, 3, 28, 28),
                                             (4, 4, 1, 28, 28), (4, 1, 3, 8, 12)])
def test_overlapping_patches_match_reference(p, overlap, c, h, w):
  images = rand(2, h, w, c)
  patches = A.patchify(images, p, overlap)
  assert patches.shape == (2, (h // p) * (w // p), (p + 2 * overlap) ** 2 * c)
  np.testing.assert_array_equal(patches, ref_patchify(images, p, overlap))


def test_overlapping_patches_share_their_borders():
  images = rand(1, 8, 8, 1)
  patches = np.asarray(A.patchify(images, 4, 1)).reshape(1, 2, 2, 6, 6)
  # The first patch's last two columns are the second patch's first two.
  np.testing.assert_array_equal(patches[0, 0, 0, :, 4:], patches[0, 0, 1, :, :2])
  np.testing.assert_array_equal(patches[0, 0, 0, 4:, :], patches[0, 1, 0, :2, :])
  np.testing.assert_array_equal(patches[0, 0, 0, 1:5, 1:5], images[0, :4, :4, 0])


def test_patchify_rejects_patch_that_does_not_divide_the_image():
  with pytest.raises(ValueError, match="patch_size=5"):
    A.patchify(rand(1, 28, 28, 1), 5)
  with pytest.raises(ValueError, match="overlap=-1 must be at least 0"):
    A.patchify(rand(1, 28, 28, 1), 4, -1)

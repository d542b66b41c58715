"""Pictures on disk: matplotlib without a display, each PNG whole or not at all.

Layer 5 of vit_jax, shared by the attention pictures, the analysis and the sweep's plots: a
drawing killed halfway (Ctrl-C, a full disk) leaves the last whole picture, never half of one.
"""

from __future__ import annotations

from pathlib import Path

from vit_jax.files import replaced_atomically


def pyplot():
  """matplotlib.pyplot on the Agg backend: files only, no display needed."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
  """Writes `fig` to `path` as a PNG, atomically, and closes it; -> the path."""
  path = Path(path)
  try:
    with replaced_atomically(path) as partial:
      fig.savefig(partial, dpi=dpi, format="png")  # the partial name says no format
  finally:
    pyplot().close(fig)
  return path

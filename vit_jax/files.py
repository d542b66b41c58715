"""Files that appear whole or not at all.

Below every layer of vit_jax (the standard library only): the kernel's build, the dataset's
array cache, config.json and a sweep's result.json all write this way.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path`; on a clean exit it is renamed to `path`.

  Whatever writes the temporary path (Python, numpy, a compiler), a reader never sees a
  half-written `path`, even if the writer is killed: the rename is atomic on one filesystem,
  and concurrent writers each rename a whole file. On an exception the temporary file is
  deleted and `path` keeps what it held.
  """
  path = Path(path)
  partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
  try:
    yield partial
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)


def write_csv_atomically(path: str | os.PathLike, header: list[str], rows) -> Path:
  """A CSV table, `header` then `rows` (sequences), whole or not at all; -> its path."""
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows(rows)
  write_text_atomically(path, text.getvalue())
  return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
  """`Path(path).write_text(text)`, whole or not at all."""
  with replaced_atomically(path) as partial:
    partial.write_text(text)

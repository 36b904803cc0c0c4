"""File writing that never leaves a partial file where a complete one is expected."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write to ``<name>.<pid>.partial`` then rename: readers see the old file or the whole new
    one, and two processes writing the same file at once (jobs of one model recording its cache
    settings) do not rename each other's partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename: a crash leaves no short file
    os.replace(partial, path)

"""Atomic file writes: the one way dplib writes a file that a reader (or a killed process) may see.

`atomic_write(path, write)` calls `write(tmp)` on a temporary path in the same directory, then
renames it over `path` (`os.replace`, atomic on one file system): readers see the old file or the
complete new one, never half of it, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary file beside it, which then replaces `path`.

    The parent directory is created if missing. The temporary file is hidden and ends in ".tmp", never
    in `path`'s suffix, so a reader globbing for finished files ("*.parquet") never sees one; a writer
    that reads the format from the name must be told it (e.g. `savefig(..., format="png")`). It is
    removed if `write` raises. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

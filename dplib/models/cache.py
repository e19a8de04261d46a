"""dplib's on-disk cache: where it is, whether it can be written, and atomic writes into it.

The cache is an optimisation only: where it cannot be used (read-only, `$DPLIB_CACHE` a regular
file, ...) `writable_cache_dir` logs one warning per directory and reason and returns None, and the
caller works without it. Used by the GGUF conversion cache (`conversion`) and the vocabulary maps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from ..files import atomic_write

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of dplib's cache: `$DPLIB_CACHE`, else the user cache dir (e.g. ~/.cache/dplib)."""
    root = os.environ.get("DPLIB_CACHE")
    if root:
        return Path(root).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dplib"))


_CACHE_WARNED: set[tuple[str, str]] = set()  # (directory, reason) already warned about


def _cache_unusable(path: Path, err: OSError) -> None:
    """Log, once per directory and reason, that the cache at `path` cannot be used and why."""
    reason = f"{type(err).__name__}: {err.strerror or err}"
    if (str(path), reason) in _CACHE_WARNED:
        return
    _CACHE_WARNED.add((str(path), reason))
    root = os.environ.get("DPLIB_CACHE")
    source = f"DPLIB_CACHE={root!r}" if root else "DPLIB_CACHE is unset, so the user cache dir is used"
    log.warning("dplib's cache directory %s is unusable (%s; %s); working without the cache, so nothing is "
                "reused between runs. Set DPLIB_CACHE to a writable directory to enable it.", path, reason, source)


def writable_cache_dir(subdir: str) -> Path | None:
    """`cache_dir() / subdir`, created if missing, if a file can be written and renamed into place there.

    The cache is an optimisation only: if it cannot be used (read-only, `$DPLIB_CACHE` a regular
    file, no space, ...) this logs a warning naming DPLIB_CACHE, the directory and the reason (once
    per directory and reason in a process) and returns None; the caller then works without the cache.
    """
    path = cache_dir() / subdir
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        try:
            os.write(fd, b"dplib")
        finally:
            os.close(fd)
        os.replace(probe, probe + ".done")  # what every cache write ends with
        os.unlink(probe + ".done")
    except OSError as err:
        _cache_unusable(path, err)
        return None
    return path


def write_cache_file(subdir: str, name: str, write) -> Path | None:
    """Write `cache_dir() / subdir / name` atomically with `write(binary file)`; its path, or None.

    Readers see no file or a complete one. If the cache is unusable (see `writable_cache_dir`) or
    the write fails, nothing is left behind, a warning is logged as there, and None is returned.
    """
    directory = writable_cache_dir(subdir)
    if directory is None:
        return None
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    try:
        return atomic_write(directory / name, fill)
    except OSError as err:
        _cache_unusable(directory, err)
        return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()

"""The GGUF conversion cache: a GGUF de-quantised once into a plain safetensors + tokenizer copy.

GGUF de-quantisation and tokenizer conversion take 20-60 s, so the first load of a GGUF writes the
copy into the cache (`cache_dir() / "models"`), keyed by the GGUF's sha256. The entry is written into
a temporary directory and renamed into place (atomic on one file system), and carries a manifest
with the size and sha256 of every file, checked on every load: a half-written or corrupt entry is
rebuilt, never loaded. Where the cache cannot be written, the GGUF is converted into a temporary
directory instead (the caller loads it, then removes it); valid entries are still read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cache import _cache_unusable, _file_sha256, cache_dir, writable_cache_dir

log = logging.getLogger(__name__)

MANIFEST = "dplib-manifest.json"
_CACHE_FORMAT = 1  # bump when the layout of a cache entry changes: old entries are then rebuilt


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to install or pass instead."""


def _entry_dir(key: str) -> Path:
    return cache_dir() / "models" / key[:32]


def _entry_is_valid(entry: Path, key: str) -> bool:
    """Complete and intact: the manifest matches the key and every file's size and sha256."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("source_sha256") != key or manifest.get("format") != _CACHE_FORMAT:
        return False
    for name, info in manifest.get("files", {}).items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != info["size"] or _file_sha256(path) != info["sha256"]:
            return False
    return bool(manifest.get("files"))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF to float32 and write config, safetensors and tokenizer into `out`."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        arch = _gguf_architecture(gguf)
        raise ModelLoadError(
            f"transformers cannot load the GGUF file {gguf} (architecture {arch!r}): {err}\n"
            "Convert it to a Hugging Face directory with a tool that supports this architecture, "
            "or pass a hub id / local HF directory of the same model instead.") from err
    # The converted weights are plain float32: drop the GGUF tag so the copy loads as a normal model
    # (transformers refuses to serialise a model that still says it is GGUF-quantised).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # handles tied embeddings
    tokenizer.save_pretrained(out)


def _gguf_architecture(gguf: Path) -> str:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:  # noqa: BLE001 - only used to improve an error message
        return "unknown"


def _cached_copy(key: str, make_gguf, label: str) -> tuple[Path, bool, bool]:
    """(directory to load, whether it was already cached, whether it is temporary) for the GGUF with sha256 `key`.

    A valid cache entry is returned as is; otherwise the entry is built. If the cache cannot be
    written (`writable_cache_dir` warns) the GGUF is converted into a temporary directory instead
    (temporary True): the caller loads it, then removes it.
    """
    entry = _entry_dir(key)
    if entry.exists():
        if _entry_is_valid(entry, key):
            return entry, True, False
        log.warning("cache entry %s for %s is incomplete or corrupt; rebuilding it", entry, label)
        shutil.rmtree(entry, ignore_errors=True)
    if writable_cache_dir("models") is None:
        return _temporary_copy(make_gguf, label), False, True
    log.info("converting %s (first load; 20-60 s); the copy goes to %s", label, entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    keep = False  # True: tmp itself is returned, as a temporary copy
    try:
        with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".scratch-") as scratch:
            _convert_gguf(Path(make_gguf(scratch)), tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": _file_sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": _CACHE_FORMAT, "source": label, "source_sha256": key, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, entry)  # atomic: the entry is either absent or complete
        except OSError as err:
            if not _entry_is_valid(entry, key):  # else a concurrent build won the race: keep theirs
                # e.g. a corrupt entry that could not be removed: load this copy, then drop it
                _cache_unusable(entry, err)
                keep = True
                return tmp, False, True
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry, False, False


def _temporary_copy(make_gguf, label: str) -> Path:
    """Convert the GGUF into a new temporary directory (the cache being unusable); the caller removes it."""
    log.info("converting %s (20-60 s) into a temporary directory: the cache is unusable", label)
    out = Path(tempfile.mkdtemp(prefix="dplib-model-"))
    try:
        with tempfile.TemporaryDirectory(prefix="dplib-scratch-") as scratch:
            _convert_gguf(Path(make_gguf(scratch)), out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out

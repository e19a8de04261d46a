"""Loading causal LMs: the embedded-model registry, the GGUF conversion cache, tiny test models.

`load_model(name_or_path)` accepts an embedded name (`smollm2-135m`, `gemma3-270m`), a Hugging
Face hub id, a local HF directory or a local `.gguf` file, and returns `(model, tokenizer)` with the
model frozen (eval mode, `requires_grad` off everywhere).

GGUF de-quantisation and tokenizer conversion take 20-60 s, so the first load of a GGUF writes a
plain safetensors + tokenizer copy into the cache (`$DPLIB_CACHE`, default the user cache dir),
keyed by the GGUF's sha256. The entry is written into a temporary directory and renamed into place
(atomic on one file system), and carries a manifest with the size and sha256 of every file, checked
on every load: a half-written or corrupt entry is rebuilt, never loaded. An entry that passes these
checks but will not load is rebuilt once; if it still will not load, `ModelLoadError` names it.
The cache is an optimisation only: where it cannot be written (read-only, `$DPLIB_CACHE` a regular
file, ...) `writable_cache_dir` logs one warning and the GGUF is converted into a temporary
directory, loaded from it, and the directory removed; valid entries are still read.

The tiny models (`tiny_model`) are random Llama / Gemma-3 models with a byte-level BPE tokenizer
trained in memory: no download, a second per build, for unit tests of everything that follows.

Modules, bottom to top (import the names from `dplib.models`): `device` ("auto" device and dtype),
`cache` (the cache directory, atomic writes into it), `conversion` (the GGUF conversion cache,
`ModelLoadError`), `loading` (`load_model`, `EMBEDDED`, `list_models`), `tiny` (`tiny_model`,
`tiny_tokenizer`). Modules call each other directly: to patch a call, patch the module that makes
it (e.g. `dplib.models.conversion.writable_cache_dir`).
"""

from __future__ import annotations

from .cache import cache_dir, writable_cache_dir, write_cache_file
from .conversion import MANIFEST, ModelLoadError
from .device import resolve_device, resolve_dtype
from .loading import EMBEDDED, EmbeddedModel, list_models, load_model
from .tiny import TINY_SPECIAL_TOKENS, tiny_model, tiny_tokenizer

__all__ = [
    "EMBEDDED", "MANIFEST", "TINY_SPECIAL_TOKENS", "EmbeddedModel", "ModelLoadError", "cache_dir", "list_models",
    "load_model", "resolve_device", "resolve_dtype", "tiny_model", "tiny_tokenizer", "writable_cache_dir",
    "write_cache_file",
]

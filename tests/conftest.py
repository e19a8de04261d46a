"""Shared fixtures: tiny in-memory models for unit tests, the real embedded models for integration tests.

The real models load from dplib's cache (`$DPLIB_CACHE`, default the user cache dir); the first
load of a session converts the GGUF (20-60 s), later ones read the cached copy in seconds.
Tests that use them are marked `slow` (CI still runs them).
"""

from __future__ import annotations

import os

import pytest
import torch

from dplib.models import load_model, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): tiny random Llama, tokenizer of 380 tokens, logits width 384."""
    return tiny_model(380, arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_b():
    """(model, tokenizer): a second tiny Llama with a different vocabulary (600 tokens, width 640)."""
    return tiny_model(600, arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_gemma():
    """(model, tokenizer): tiny random Gemma-3 (scaled embeddings, Gemma RMSNorm)."""
    return tiny_model(380, arch="gemma3", seed=2)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): the real SmolLM2-135M-Instruct, float32 on CPU."""
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer): the real Gemma-3-270M, float32 on CPU."""
    return load_model("gemma3-270m", device="cpu")

"""`fingerprint(model)`: the identity of a model's weights and dtype (for caching results)."""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

from .config import _OVERRIDES, _weights_state, text_config

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model) -> str:
    """sha256 (hex, 32 chars) of the model's config, parameter names, shapes, dtypes and values.

    Two models share it only if they compute the same function in the same dtype: a name says
    nothing (in-memory models are all called after their class). Memoised per model and re-computed
    when any parameter is replaced or modified in place (tracked by torch's tensor version counters).
    """
    params = list(model.named_parameters())
    state = _weights_state(model)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == state:
        return memo[1]
    h = hashlib.sha256()
    h.update(json.dumps(text_config(model).to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps({k: str(v) for k, v in _OVERRIDES.get(model, {}).items()}, sort_keys=True).encode())
    for name, p in params:
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    digest = h.hexdigest()[:32]
    _FINGERPRINTS[model] = (state, digest)
    return digest

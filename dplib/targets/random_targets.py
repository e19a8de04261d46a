"""Random ("vanilla") targets at exact entropies: `vanilla`, and the grid `entropy_grid`.

Random targets spread mass over every row of the width they are given, padding rows included
(pass `logits_width(model)`).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import Tensor

from ..seeds import derive_seed, generator
from .batch import TargetError, Targets, _check_vocab
from .tempering import _check_entropies, _row_chunks, _store, _temper

VANILLA_METHODS = ("temperature", "gradient")


def entropy_grid(vocab_size: int, n: int) -> Tensor:
    """n evenly spaced entropies over [0, ln vocab_size], both ends included; (n,) float64, nats."""
    vocab_size = _check_vocab(vocab_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TargetError(f"n must be a positive int, got {n!r}.")
    if n == 1:
        return torch.tensor([0.0], dtype=torch.float64)
    grid = torch.linspace(0.0, math.log(vocab_size), n, dtype=torch.float64)
    grid[-1] = math.log(vocab_size)  # exactly the uniform distribution's entropy
    return grid


def vanilla(vocab_size: int, entropies, *, seed: int = 0, method: str = "temperature",
            dtype: torch.dtype | None = None, gd_steps: int = 500, gd_lr: float = 0.1,
            gd_tol: float = 1e-3) -> Targets:
    """Random targets at the requested entropies.

    Target i starts from logits z_i ~ N(0, 1)^vocab drawn from a generator seeded with
    derive_seed(seed, "vanilla", i): it depends on (seed, i) only, not on the other entries, and
    both methods start from the same z_i.

    Args:
        vocab_size: the model's logits width (`logits_width(model)`); every row gets mass.
        entropies: a float or sequence of T entropies, each in [0, ln vocab_size] nats.
        seed: base seed.
        method: "temperature": softmax(β z) with β solved per row (safeguarded Newton on log β)
            to |H − h| ≤ 1e-10. "gradient" (the original study's construction): Adam gradient
            descent on the logits, loss (H(softmax(z)) − h)², from z, for at most `gd_steps` steps
            (rate `gd_lr`) or until |H − h| ≤ `gd_tol`; plain descent stalls short of 1e-6
            (its gradient vanishes with H − h), so the result is then corrected exactly by the
            temperature solver applied to the descended logits (a temperature within ~1e-3 of 1).
            meta records `gd_steps_taken` and `gd_gap_nats` (|H − h| before the correction).
        dtype: storage dtype; None = float32 when that keeps every realised entropy within 1e-6
            of the request (always, so far measured: max error ~1e-8), else float64.

    h = 0 gives the exact one-hot on argmax z_i, h = ln vocab_size the exact uniform distribution.
    Returns: Targets, probs (T, vocab_size); meta target_id "vanilla-<method>-s<seed>-<i>", kind
    "vanilla", method, requested_entropy_nats, seed, index.
    """
    vocab_size = _check_vocab(vocab_size)
    if method not in VANILLA_METHODS:
        raise TargetError(f"method={method!r} is not a vanilla method; use one of {VANILLA_METHODS}.")
    h = _check_entropies(entropies, vocab_size)
    z = torch.stack([_row_logits(seed, "vanilla", i, vocab_size) for i in range(len(h))])
    meta = pd.DataFrame({
        "target_id": [f"vanilla-{method}-s{seed}-{i}" for i in range(len(h))],
        "kind": "vanilla", "method": method, "requested_entropy_nats": h.numpy(),
        "seed": seed, "index": range(len(h))})
    if method == "gradient":
        z, steps, gap = _descend(z, h, steps=gd_steps, lr=gd_lr, tol=gd_tol)
        meta["gd_steps_taken"], meta["gd_gap_nats"] = steps.numpy(), gap.numpy()
    probs = _store(_temper(z, h), h, dtype)
    return Targets(probs, meta)


def _descend(z: Tensor, h: Tensor, *, steps: int, lr: float, tol: float):
    """Adam on (H(softmax(z)) − h)² per row, analytic gradient, rows stopping at |H − h| ≤ tol.

    ∂H/∂z = −p ⊙ (log p + H). The descent runs in float32 (it only has to get within `tol`; the
    exact temperature correction that follows is float64). Rows whose h is 0 or ln n are left
    alone (`_temper` makes them exact). Returns (descended z float64, steps taken per row,
    |H − h| per row at the end).
    """
    n = z.shape[-1]
    z = z.clone()
    taken = torch.zeros(len(h), dtype=torch.long)
    gap = torch.zeros(len(h), dtype=torch.float64)
    todo = ((h > 0) & (h < math.log(n))).nonzero().flatten()
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for chunk in _row_chunks(len(todo), n // 2):
        rows = todo[chunk]  # rows still descending; finished ones are written back and dropped
        zc, hc = z[rows].float(), h[rows].float()
        m, v = torch.zeros_like(zc), torch.zeros_like(zc)
        for t in range(1, steps + 2):
            logp = torch.log_softmax(zc, dim=-1)
            p = torch.exp(logp)
            entropy = -(p * logp).sum(-1)
            diff = entropy - hc
            done = (diff.abs() <= tol) | (t > steps)
            if done.any():
                z[rows[done]] = zc[done].double()
                taken[rows[done]] = t - 1
                gap[rows[done]] = diff[done].abs().double()
                keep = ~done
                rows, zc, hc, m, v = rows[keep], zc[keep], hc[keep], m[keep], v[keep]
                logp, p, entropy, diff = logp[keep], p[keep], entropy[keep], diff[keep]
                if len(rows) == 0:
                    break
            grad = logp.add_(entropy.unsqueeze(-1)).mul_(p).mul_((-2.0 * diff).unsqueeze(-1))
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            zc.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
    return z, taken, gap


def _row_logits(seed: int, kind: str, index: int, n: int) -> Tensor:
    """z ~ N(0, 1) of length n, float64, a function of (seed, kind, index) only."""
    return torch.randn(n, generator=generator(derive_seed(seed, kind, index)), dtype=torch.float64)

"""Target distributions: the `Targets` batch type, its validation, and the samplers.

A target is a probability vector over a model's whole vocabulary — the logits width, which can
exceed `len(tokenizer)` — plus metadata. A batch of T targets is a `Targets`: `probs` (T, vocab),
`entropy` (T,) in nats, and one metadata row per target (`frame()`), whose `target_id` names the
target stably so that per-cell seeds can derive from it.

Samplers (each returns a validated `Targets`):
- `vanilla(vocab_size, entropies, method=...)`: random targets at exact entropies (|H − h| ≤ 1e-6).
- `outliers(vocab_size, entropy, k, mass)`: k tokens sharing mass m, the rest tempered to exact h.
- `from_model(model, tokenizer, n)`: a model's next-token distributions at seeded corpus positions.
- `reference(model, tokenizer, contexts)`: a model's distribution after given contexts (KL 0 reachable).
- `map_vocab(targets, source_tokenizer, target_tokenizer, width)`: string-level move across tokenizers.

Shortcuts taken: random targets spread mass over every row of the width they are given, padding
rows included (pass `logits_width(model)`); LM and reference targets keep whatever mass the model
puts on its padding rows, because they must stay the model's own distributions. The temperature
solver is a safeguarded Newton iteration on log β rather than plain bisection (same bracket,
same guarantee, ~5× fewer passes over a 262,144-wide batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import lm, metrics
from .lm import logits_width
from .seeds import derive_seed, generator

log = logging.getLogger(__name__)

SUM_TOLERANCE = 1e-4  # |Σ p − 1| allowed without renormalising


class TargetError(ValueError):
    """A target distribution is invalid; the message says what is wrong and how to fix it."""


def validate_probs(probs: Tensor, *, renormalize: bool = False, name: str = "probs") -> Tensor:
    """Check a (T, vocab) batch of distributions; return it (renormalised only if asked).

    Raises TargetError when a row is not finite, has a negative entry, or does not sum to 1
    within 1e-4 (with `renormalize=True` such rows are rescaled, with a warning).
    """
    if not isinstance(probs, Tensor):
        raise TargetError(f"{name} must be a torch.Tensor of shape (T, vocab), got {type(probs).__name__}.")
    if probs.ndim == 1:
        raise TargetError(f"{name} has shape {tuple(probs.shape)}; a batch of targets is 2-D (T, vocab): "
                          "use probs.unsqueeze(0) for a single target.")
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise TargetError(f"{name} must have shape (T, vocab) with T, vocab ≥ 1; got {tuple(probs.shape)}.")
    if not probs.is_floating_point():
        raise TargetError(f"{name} must be a floating-point tensor, got {probs.dtype}.")
    bad = ~torch.isfinite(probs).all(-1)
    if bad.any():
        raise TargetError(f"{name} rows {_rows(bad)} contain NaN or inf; every probability must be finite.")
    bad = (probs < 0).any(-1)
    if bad.any():
        raise TargetError(f"{name} rows {_rows(bad)} contain negative entries; probabilities must be ≥ 0 "
                          "(did you pass logits or log-probabilities? use probs = logits.softmax(-1)).")
    sums = probs.double().sum(-1)
    bad = (sums - 1).abs() > SUM_TOLERANCE
    if bad.any():
        if not renormalize:
            raise TargetError(
                f"{name} rows {_rows(bad)} do not sum to 1 within {SUM_TOLERANCE} (sums: "
                f"{[round(float(s), 6) for s in sums[bad][:5]]}); pass renormalize=True to rescale them.")
        if (sums[bad] <= 0).any():
            raise TargetError(f"{name} rows {_rows(bad & (sums <= 0))} have zero total mass and cannot be renormalised.")
        warnings.warn(f"renormalising {name} rows {_rows(bad)}, whose sums were off by up to "
                      f"{float((sums - 1).abs().max()):.3g}", stacklevel=3)
        probs = probs / sums.to(probs.dtype).unsqueeze(-1)
    return probs


def _rows(mask: Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    return str(idx[:10])[:-1] + (", ...]" if len(idx) > 10 else "]")


@dataclass
class Targets:
    """A batch of T target distributions over one vocabulary.

    Attributes:
        probs: (T, vocab) probabilities, float32 or float64, on CPU unless moved.
        meta: T rows of metadata; always has `target_id` (unique, stable) and `kind`. Samplers add
            `requested_entropy_nats`, `seed`, `k`, `mass`, `source_model`, `context`, `position`,
            `mass_lost`, ... as they apply; missing values are NaN/None.
    """

    probs: Tensor
    meta: pd.DataFrame = field(default=None)

    def __post_init__(self):
        self.probs = validate_probs(self.probs)
        if self.meta is None:
            self.meta = pd.DataFrame({"kind": ["custom"] * len(self.probs)})
        self.meta = self.meta.reset_index(drop=True).copy()
        if len(self.meta) != len(self.probs):
            raise TargetError(f"meta has {len(self.meta)} rows but probs has {len(self.probs)} targets.")
        if "kind" not in self.meta:
            self.meta["kind"] = "custom"
        if "target_id" not in self.meta:
            self.meta.insert(0, "target_id", [f"{k}-{i}" for i, k in enumerate(self.meta["kind"])])
        dup = self.meta["target_id"].duplicated()
        if dup.any():
            raise TargetError(f"target_id must be unique; repeated: {self.meta['target_id'][dup].tolist()[:5]}.")

    @classmethod
    def from_probs(cls, probs: Tensor, *, kind: str = "custom", renormalize: bool = False,
                   meta: pd.DataFrame | None = None) -> Targets:
        """Wrap user-made distributions (T, vocab) as Targets, validating (and optionally renormalising) them."""
        probs = validate_probs(probs, renormalize=renormalize)
        meta = pd.DataFrame({"kind": [kind] * len(probs)}) if meta is None else meta
        return cls(probs, meta)

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.probs.shape[1])

    @property
    def entropy(self) -> Tensor:
        """(T,) realised entropy in nats, computed in float64."""
        return metrics.entropy(self.probs.double())

    @property
    def ids(self) -> list[str]:
        return self.meta["target_id"].tolist()

    def frame(self) -> pd.DataFrame:
        """Per-target metadata as a DataFrame, with the realised `entropy_nats`."""
        df = self.meta.copy()
        df["entropy_nats"] = self.entropy.cpu().numpy()
        return df

    def __getitem__(self, idx) -> Targets:
        """A sub-batch: `idx` is an int, a slice, a list of ints, or a boolean mask."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, slice):
            rows = list(range(len(self)))[idx]
        elif isinstance(idx, Tensor) and idx.dtype == torch.bool:
            rows = idx.nonzero().flatten().tolist()
        else:
            rows = [int(i) for i in idx]
        return Targets(self.probs[rows], self.meta.iloc[rows])

    @staticmethod
    def concat(batches: Sequence[Targets]) -> Targets:
        """Join batches over the same vocabulary into one."""
        widths = {b.vocab_size for b in batches}
        if len(widths) != 1:
            raise TargetError(f"cannot concatenate targets of different vocabulary widths {sorted(widths)}.")
        dtype = batches[0].probs.dtype
        for b in batches[1:]:  # promote_types takes exactly two dtypes
            dtype = torch.promote_types(dtype, b.probs.dtype)
        return Targets(torch.cat([b.probs.to(dtype) for b in batches]),
                       pd.concat([b.meta for b in batches], ignore_index=True))

    def check_width(self, model) -> None:
        """Raise TargetError unless the targets' width equals the model's logits width."""
        width = logits_width(model)
        if self.vocab_size != width:
            raise TargetError(
                f"targets have width {self.vocab_size} but the model's logits width is {width}. "
                f"Build targets with vocab_size=logits_width(model) (= {width}; it can exceed "
                "len(tokenizer), the padding rows get zero mass), or map them across tokenizers "
                "with dplib.targets.map_vocab.")


# --------------------------------------------------------------------------------------------
# Tempering: softmax(β z) at a requested entropy, the whole batch at once.
# --------------------------------------------------------------------------------------------

SOLVER_TOLERANCE = 1e-10  # |H − h| the temperature solver reaches, nats (the contract is 1e-6)
ENTROPY_TOLERANCE = 1e-6  # |realised − requested| entropy every sampler guarantees, nats
_CHUNK_ELEMENTS = 1 << 23  # rows are processed in chunks of ~8M float64 entries (~64 MB a temporary)


def _row_chunks(n_rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _entropy_and_slope(z: Tensor, log_beta: Tensor) -> tuple[Tensor, Tensor]:
    """H(softmax(β z)) and −dH/d(log β) = β² Var_p(z), per row; z (B, n) float64, log_beta (B,)."""
    beta = torch.exp(log_beta).unsqueeze(-1)
    logp = torch.log_softmax(z * beta, dim=-1)
    p = torch.exp(logp)
    entropy = -(p * logp).sum(-1)
    mean = (p * z).sum(-1)
    var = ((p * z * z).sum(-1) - mean * mean).clamp(min=0.0)
    return entropy, var * beta.squeeze(-1) ** 2


def _solve_log_beta(z: Tensor, h: Tensor, tol: float = SOLVER_TOLERANCE, max_iter: int = 200) -> Tensor:
    """log β per row with |H(softmax(β z)) − h| ≤ tol: safeguarded Newton on log β.

    H is strictly decreasing in β (dH/dβ = −β Var_p(z)), from ln n at β = 0 to 0 as β → ∞, so a
    bracket [lo, hi] on log β always holds the root; a Newton step that leaves it is replaced by
    bisection. The start is the random-energy-model estimate H ≈ ln n − β²/2 (exact for small β
    and z ~ N(0, 1)), which leaves 3–10 iterations for most rows. Rows need 0 < h < ln n.
    """
    n = z.shape[-1]
    log_beta = 0.5 * torch.log((2.0 * (math.log(n) - h)).clamp(min=1e-30)).clamp(-40.0, 40.0)
    lo = torch.full_like(h, -60.0)  # β = e^-60: H = ln n up to 1e-52
    hi = torch.full_like(h, 60.0)   # β = e^60: H = 0 unless the top two z tie to 1e-24
    active = torch.arange(len(h))
    for _ in range(max_iter):
        if active.numel() == 0:
            return log_beta
        u = log_beta[active]
        entropy, slope = _entropy_and_slope(z[active], u)
        f = entropy - h[active]
        done = f.abs() <= tol
        lo[active] = torch.where(f > 0, u, lo[active])
        hi[active] = torch.where(f > 0, hi[active], u)
        step = u + f / slope
        off = ~torch.isfinite(step) | (step <= lo[active]) | (step >= hi[active])
        step = torch.where(off, 0.5 * (lo[active] + hi[active]), step)
        log_beta[active] = torch.where(done, u, step)
        active = active[~done]
    raise TargetError(f"the temperature solver did not reach |H − h| ≤ {tol} for rows "
                      f"{active.tolist()[:10]} in {max_iter} iterations (are some logits tied at the top?).")


def _temper(z: Tensor, h: Tensor, tol: float = SOLVER_TOLERANCE) -> Tensor:
    """(B, n) float64 logits, (B,) entropies in [0, ln n] → (B, n) float64 softmax(β z) with H = h.

    h = 0 gives the exact one-hot on argmax z, h = ln n the exact uniform distribution.
    """
    n = z.shape[-1]
    probs = torch.empty_like(z)
    for rows in _row_chunks(len(h), n):
        zc, hc = z[rows], h[rows]
        out = torch.empty_like(zc)
        one_hot = hc <= 0.0
        uniform = hc >= math.log(n)
        out[one_hot] = 0.0
        out[one_hot, zc[one_hot].argmax(-1)] = 1.0
        out[uniform] = 1.0 / n
        mid = ~(one_hot | uniform)
        if mid.any():
            log_beta = _solve_log_beta(zc[mid], hc[mid], tol)
            out[mid] = torch.softmax(zc[mid] * torch.exp(log_beta).unsqueeze(-1), dim=-1)
        probs[rows] = out
    return probs


def _check_entropies(entropies, width: int, name: str = "entropies") -> Tensor:
    h = torch.as_tensor(entropies, dtype=torch.float64).reshape(-1)
    if h.numel() == 0:
        raise TargetError(f"{name} is empty; pass at least one entropy in nats.")
    top = math.log(width)
    bad = ~torch.isfinite(h) | (h < 0) | (h > top)
    if bad.any():
        raise TargetError(f"{name} {h[bad].tolist()[:5]} are outside [0, ln {width}] = [0, {top:.6f}] nats; "
                          "an entropy over a vocabulary of that width must lie in this range "
                          "(entropy_grid(vocab_size, n) gives a valid grid).")
    return h


def _check_vocab(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise TargetError(f"vocab_size must be an int ≥ 2 (the model's logits width, logits_width(model)); "
                          f"got {vocab_size!r}.")
    return vocab_size


def _row_logits(seed: int, kind: str, index: int, n: int) -> Tensor:
    """z ~ N(0, 1) of length n, float64, a function of (seed, kind, index) only."""
    return torch.randn(n, generator=generator(derive_seed(seed, kind, index)), dtype=torch.float64)


def _store(probs64: Tensor, requested: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Cast to the storage dtype: float32 unless that moves some realised entropy by > 1e-6.

    float32 rounding moves H by at most 2⁻²⁴·(1 + H) to first order (< 8.1e-7 for |V| ≤ 262,144),
    and measured errors are ~1e-8; the check makes the guarantee unconditional.
    """
    if dtype is not None:
        out = probs64.to(dtype)
        err = (metrics.entropy(out.double()) - requested).abs().max().item()
        if err > ENTROPY_TOLERANCE:
            raise TargetError(f"storing targets as {dtype} moves their entropy by {err:.2e} nats "
                              f"(> {ENTROPY_TOLERANCE}); use dtype=torch.float64.")
        return out
    out = probs64.float()
    if (metrics.entropy(out.double()) - requested).abs().max().item() <= ENTROPY_TOLERANCE:
        return out
    log.info("float32 storage would miss the requested entropy by > %g nats; keeping float64", ENTROPY_TOLERANCE)
    return probs64


# --------------------------------------------------------------------------------------------
# Vanilla (random) targets.
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Outlier targets.
# --------------------------------------------------------------------------------------------

OUTLIER_MARGIN = 1e-6  # relative: an outlier of mass m/k "exceeds" probability p iff m/k > (1 + 1e-6)·p
_OUTLIER_XTOL = 1e-12  # end points of feasible ranges are located to this absolute precision (m, nats)
_CACHE_SIZE = 4096  # entries of each small memo below (cleared when full)
_QUANTILES: dict[int, Tensor] = {}  # n → the rest's logits (never modified)
_REST_TOP: dict[tuple[int, float], float] = {}  # (n, H_rest) → the rest's largest probability
_FEASIBLE: dict[tuple[int, float, int], tuple[tuple[float, float], ...]] = {}  # feasible_masses


def _memo(cache: dict, key, compute):
    if key not in cache:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[key] = compute()
    return cache[key]


def _binary_entropy(m: float) -> float:
    return -sum(x * math.log(x) for x in (m, 1.0 - m) if x > 0)


def _outlier_entropy_range(vocab_size: int, k: int, m: float) -> tuple[float, float]:
    """[min, max] total entropy of k tokens of total mass m and any rest, nats (outliers on top or not).

    H = H_b(m) + m ln k + (1 − m) H_rest with H_rest ∈ [0, ln(V − k)].
    """
    base = _binary_entropy(m) + (m * math.log(k) if m > 0 else 0.0)
    return base, base + (1.0 - m) * math.log(vocab_size - k)


def _rest_logits(n: int) -> Tensor:
    """The rest's logits: the n standard-normal quantiles Φ⁻¹((i − ½)/n), i = 1..n, ascending, float64.

    Shared and cached: never modify the returned tensor.
    """
    return _memo(_QUANTILES, n, lambda: torch.special.ndtri(
        (torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n))


def _rest_entropy(vocab_size: int, k: int, m: float, h: float) -> float:
    """H_rest = (h − H_b(m) − m ln k)/(1 − m), clamped to [0, ln(V − k)]; needs m < 1."""
    base, _ = _outlier_entropy_range(vocab_size, k, m)
    return min(max((h - base) / (1.0 - m), 0.0), math.log(vocab_size - k))


def _rest_distribution(n: int, h_rest: float) -> Tensor:
    """softmax(β z) over the n quantile logits z with entropy h_rest: (n,) float64, ascending.

    A deterministic function of (n, h_rest): the same solver as `vanilla`, |H − h_rest| ≤ 1e-10;
    h_rest = 0 gives the one-hot on the largest quantile, h_rest = ln n the uniform distribution.
    """
    return _temper(_rest_logits(n).unsqueeze(0), torch.tensor([h_rest], dtype=torch.float64))[0]


def _rest_top(n: int, h_rest: float) -> float:
    """The largest probability of `_rest_distribution(n, h_rest)` (memoised)."""
    return _memo(_REST_TOP, (n, h_rest), lambda: float(_rest_distribution(n, h_rest).max()))


def _outlier_gap(vocab_size: int, k: int, m: float, h: float) -> float:
    """g = m/k − (1 + OUTLIER_MARGIN)·(1 − m)·max_rest: > 0 iff every outlier exceeds every other token.

    max_rest is the rest's largest probability at H_rest = (h − H_b(m) − m ln k)/(1 − m) (clamped to
    [0, ln(V − k)]). m = 1 leaves the rest no mass: g = 1/k. m = 0 gives g < 0 (k tokens of
    probability 0 are not outliers).
    """
    if m >= 1.0:
        return 1.0 / k
    top = _rest_top(vocab_size - k, _rest_entropy(vocab_size, k, m, h))
    return m / k - (1.0 + OUTLIER_MARGIN) * (1.0 - m) * top


def _bisect(f, lo: float, hi: float, iters: int = 100) -> float:
    """The root of f on [lo, hi], f(lo) and f(hi) of opposite signs (f monotone there)."""
    flo = f(lo)
    if flo == 0 or f(hi) == 0:  # a root at an end (e.g. h = ln V, where the feasible set is one point)
        return lo if flo == 0 else hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (f(mid) > 0) == (flo > 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _first_positive(f, lo: float, hi: float, flo: float, fhi: float, xtol: float = _OUTLIER_XTOL) -> float:
    """For f non-decreasing with f(lo) = flo ≤ 0 < fhi = f(hi): a point x ≤ hi with f(x) > 0 verified
    and a point in [x − xtol, x) with f ≤ 0 (the sign change is located to xtol).

    The ITP method (Oliveira & Takahashi 2020): regula falsi, truncated towards the midpoint so that
    it jumps over the root, projected into a shrinking window round the midpoint, so it never needs
    more than one step beyond bisection's ⌈log2((hi − lo)/xtol)⌉ and ~10 when f is smooth. Each f
    is one tempering solve.
    """
    width0 = hi - lo
    if width0 <= xtol:
        return hi
    n_max = math.ceil(math.log2(width0 / xtol)) + 1
    kappa = 0.2 / width0
    for j in range(n_max + 10):  # ≤ n_max steps in exact arithmetic; the slack absorbs rounding
        width = hi - lo
        if width <= xtol:
            break
        mid = 0.5 * (lo + hi)
        radius = max(0.0, xtol * 2.0 ** (n_max - j - 1) - 0.5 * width)
        falsi = (lo * fhi - hi * flo) / (fhi - flo) if fhi != flo else mid
        delta = kappa * width * width
        toward = 1.0 if mid >= falsi else -1.0
        x = falsi + toward * delta if delta <= abs(mid - falsi) else mid
        if abs(x - mid) > radius:
            x = mid - toward * radius
        if not lo < x < hi:
            x = mid
        fx = f(x)
        if fx > 0:
            hi, fhi = x, fx
        else:
            lo, flo = x, fx
    return hi


def _entropy_feasible_masses(V: int, h: float, k: int) -> list[tuple[float, float]]:
    """The intervals of m for which H_b(m) + m ln k + (1 − m)·[0, ln(V − k)] contains h.

    Both ends of the entropy range, f_lo(m) = H_b(m) + m ln k and f_hi(m) = f_lo(m) + (1 − m) ln(V − k),
    are concave in m; f_hi peaks at m = k/V (value ln V), f_lo at m = k/(k + 1) (value ln(k + 1)).
    So {f_hi ≥ h} is one interval and {f_lo ≤ h} is [0, 1] minus at most one open interval: the
    set is at most two intervals, found by bisection on the monotone pieces.
    """
    def lo_f(m):
        return _outlier_entropy_range(V, k, m)[0] - h

    def hi_f(m):
        return _outlier_entropy_range(V, k, m)[1] - h

    peak = k / V
    if hi_f(peak) < 0:
        return []
    a = 0.0 if hi_f(0.0) >= 0 else _bisect(hi_f, 0.0, peak)
    b = 1.0 if hi_f(1.0) >= 0 else _bisect(hi_f, peak, 1.0)
    top = k / (k + 1)
    if lo_f(top) <= 0:  # f_lo never exceeds h
        allowed = [(0.0, 1.0)]
    else:
        c = _bisect(lo_f, 0.0, top)  # f_lo(0) = 0 ≤ h always
        allowed = [(0.0, c)] + ([(_bisect(lo_f, top, 1.0), 1.0)] if lo_f(1.0) <= 0 else [])
    out = [(max(a, x), min(b, y)) for x, y in allowed]
    return [(x, y) for x, y in out if x <= y]


def feasible_masses(vocab_size: int, entropy: float, k: int) -> list[tuple[float, float]]:
    """The intervals of outlier mass m ∈ [0, 1] for which outliers(vocab_size, entropy, k, m) exists.

    Feasible means both (1) the entropy condition: h ∈ H_b(m) + m ln k + (1 − m)·[0, ln(V − k)],
    and (2) outliers on top: m/k > (1 + OUTLIER_MARGIN)·(1 − m)·max_rest(m), where max_rest(m) is
    the largest probability of the rest's distribution at H_rest(m) = (h − H_b(m) − m ln k)/(1 − m)
    (a function of (V − k, H_rest) only: `outliers` tempers fixed normal quantiles).

    Method. (1) is at most two intervals, found by bisection (`_entropy_feasible_masses`). For (2): with
    r = m / (k(1 − m)), (2) says H_rest > H_c, the entropy at which the rest's largest probability
    is r/(1 + margin); that is h > B(m) = H_b(m) + m ln k + (1 − m)·H_c(m). B is decreasing in m:
    dB/dm = −ln r' − H_c + (1 − m)·dH_c/dm, where r' = r/(1 + margin), H_c ≥ −ln r' (entropy ≥
    min-entropy) and H_c falls as r grows. So within the entropy-feasible set (2) is false below
    one switch mass m* and true above it: the feasible set is a single interval [max(a, m*), b]
    (or empty), and the lower entropy interval, when there are two, never survives. Each interval
    of (1) is checked at its right end, and m* located by an ITP search (bisection-safeguarded
    regula falsi, `_first_positive`) on the sign of g(m) = m/k − (1 + margin)(1 − m) max_rest(m), to
    1e-12 in m; the reported left end is a mass where g > 0 was verified, so both ends of every
    reported range are accepted by `outliers`. (Near the left end, masses within ~1e-9 relative of
    it may be judged either way by the 1e-10 entropy tolerance of the rest's solver.)
    Feasible ranges are non-empty exactly for ln k ≤ h < ln V (H ≥ −ln(m/k) ≥ ln k when the
    outliers are on top; h = ln k only with m = 1; h = ln V only for the uniform distribution,
    which has no outliers). m = 0 is never feasible.

    Results are memoised per (vocab_size, entropy, k); a new call costs ~10–20 tempering solves of
    one (V − k)-wide row (~0.1 s at V = 49,152, ~0.5 s at 262,144 on a 2-core CPU).
    """
    V = _check_vocab(int(vocab_size) if isinstance(vocab_size, np.integer) else vocab_size)
    k = int(k) if isinstance(k, np.integer) else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < V:
        raise TargetError(f"k must be an int with 1 ≤ k < vocab_size={V}; got {k!r}.")
    h = float(entropy)
    return list(_memo(_FEASIBLE, (V, h, k), lambda: _feasible_masses(V, h, k)))


def _feasible_masses(V: int, h: float, k: int) -> tuple[tuple[float, float], ...]:
    out = []
    for x, y in _entropy_feasible_masses(V, h, k):
        gy = _outlier_gap(V, k, y, h)
        if gy <= 0:  # g's sign is monotone in m: no mass of this interval puts the outliers on top
            continue
        gx = _outlier_gap(V, k, x, h)
        left = x if gx > 0 else _first_positive(lambda m: _outlier_gap(V, k, m, h), x, y, gx, gy)
        out.append((left, y))
    return tuple(out)


def _outlier_entropies(vocab_size: int, k: int, m: float) -> tuple[float, float] | None:
    """(lo, hi): the entropies at which k outliers of mass m are feasible form [lo, hi] up to
    1e-12·max(1, hi) (lo is feasible, B(m) < lo ≤ B(m) + that); None if no entropy is.

    g grows with h (H_rest grows, max_rest falls), so the set is an interval ending at the entropy
    range's top.
    """
    base, top = _outlier_entropy_range(vocab_size, k, m)
    gt = _outlier_gap(vocab_size, k, m, top)
    if gt <= 0:
        return None
    gb = _outlier_gap(vocab_size, k, m, base)
    if gb > 0:
        return base, top
    return _first_positive(lambda h: _outlier_gap(vocab_size, k, m, h), base, top, gb, gt,
                           xtol=_OUTLIER_XTOL * max(1.0, top)), top


def _inward(lo: float, hi: float, digits: int = 6) -> str:
    """"[lo, hi]" with ends rounded inwards (lo up, hi down) to `digits` significant digits, or more
    where the interval is too narrow for that: every mass printed in an error message is feasible."""
    import decimal

    for p in range(digits, 18):
        a = float(decimal.Context(prec=p, rounding=decimal.ROUND_CEILING).create_decimal(lo))
        b = float(decimal.Context(prec=p, rounding=decimal.ROUND_FLOOR).create_decimal(hi))
        if lo <= a <= b <= hi:
            return f"[{a:.{p}g}, {b:.{p}g}]"
    return f"[{lo!r}, {hi!r}]"


def _format_masses(V: int, h: float, k: int) -> str:
    ranges = feasible_masses(V, h, k)
    if ranges:
        return " ∪ ".join(_inward(x, y) for x, y in ranges)
    return (f"none (k={k} outliers on top need ln k ≤ h < ln V, i.e. h ∈ [{math.log(k):.6f}, "
            f"{math.log(V):.6f}), h = ln k only with m = 1)")


def outliers(vocab_size: int, entropy, k: int, mass: float, *, seed: int = 0,
             tokens: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> Targets:
    """Targets in which k outlier tokens share total mass m, each more likely than every other token,
    and the rest is tempered to total entropy h.

    Each outlier gets m/k. The other n = V − k tokens carry 1 − m as softmax(β z), where z are the
    n standard-normal quantiles Φ⁻¹((i − ½)/n), i = 1..n, placed on the rest tokens in a seeded
    random order, and β is solved so that H = H_b(m) + m ln k + (1 − m) H_rest equals h exactly
    (|H − h| ≤ 1e-6 realised; the solver reaches 1e-10). The rest's sorted distribution is thus a
    function of (n, H_rest) alone, and so is whether the outliers are on top.

    Feasibility (see `feasible_masses`, which reports the feasible masses): h must be reachable,
    h ∈ H_b(m) + m ln k + (1 − m)·[0, ln n], AND the outliers must be on top: m/k > (1 + 1e-6)·
    (1 − m)·max_rest, "exceeds" with a relative margin OUTLIER_MARGIN = 1e-6 so that the order
    survives float32 storage (2⁻²⁴ ≈ 6e-8 relative rounding per entry). Consequences: m = 0 is
    never feasible (k tokens of probability 0 are not outliers); m = 1 needs h = ln k (the rest
    then has zero mass); ln k ≤ h < ln V for any m to exist (h = ln V is only the uniform one).

    Args:
        vocab_size: the model's logits width.
        entropy: a float or a sequence of T entropies (nats); one target per entropy.
        k: number of outlier tokens, 1 ≤ k < vocab_size.
        mass: their total mass m ∈ (0, 1].
        seed: target i draws its outlier tokens (unless given) and then the permutation placing the
            rest's quantile logits from derive_seed(seed, "outlier", i): a function of (seed, i)
            (and its own entropy) only.
        tokens: the k outlier token ids, the same for every target (default: random per target).
        dtype: storage dtype, as in `vanilla`.

    Raises TargetError for an infeasible (h, k, m), stating the entropies that mass allows and the
    feasible ranges of m at each offending h.
    Returns: Targets with meta target_id "outlier-k<k>-m<m>-s<seed>-<i>", kind "outlier", k, mass,
        requested_entropy_nats, seed, index, outlier_tokens (list of ids), outliers_on_top (whether
        the smallest stored outlier probability exceeds the largest other one: always True).
    """
    V = _check_vocab(vocab_size)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < V:
        raise TargetError(f"k must be an int with 1 ≤ k < vocab_size={V}; got {k!r}.")
    if not (isinstance(mass, (int, float)) and math.isfinite(mass) and 0.0 <= mass <= 1.0):
        raise TargetError(f"mass must be a total probability in [0, 1]; got {mass!r}.")
    m = float(mass)
    h = _check_entropies(entropy, V, "entropy")
    if tokens is not None:
        tokens = [int(t) for t in tokens]
        if len(tokens) != k or len(set(tokens)) != k or not all(0 <= t < V for t in tokens):
            raise TargetError(f"tokens must be {k} distinct ids in [0, {V}); got {tokens[:10]}.")
    base, top = _outlier_entropy_range(V, k, m)
    slack = 1e-12 * max(1.0, top)
    values = sorted(set(h.tolist()))
    bad = [hv for hv in values if not base - slack <= hv <= top + slack or _outlier_gap(V, k, m, hv) <= 0]
    if bad:
        span = _outlier_entropies(V, k, m)
        if span is not None:
            allowed = f"the entropy must lie in {_inward(*span)} nats"
        elif m == 0:
            allowed = "no entropy is feasible: with m = 0 the k tokens have probability 0"
        else:
            allowed = (f"no entropy is feasible: m/k ≤ (1 − m)/(V − k), so even a uniform rest is at "
                       f"least as likely as each outlier (m must exceed about k/V = {k / V:.3g})")
        lines = [f"h={hv:.6g}: m ∈ {_format_masses(V, hv, k)}" for hv in bad[:5]]
        raise TargetError(
            f"outliers(k={k}, mass={m}) is infeasible for entropies {bad[:5]}: each outlier (mass m/k) "
            f"must exceed every other token (by a relative {OUTLIER_MARGIN:g}) at total entropy h; for "
            f"this (k, m) {allowed}. Feasible masses: " + "; ".join(lines) + ".")

    n_rest = V - k
    rest_sorted = {hv: (_rest_distribution(n_rest, _rest_entropy(V, k, m, hv)) if m < 1.0
                        else torch.zeros(n_rest, dtype=torch.float64)) for hv in values}
    probs = torch.empty(len(h), V, dtype=torch.float64)
    outlier_ids, rest_masks = [], []
    for i, hv in enumerate(h.tolist()):
        g = generator(derive_seed(seed, "outlier", i))
        ids = torch.tensor(tokens) if tokens is not None else torch.randperm(V, generator=g)[:k]
        order = torch.randperm(n_rest, generator=g)
        rest = torch.ones(V, dtype=torch.bool)
        rest[ids] = False
        probs[i, ids] = m / k
        probs[i, rest] = (1.0 - m) * rest_sorted[hv][order]
        outlier_ids.append(sorted(ids.tolist()))
        rest_masks.append(rest)
    del rest_sorted
    stored = _store(probs, h, dtype)
    on_top = [bool(stored[i, ids].min() > stored[i, rest].max())
              for i, (ids, rest) in enumerate(zip(outlier_ids, rest_masks, strict=True))]
    if not all(on_top):
        raise TargetError(f"storing outlier targets as {stored.dtype} ties an outlier with another token "
                          f"(rows {[i for i, o in enumerate(on_top) if not o][:10]}); use dtype=torch.float64.")
    meta = pd.DataFrame({
        "target_id": [f"outlier-k{k}-m{m:g}-s{seed}-{i}" for i in range(len(h))],
        "kind": "outlier", "k": k, "mass": m, "requested_entropy_nats": h.numpy(), "seed": seed,
        "index": range(len(h)), "outlier_tokens": outlier_ids, "outliers_on_top": on_top})
    return Targets(stored, meta)


# --------------------------------------------------------------------------------------------
# LM-generated and reference targets.
# --------------------------------------------------------------------------------------------


def _source_name(model) -> str | None:
    return (getattr(model, "dplib_source", None) or {}).get("name")


@torch.no_grad()
def next_token_probs(model, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> Tensor:
    """The model's next-token distribution after each token sequence; (n, logits width) float32.

    Sequences are batched only with others of the same length (up to `batch_size` per forward pass),
    so no padding is ever fed: each row is exactly its own forward pass, for every architecture
    (padding needs position ids and masks that not every family takes). Only the last position
    reaches the LM head (`lm.next_token_logprobs`).
    """
    if any(len(s) == 0 for s in sequences):
        raise TargetError("a context is empty; every context needs at least one token (e.g. the BOS token).")
    seqs = [list(map(int, s)) for s in sequences]
    longest = max(map(len, seqs), default=0)
    lm.check_length(model, longest, "a context")
    lm.check(model)
    device = next(model.parameters()).device
    head = lm.output_layer(model)
    out = torch.empty(len(seqs), logits_width(model), dtype=torch.float32)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = torch.tensor([seqs[i] for i in chunk], device=device)
            logprobs = lm.next_token_logprobs(model, lm.embed(model, ids), head=head).double()
            probs = torch.exp(logprobs)
            out[chunk] = (probs / probs.sum(-1, keepdim=True)).float().cpu()
    return out


def _corpus_documents(corpus) -> tuple[list[str], list[str]]:
    """(names, texts) of the corpus: None → pydoc_data.topics; a path → that file; a list → its strings."""
    if corpus is None:
        from pydoc_data.topics import topics  # Python's own documentation, shipped with the stdlib

        names = sorted(topics)
        return names, [topics[n] for n in names]
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise TargetError(f"corpus {str(corpus)!r} is not a file; pass a path to a UTF-8 text file, "
                              "or a list of strings for literal text.")
        return [path.name], [path.read_text(encoding="utf-8")]
    texts = list(corpus)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TargetError("corpus must be None (Python's docs), a path to a text file, or a non-empty list of strings.")
    return [f"doc{i}" for i in range(len(texts))], texts


def from_model(model, tokenizer, n: int, *, corpus=None, seed: int = 0, sample: bool = False,
               context_tokens: tuple[int, int] = (8, 64), prefix: str = "bos", batch_size: int = 16) -> Targets:
    """The source model's next-token distributions at n seeded positions of a corpus.

    Args:
        model, tokenizer: the source LM (its logits width is the targets' width).
        n: number of targets.
        corpus: None for the English prose of Python's documentation (`pydoc_data.topics`, read at
            run time), a path to a UTF-8 text file, or a list of strings.
        seed: target i's context length and position come from derive_seed(seed, "lm", i), so
            they depend on (seed, i) only; with `sample=True` the text is sampled with
            derive_seed(seed, "lm-sample").
        sample: contexts are text sampled from the model itself (special tokens and padding rows
            excluded), starting from the prompt frame's prefix (else the EOS token).
        context_tokens: (min, max) context length in tokens, both inclusive, drawn uniformly.
        prefix: the prompt frame's prefix (`lm.prompt_frame`): "bos" = the tokenizer's BOS token,
            "" = none, other text = that text. The same frame the optimisers put before a prompt.
        batch_size: contexts per forward pass.

    A context is a window of the tokenised document preceded by the frame's prefix ids (the BOS
    token by default, as before every prompt); the target is the model's distribution for the token
    that follows it (the document's real next token is recorded as `next_token_id`). Padding rows
    beyond len(tokenizer) keep whatever mass the model gives them: these are the model's own
    distributions, so a zero-KL prompt exists.
    Returns: Targets (float32) with meta target_id "lm-<source>-s<seed>-<i>", kind "lm",
        source_model, context (text), context_ids (the exact ids fed, prefix included), position
        (index of the predicted token in its document; in the sample for sample=True), document,
        next_token_id, seed, index.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TargetError(f"n must be a positive int, got {n!r}.")
    lo, hi = (int(x) for x in context_tokens)
    if not 1 <= lo <= hi:
        raise TargetError(f"context_tokens must be (min, max) with 1 ≤ min ≤ max; got {context_tokens!r}.")
    prefix_ids = list(lm.prompt_frame(model, tokenizer, prefix).prefix_ids)
    lengths = [lo + int(torch.randint(hi - lo + 1, (1,), generator=generator(derive_seed(seed, "lm", i))))
               for i in range(n)]
    if sample:
        prefix_ids, docs = _sampled_documents(model, tokenizer, n, max(lengths) + 1, seed, prefix_ids)
        doc_names, picks = [f"sample{i}" for i in range(n)], [(i, 0) for i in range(n)]
    else:
        doc_names, texts = _corpus_documents(corpus)
        docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
        picks = [_pick_window(docs, length, derive_seed(seed, "lm", i, "position"))
                 for i, length in enumerate(lengths)]
    contexts, rows = [], []
    for (d, start), length in zip(picks, lengths, strict=True):
        window = docs[d][start:start + length]
        contexts.append(prefix_ids + window)
        rows.append({"context": tokenizer.decode(window), "position": start + length,
                     "document": doc_names[d], "next_token_id": docs[d][start + length]})
    probs = next_token_probs(model, contexts, batch_size=batch_size)
    source = _source_name(model) or "model"
    meta = pd.DataFrame(rows)
    meta.insert(0, "target_id", [f"lm-{source}{'-sampled' if sample else ''}-s{seed}-{i}" for i in range(n)])
    meta.insert(1, "kind", "lm")
    meta.insert(2, "source_model", _source_name(model))
    meta["context_ids"] = [list(c) for c in contexts]
    meta["sampled"], meta["seed"], meta["index"] = sample, seed, range(n)
    return Targets(probs, meta)


def _pick_window(docs: list[list[int]], length: int, seed: int) -> tuple[int, int]:
    """(document, start) of a window of `length` tokens followed by a real next token, uniform over the corpus."""
    counts = torch.tensor([max(0, len(d) - length) for d in docs], dtype=torch.long)
    total = int(counts.sum())
    if total == 0:
        raise TargetError(f"no document of the corpus has more than {length} tokens; pass a longer corpus "
                          "or a smaller context_tokens.")
    r = int(torch.randint(total, (1,), generator=generator(seed)))
    d = int(torch.searchsorted(counts.cumsum(0), torch.tensor(r), right=True))
    return d, r - int(counts[:d].sum())


@torch.no_grad()
def _sampled_documents(model, tokenizer, n: int, length: int, seed: int, prefix: list[int]):
    """(start ids, n sequences of `length` tokens sampled from the model after them); KV-cached.

    The start is the frame's prefix ids, else the EOS token.
    """
    start = prefix or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if not start:
        raise TargetError("sample=True needs a start token: the tokenizer has no BOS or EOS token; "
                          "pass prefix='some text'.")
    lm.check_length(model, len(start) + length, "a sampled context")
    device = next(model.parameters()).device
    allowed = lm.allowed_tokens(tokenizer, logits_width(model)).to(device)
    g = generator(derive_seed(seed, "lm-sample"))
    ids, past, sampled = torch.tensor([start] * n, device=device), None, []
    for _ in range(length):
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float().masked_fill(~allowed, -math.inf)
        ids = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).to(device)
        sampled.append(ids)
    return start, torch.cat(sampled, dim=1).cpu().tolist()


def reference(model, tokenizer, contexts: Sequence[str] | Sequence[Sequence[int]], *,
              prefix: str = "bos", batch_size: int = 16) -> Targets:
    """The model's own next-token distribution after each context: a zero-KL hard prompt exists.

    Args:
        contexts: strings, encoded in the prompt frame exactly as a prompt text is
            (`lm.prompt_frame(model, tokenizer, prefix).encode(text)`: the BOS token, then the
            text), so `score_prompt_text(model, tokenizer, contexts, targets)` gives KL 0; or lists
            of token ids (used as they are).
        prefix: the frame's prefix ("bos" by default, as for the optimisers).
    Returns: Targets (float32) with meta target_id "reference-<i>-<hash>", kind "reference",
        source_model, context (text), context_ids (the exact ids fed).
    """
    contexts = list(contexts)
    if not contexts:
        raise TargetError("contexts is empty; pass a list of strings or of token-id lists.")
    if all(isinstance(c, str) for c in contexts):
        frame = lm.prompt_frame(model, tokenizer, prefix)
        ids = [frame.encode(c) for c in contexts]
    elif all(isinstance(c, (list, tuple, Tensor)) for c in contexts):
        ids = [[int(t) for t in c] for c in contexts]
    else:
        raise TargetError("contexts must be all strings or all lists of token ids.")
    width = logits_width(model)
    for c in ids:
        if any(not 0 <= t < width for t in c):
            raise TargetError(f"context ids {c[:10]} fall outside [0, {width}).")
    probs = next_token_probs(model, ids, batch_size=batch_size)
    digest = [hashlib.sha256(json.dumps(c).encode()).hexdigest()[:8] for c in ids]
    meta = pd.DataFrame({
        "target_id": [f"reference-{i}-{d}" for i, d in enumerate(digest)], "kind": "reference",
        "source_model": _source_name(model), "context": [tokenizer.decode(c) for c in ids],
        "context_ids": ids})
    return Targets(probs, meta)


# --------------------------------------------------------------------------------------------
# Cross-tokenizer mapping.
# --------------------------------------------------------------------------------------------

MAP_METHODS = ("first_token", "exact")
_MAP_FORMAT = 2  # bump when the way maps are built changes: old disk entries are then ignored
_MAPS: dict[str, VocabMap] = {}  # in-memory cache, keyed like the disk cache


@dataclass(frozen=True)
class VocabMap:
    """A byte-level map from a source vocabulary to a target vocabulary.

    It is the sparse (source_width, target_vocab_size) 0/1 matrix with at most one 1 per row,
    stored as `dest`: (source_width,) int64, the target id that source token v's mass goes to,
    or −1 where the mass is lost. Between two different tokenizers the lost rows are the source's
    special tokens, its padding rows (≥ len(source_tokenizer)), tokens without bytes, tokens whose
    target token is special or ≥ target_vocab_size, and with "exact" tokens whose bytes are not
    one target token; from a tokenizer onto itself nothing is lost but padding rows beyond
    target_vocab_size (see `vocab_map`).
    """

    dest: Tensor
    target_vocab_size: int
    method: str
    key: str

    @property
    def source_width(self) -> int:
        return int(self.dest.shape[0])

    def matrix(self) -> Tensor:
        """The map as a sparse COO (source_width, target_vocab_size) float64 tensor."""
        rows = (self.dest >= 0).nonzero().flatten()
        return torch.sparse_coo_tensor(torch.stack([rows, self.dest[rows]]),
                                       torch.ones(len(rows), dtype=torch.float64),
                                       (self.source_width, self.target_vocab_size),
                                       check_invariants=True).coalesce()

    def apply(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """(T, source_width) probabilities → ((T, target_vocab_size) float64 mapped mass, (T,) mass lost).

        The mass lost is 1 − the mapped mass, clamped to [0, 1], for rows with mass on a lost
        source token, and exactly 0 for the others (a row that loses nothing is copied
        unchanged, whatever rounding its sum carries).
        """
        kept = self.dest >= 0
        probs = probs.detach().cpu()
        mapped = torch.zeros(len(probs), self.target_vocab_size, dtype=torch.float64)
        mapped.index_add_(1, self.dest[kept], probs[:, kept].double())
        dropped = (probs[:, ~kept] > 0).any(-1)
        lost = torch.where(dropped, (1.0 - mapped.sum(-1)).clamp(0.0, 1.0), torch.zeros((), dtype=torch.float64))
        return mapped, lost


def _tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides how the tokenizer decodes and encodes (memoised on it)."""
    memo = getattr(tokenizer, "_dplib_fingerprint", None)
    if memo is not None and memo[0] == len(tokenizer):
        return memo[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the full tokenizer.json: vocab, merges, normaliser, decoder, added tokens
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = sorted(lm.special_ids(tokenizer))
    digest = hashlib.sha256((type(tokenizer).__name__ + text + json.dumps(specials)).encode()).hexdigest()
    try:
        tokenizer._dplib_fingerprint = (len(tokenizer), digest)
    except AttributeError:  # some tokenizer wrappers refuse new attributes; then we just recompute
        pass
    return digest


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes → printable-unicode table, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + len(chars) - len(printable)
    return {chr(c): b for b, c in chars.items()}


_GPT2_BYTES = _gpt2_unicode_to_byte()


def _bytes_reader(tokenizer) -> tuple[str, str, bool]:
    """How to read a token's raw bytes from its vocabulary string: (kind, space marker, byte fallback).

    Decided from the tokenizer.json's decoder, which is what turns tokens back into bytes. kind is
    "byte_level" (the decoder, or with no decoder the pre-tokenizer, is ByteLevel: GPT-2, SmolLM2,
    Llama-3, dplib's tiny tokenizers), "sentencepiece" (the decoder turns a marker such as "▁"
    into a space, by Metaspace or Replace, and/or reads "<0xNN>" pieces as bytes, by ByteFallback:
    Gemma, Llama-2, T5) or "decode" (anything else: each token is decoded alone).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "decode", "", False
    try:
        spec = json.loads(backend.to_str())
    except (TypeError, ValueError, AttributeError):
        return "decode", "", False

    def parts(node, key):
        node = node or {}
        return [p or {} for p in node.get(key, [])] if node.get("type") == "Sequence" else [node]

    decoders = parts(spec.get("decoder"), "decoders")
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types or (types == {None} and "ByteLevel" in {
            p.get("type") for p in parts(spec.get("pre_tokenizer"), "pretokenizers")}):
        return "byte_level", "", False
    marker = ""
    for d in decoders:
        if d.get("type") == "Metaspace":
            marker = d.get("replacement", "\u2581")
        elif d.get("type") == "Replace" and d.get("content") == " " and isinstance(d.get("pattern"), dict):
            marker = d["pattern"].get("String") or marker
    if marker or "ByteFallback" in types:
        return "sentencepiece", marker, "ByteFallback" in types
    return "decode", "", False


def _token_bytes(tokenizer, n: int) -> tuple[list[bytes | None], list[bool]]:
    """The raw bytes of tokens 0..n−1 (None where unknown) and which are byte-fallback pieces "<0xNN>".

    Read from the vocabulary strings as the tokenizer's decoder reads them (see `_bytes_reader`),
    so a byte-level token that is part of a UTF-8 character keeps its bytes (it decodes alone to
    U+FFFD). For a tokenizer of another kind each token is decoded alone, and tokens that decode
    to U+FFFD or to nothing get None.
    """
    kind, marker, pieces = _bytes_reader(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(n))) if kind != "decode" else []
    fallback = [False] * n
    if kind == "byte_level":
        def read(s):  # as tokenizers' ByteLevel decoder: a string with a char outside the table is literal
            try:
                return bytes(_GPT2_BYTES[c] for c in s)
            except KeyError:
                return s.encode("utf-8")
        out = [None if s is None else read(s) for s in strings]
    elif kind == "sentencepiece":
        out = []
        for i, s in enumerate(strings):
            if s is None:
                out.append(None)
            elif pieces and len(s) == 6 and s.startswith("<0x") and s.endswith(">") \
                    and all(c in "0123456789abcdefABCDEF" for c in s[3:5]):
                out.append(bytes([int(s[3:5], 16)]))
                fallback[i] = True
            else:
                out.append((s.replace(marker, " ") if marker else s).encode("utf-8"))
    else:
        log.warning("cannot read raw token bytes from a %s; decoding each token alone (tokens that are "
                    "part of a UTF-8 character are lost)", type(tokenizer).__name__)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        out = [t.encode("utf-8") if t and "\ufffd" not in t else None for t in texts]
    return out, fallback


def _utf8_prefix(data: bytes) -> tuple[str, bool]:
    """(the longest prefix of `data` that is valid UTF-8, as text; whether that is all of it)."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError as e:
        return data[:e.start].decode("utf-8"), False


def vocab_map(source_tokenizer, target_tokenizer, *, source_width: int, target_vocab_size: int,
              method: str = "first_token") -> VocabMap:
    """The (cached) byte-level map from a source vocabulary of width `source_width` to a target one.

    The same tokenizer on both sides (equal fingerprints) gives the identity on every row below
    min(source_width, target_vocab_size), special tokens and padding rows included; wider target
    rows get nothing. Otherwise each source token v < len(source_tokenizer) is placed by its raw
    bytes (read from its vocabulary string: GPT-2 byte-level, or SentencePiece "▁" and "<0xNN>"
    byte fallback; see `_token_bytes`):
    (a) onto a non-special target token with exactly these bytes: v itself if it qualifies, else
        the lowest id among regular tokens, else among byte-fallback pieces (the token the target
        tokenizer itself produces for these bytes);
    (b) else, if the bytes are valid UTF-8, its text is encoded by the target tokenizer (batched,
        without special tokens): "first_token" takes the first token, "exact" only a single token;
    (c) else (part of a UTF-8 character, e.g. the lone byte 0xE2) "first_token" takes the first
        token of its longest valid UTF-8 prefix, or where that is empty the target token that is
        exactly its first byte (byte-level and byte-fallback vocabularies have one per byte);
        "exact" loses it.
    Lost (dest −1): the source's special tokens, padding rows ≥ len(source_tokenizer), tokens
    with no bytes, tokens whose target token is special or ≥ target_vocab_size, and as above.

    Cached in memory and on disk under `cache_dir()/vocab_maps/<key>.npy` (written atomically),
    keyed by a hash of both tokenizers (their full tokenizer.json), the method, both widths and
    the map format. If the disk cache cannot be written, one warning is logged and the map is kept
    in memory only.
    """
    if method not in MAP_METHODS:
        raise TargetError(f"method={method!r} is not a mapping method; use one of {MAP_METHODS}.")
    from .models import cache_dir, write_cache_file

    key = hashlib.sha256("|".join(map(str, [
        _tokenizer_fingerprint(source_tokenizer), _tokenizer_fingerprint(target_tokenizer), method,
        source_width, target_vocab_size, _MAP_FORMAT])).encode()).hexdigest()[:32]
    if key in _MAPS:
        return _MAPS[key]
    path = cache_dir() / "vocab_maps" / f"{key}.npy"
    dest = None
    if path.is_file():
        try:
            dest = torch.from_numpy(np.load(path)).long()
            if dest.shape != (source_width,):
                dest = None
        except (OSError, ValueError):
            dest = None
        if dest is None:
            log.warning("vocab map cache entry %s is unreadable; rebuilding it", path)
    if dest is None:
        dest = _build_dest(source_tokenizer, target_tokenizer, source_width, target_vocab_size, method)
        write_cache_file("vocab_maps", path.name, lambda f: np.save(f, dest.numpy().astype(np.int32)))
    _MAPS[key] = VocabMap(dest, target_vocab_size, method, key)
    return _MAPS[key]


def _build_dest(source_tokenizer, target_tokenizer, source_width: int, target_vocab_size: int,
                method: str) -> Tensor:
    """(source_width,) int64 target ids, −1 where lost: the rules of `vocab_map`."""
    dest = torch.full((source_width,), -1, dtype=torch.long)
    if _tokenizer_fingerprint(source_tokenizer) == _tokenizer_fingerprint(target_tokenizer):
        m = min(source_width, target_vocab_size)
        dest[:m] = torch.arange(m)
        log.info("vocab map (%s): the same tokenizer on both sides, identity on %d of %d rows",
                 method, m, source_width)
        return dest
    n = min(len(source_tokenizer), source_width)
    m = min(len(target_tokenizer), target_vocab_size)
    src_bytes, _ = _token_bytes(source_tokenizer, n)
    tgt_bytes, tgt_fallback = _token_bytes(target_tokenizer, m)
    src_special, tgt_special = lm.special_ids(source_tokenizer), lm.special_ids(target_tokenizer)
    by_bytes: dict[bytes, int] = {}
    for pieces in (False, True):  # regular tokens first, then byte-fallback pieces; lowest id first
        for t in range(m):
            if tgt_fallback[t] == pieces and tgt_bytes[t] and t not in tgt_special:
                by_bytes.setdefault(tgt_bytes[t], t)
    texts: dict[int, str] = {}  # source id → text to encode with the target tokenizer
    counts = dict.fromkeys(("bytes", "text", "prefix", "first byte"), 0)
    for v in range(n):
        data = src_bytes[v]
        if v in src_special or not data:
            continue
        t = v if v < m and tgt_bytes[v] == data and v not in tgt_special else by_bytes.get(data)
        if t is not None:
            dest[v] = t
            counts["bytes"] += 1
            continue
        text, whole = _utf8_prefix(data)
        if whole or (method == "first_token" and text):
            texts[v] = text
        elif method == "first_token" and (t := by_bytes.get(data[:1])) is not None:
            dest[v] = t
            counts["first byte"] += 1
    items = list(texts.items())
    encoded = target_tokenizer([s for _, s in items], add_special_tokens=False)["input_ids"] if items else []
    for (v, text), ids in zip(items, encoded, strict=True):
        if not ids or (method == "exact" and len(ids) != 1):
            continue
        t = ids[0]
        if t not in tgt_special and 0 <= t < target_vocab_size:
            dest[v] = t
            counts["text" if text.encode("utf-8") == src_bytes[v] else "prefix"] += 1
    log.info("vocab map (%s): %d of %d source tokens placed (by bytes %d, by text %d, partial UTF-8 by "
             "prefix %d, by first byte %d)", method, int((dest >= 0).sum()), source_width, counts["bytes"],
             counts["text"], counts["prefix"], counts["first byte"])
    return dest


def map_vocab(targets: Targets, source_tokenizer, target_tokenizer, target_vocab_size: int,
              method: str = "first_token") -> Targets:
    """Move targets from a source vocabulary onto a target model's vocabulary, by token bytes.

    See `vocab_map` for how each source token is placed: from a tokenizer onto itself the map is
    the identity (probs unchanged, mass_lost 0); across tokenizers the source's special tokens
    and padding rows lose their mass, and so, with "exact", do tokens whose bytes are not one
    target token. Mass that cannot be placed is recorded per target as `mass_lost` (in [0, 1],
    exactly 0 where the target has no mass on a lost token) and the rest is renormalised to sum
    to 1 (rows that lose nothing are copied unchanged).

    Args:
        targets: (T, source width) Targets over the source tokenizer's vocabulary.
        target_vocab_size: the target model's logits width (`logits_width(target_model)`).
        method: "first_token" or "exact".
    Returns: Targets (T, target_vocab_size), same dtype; meta keeps every source column (kind
        included) with target_id "mapped-<source id>", plus mapped=True, map_method, mass_lost,
        source_target_id, source_vocab_size; `context_ids` (source-tokenizer ids) is renamed
        `source_context_ids`.
    Raises TargetError when a target loses all of its mass.
    """
    if not isinstance(targets, Targets):
        raise TargetError(f"targets must be a Targets batch, got {type(targets).__name__}.")
    target_vocab_size = _check_vocab(target_vocab_size)
    if len(target_tokenizer) > target_vocab_size:
        raise TargetError(f"target_vocab_size={target_vocab_size} is smaller than the target tokenizer "
                          f"({len(target_tokenizer)} tokens); pass logits_width(target_model).")
    vmap = vocab_map(source_tokenizer, target_tokenizer, source_width=targets.vocab_size,
                     target_vocab_size=target_vocab_size, method=method)
    mapped, lost = vmap.apply(targets.probs)
    empty = lost >= 1.0 - 1e-12
    if empty.any():
        raise TargetError(f"targets {targets.meta['target_id'][empty.numpy()].tolist()[:5]} lose all their mass "
                          f"in the mapping ({method}): they sit on special tokens or on tokens the target "
                          "tokenizer cannot place; try method='first_token' or drop them.")
    scale = torch.where(lost > 0, mapped.sum(-1), torch.ones((), dtype=torch.float64))
    probs = (mapped / scale.unsqueeze(-1)).to(targets.probs.dtype)
    meta = targets.meta.copy()
    meta.insert(0, "source_target_id", meta.pop("target_id"))
    meta.insert(0, "target_id", ["mapped-" + t for t in meta["source_target_id"]])
    if "context_ids" in meta:
        meta = meta.rename(columns={"context_ids": "source_context_ids"})
    meta["mapped"], meta["map_method"] = True, method
    meta["mass_lost"], meta["source_vocab_size"] = lost.numpy(), targets.vocab_size
    return Targets(probs, meta)

"""Distances between distributions: pure tensor functions, batched over rows, in log space.

Every function takes two batches of distributions over the last dimension, shape (..., vocab),
and returns one value per row, shape (...,), in nats where it has a unit. Inputs are
probabilities by default; pass `log_p=True` / `log_q=True` when you hand in log-probabilities
(nothing is guessed from the values). Computation is in float32 at least (float64 stays float64).
Zeros are exact: 0 · log 0 = 0, and KL(p ‖ q) = inf where q = 0 < p.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _logs(x: Tensor, is_log: bool) -> Tensor:
    x = _as_float(x)
    return x if is_log else torch.log(x)  # log 0 = -inf, handled by the callers


def _probs(x: Tensor, is_log: bool) -> Tensor:
    x = _as_float(x)
    return torch.exp(x) if is_log else x


def kl(p: Tensor, q: Tensor, *, log_p: bool = False, log_q: bool = False) -> Tensor:
    """Forward KL(p ‖ q) = Σ p (log p − log q), the optimisers' objective. Shape (...,), nats."""
    pp, lp, lq = _probs(p, log_p), _logs(p, log_p), _logs(q, log_q)
    # where p = 0 the term is 0 whatever q is (also for q = 0, where log q = -inf)
    terms = torch.where(pp > 0, pp * (lp - lq), torch.zeros((), dtype=pp.dtype, device=pp.device))
    return terms.sum(-1)


def reverse_kl(p: Tensor, q: Tensor, *, log_p: bool = False, log_q: bool = False) -> Tensor:
    """Reverse KL(q ‖ p). Shape (...,), nats."""
    return kl(q, p, log_p=log_q, log_q=log_p)


def js(p: Tensor, q: Tensor, *, log_p: bool = False, log_q: bool = False) -> Tensor:
    """Jensen–Shannon divergence, symmetric, in [0, ln 2]. Shape (...,), nats."""
    lp, lq = _logs(p, log_p), _logs(q, log_q)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * (kl(lp, lm, log_p=True, log_q=True) + kl(lq, lm, log_p=True, log_q=True))


def tv(p: Tensor, q: Tensor, *, log_p: bool = False, log_q: bool = False) -> Tensor:
    """Total variation distance ½ Σ |p − q|, in [0, 1]. Shape (...,)."""
    return 0.5 * (_probs(p, log_p) - _probs(q, log_q)).abs().sum(-1)


def entropy(p: Tensor, *, log_p: bool = False) -> Tensor:
    """Shannon entropy −Σ p log p. Shape (...,), nats."""
    pp, lp = _probs(p, log_p), _logs(p, log_p)
    return -torch.where(pp > 0, pp * lp, torch.zeros((), dtype=pp.dtype, device=pp.device)).sum(-1)


def top1_agree(p: Tensor, q: Tensor) -> Tensor:
    """1.0 where the most likely token of p and q is the same, else 0.0. Shape (...,).

    Works on probabilities and log-probabilities alike (argmax is unchanged by log).
    """
    return (p.argmax(-1) == q.argmax(-1)).float()


def topk_recall(p: Tensor, q: Tensor, k: int = 10, *, log_p: bool = False) -> Tensor:
    """The share of p's mass on q's top-k tokens, in [0, 1]. Shape (...,).

    q may be probabilities or log-probabilities (top-k is unchanged by log).
    """
    idx = q.topk(k, dim=-1).indices
    return _probs(p, log_p).gather(-1, idx).sum(-1)


ALL = {"kl_nats": kl, "reverse_kl_nats": reverse_kl, "js_nats": js, "tv": tv}


def summary(target_probs: Tensor, model_logprobs: Tensor, k: int = 10) -> dict[str, Tensor]:
    """Every metric of a batch of (target, achieved) pairs, keyed by its tidy column name.

    Args:
        target_probs: (batch, vocab) target probabilities.
        model_logprobs: (batch, vocab) the model's log-probabilities.
    Returns: {column: (batch,) float tensor} with kl_nats, reverse_kl_nats, js_nats, tv,
        top1_agree and top{k}_recall.
    """
    out = {name: fn(target_probs, model_logprobs, log_q=True) for name, fn in ALL.items()}
    out["top1_agree"] = top1_agree(target_probs, model_logprobs)
    out[f"top{k}_recall"] = topk_recall(target_probs, model_logprobs, k)
    return out

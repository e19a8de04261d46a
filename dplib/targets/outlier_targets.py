"""Outlier targets: k tokens sharing mass m, each above every other token, the rest tempered to h.

`outliers` builds them; `feasible_masses` says which masses m exist for a (vocabulary, entropy, k),
and the error of an infeasible request quotes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..seeds import derive_seed, generator
from .batch import TargetError, Targets, _check_vocab
from .tempering import _check_entropies, _store, _temper

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
    one (V − k)-wide row.
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

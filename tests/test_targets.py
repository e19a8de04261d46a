"""dplib.targets: validation, every sampler's contract, and the cross-tokenizer mapping."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dplib import targets as T
from dplib.lm import embed, next_token_logprobs
from dplib.targets import TargetError, Targets, logits_width, vocabulary
from dplib.targets.outlier_targets import _outlier_entropies, _outlier_entropy_range
from dplib.targets.random_targets import _row_logits
from dplib.targets.tokenizer_bytes import _token_bytes

WIDTHS = [49_152, 262_144]  # the embedded models' vocabularies
TOL = 1e-6  # the entropy contract, nats


def requested(t: Targets) -> torch.Tensor:
    return torch.tensor(t.meta["requested_entropy_nats"].to_numpy(), dtype=torch.float64)


def assert_valid(t: Targets, width: int):
    assert t.probs.shape[1] == width
    assert torch.isfinite(t.probs).all() and (t.probs >= 0).all()
    assert (t.probs.double().sum(-1) - 1).abs().max() < 1e-5
    assert t.meta["target_id"].is_unique


# --------------------------------------------------------------------------------------------
# Validation and the Targets type
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0.5, float("nan")]]), "NaN or inf"),
    (torch.tensor([[0.5, float("inf")]]), "NaN or inf"),
    (torch.tensor([[1.5, -0.5]]), "negative"),
    (torch.tensor([[0.5, 0.4]]), "do not sum to 1"),
    (torch.tensor([0.5, 0.5]), "2-D"),
    (torch.zeros(0, 3), "shape"),
    (torch.tensor([[1, 0]]), "floating-point"),
    ([[0.5, 0.5]], "torch.Tensor"),
])
def test_validation_errors(bad, match):
    with pytest.raises(TargetError, match=match):
        T.validate_probs(bad)
    with pytest.raises(TargetError, match=match):
        Targets.from_probs(bad)


def test_renormalize_warns_and_fixes():
    with pytest.warns(UserWarning, match="renormalising"):
        t = Targets.from_probs(torch.tensor([[0.5, 0.4], [0.3, 0.7]]), renormalize=True)
    assert torch.allclose(t.probs.sum(-1), torch.ones(2))
    with pytest.raises(TargetError, match="zero total mass"):
        T.validate_probs(torch.zeros(1, 3), renormalize=True)


def test_width_check(tiny):
    model, _ = tiny
    width = logits_width(model)
    assert width == 384
    Targets.from_probs(torch.full((1, width), 1 / width)).check_width(model)
    with pytest.raises(TargetError, match="logits width is 384"):
        Targets.from_probs(torch.full((1, 380), 1 / 380)).check_width(model)


def test_targets_container():
    t = T.vanilla(100, [0.0, 1.0, 2.0])
    assert len(t) == 3 and t.vocab_size == 100 and t.ids == t.meta["target_id"].tolist()
    sub = t[[2, 0]]
    assert sub.ids == [t.ids[2], t.ids[0]] and torch.equal(sub.probs[0], t.probs[2])
    assert t[1].ids == [t.ids[1]] and len(t[torch.tensor([True, False, True])]) == 2 and len(t[:2]) == 2
    both = Targets.concat([t, T.vanilla(100, [3.0], seed=1)])
    assert len(both) == 4
    frame = t.frame()
    assert {"target_id", "kind", "entropy_nats"} <= set(frame.columns)
    with pytest.raises(TargetError, match="unique"):
        Targets.concat([t, t])
    with pytest.raises(TargetError, match="different vocabulary widths"):
        Targets.concat([t, T.vanilla(50, [1.0])])
    with pytest.raises(TargetError, match="meta has"):
        Targets(t.probs, t.meta.iloc[:2])


# --------------------------------------------------------------------------------------------
# Vanilla targets
# --------------------------------------------------------------------------------------------


@settings(max_examples=4, deadline=None)
@given(st.sampled_from(WIDTHS), st.sampled_from(T.VANILLA_METHODS),
       st.lists(st.floats(0.0, 1.0), min_size=1, max_size=2), st.integers(0, 1000))
def test_vanilla_hits_entropy(width, method, fractions, seed):
    h = [f * math.log(width) for f in fractions]
    t = T.vanilla(width, h, seed=seed, method=method, gd_steps=100)  # the correction makes any budget exact
    assert_valid(t, width)
    assert (t.entropy - torch.tensor(h, dtype=torch.float64)).abs().max() <= TOL


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("method", T.VANILLA_METHODS)
def test_vanilla_whole_range_including_ends(width, method):
    h = T.entropy_grid(width, 5)
    t = T.vanilla(width, h, method=method, seed=3)
    assert_valid(t, width)
    assert (t.entropy - h).abs().max() <= TOL
    # the ends are exact: one-hot on argmax z, and uniform
    z0 = _row_logits(3, "vanilla", 0, width)
    assert t.probs[0].max() == 1.0 and int(t.probs[0].argmax()) == int(z0.argmax())
    assert (t.probs[-1] == t.probs[-1][0]).all()  # float32 1/V: its entropy is ln V within TOL


def test_vanilla_near_the_ends():
    width = 49_152
    h = torch.tensor([1e-9, 1e-5, math.log(width) - 1e-9, math.log(width) - 1e-5], dtype=torch.float64)
    assert (T.vanilla(width, h).entropy - h).abs().max() <= TOL
    # plain descent cannot get near 0 (its gradient vanishes): the exact correction finishes it
    short = T.vanilla(width, h, method="gradient", gd_steps=30)
    assert (short.entropy - h).abs().max() <= TOL and short.meta["gd_gap_nats"].iloc[0] > 1e-3


def test_vanilla_row_depends_only_on_seed_and_index():
    a = T.vanilla(1000, [1.0, 2.5, 4.0], seed=5)
    b = T.vanilla(1000, [6.0, 2.5], seed=5)
    assert torch.equal(a.probs[1], b.probs[1])
    assert torch.equal(a.probs, T.vanilla(1000, [1.0, 2.5, 4.0], seed=5).probs)
    assert not torch.equal(a.probs, T.vanilla(1000, [1.0, 2.5, 4.0], seed=6).probs)
    g = T.vanilla(1000, [2.5, 2.5], seed=5, method="gradient")
    assert torch.equal(g.probs[1], T.vanilla(1000, [0.3, 2.5], seed=5, method="gradient").probs[1])


def test_vanilla_methods_share_z_but_differ_in_shape():
    width = 5000
    temp = T.vanilla(width, [3.0], seed=2)
    grad = T.vanilla(width, [3.0], seed=2, method="gradient")
    assert not torch.allclose(temp.probs, grad.probs, atol=1e-4)
    assert int(temp.probs.argmax()) == int(grad.probs.argmax())  # same z: the same token leads
    assert grad.meta["gd_steps_taken"].iloc[0] > 0
    assert grad.meta["gd_gap_nats"].iloc[0] <= 1e-3


def test_vanilla_meta_and_dtype():
    t = T.vanilla(300, [0.5, 1.5], seed=4, method="gradient")
    assert t.ids == ["vanilla-gradient-s4-0", "vanilla-gradient-s4-1"]
    assert (t.meta["kind"] == "vanilla").all() and (t.meta["method"] == "gradient").all()
    assert t.meta["requested_entropy_nats"].tolist() == [0.5, 1.5]
    assert t.meta["seed"].tolist() == [4, 4] and t.meta["index"].tolist() == [0, 1]
    assert t.probs.dtype == torch.float32  # float32 keeps every realised entropy within 1e-6
    t64 = T.vanilla(300, [0.5, 1.5], seed=4, dtype=torch.float64)
    assert t64.probs.dtype == torch.float64 and (t64.entropy - requested(t64)).abs().max() < 1e-9
    assert T.vanilla(300, 1.0).probs.shape == (1, 300)  # a scalar entropy is accepted


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=100, entropies=[-0.1]), r"outside \[0, ln 100\]"),
    (dict(vocab_size=100, entropies=[4.7]), r"outside \[0, ln 100\]"),
    (dict(vocab_size=100, entropies=[float("nan")]), "outside"),
    (dict(vocab_size=100, entropies=[]), "empty"),
    (dict(vocab_size=100, entropies=[1.0], method="softmax"), "not a vanilla method"),
    (dict(vocab_size=1, entropies=[0.0]), "vocab_size"),
    (dict(vocab_size=100.0, entropies=[1.0]), "vocab_size"),
])
def test_vanilla_errors(kwargs, match):
    with pytest.raises(TargetError, match=match):
        T.vanilla(**kwargs)


def test_entropy_grid():
    g = T.entropy_grid(49_152, 7)
    assert g.dtype == torch.float64 and len(g) == 7
    assert g[0] == 0.0 and g[-1] == math.log(49_152)
    assert torch.allclose(g.diff(), torch.full((6,), math.log(49_152) / 6, dtype=torch.float64))
    assert T.entropy_grid(10, 1).tolist() == [0.0]
    with pytest.raises(TargetError, match="positive int"):
        T.entropy_grid(10, 0)


# --------------------------------------------------------------------------------------------
# Outlier targets
# --------------------------------------------------------------------------------------------


def on_top(t: Targets) -> list[bool]:
    """Per target: the smallest outlier probability strictly exceeds the largest other one."""
    out = []
    for i, ids in enumerate(t.meta["outlier_tokens"]):
        rest = torch.ones(t.vocab_size, dtype=torch.bool)
        rest[ids] = False
        out.append(bool(t.probs[i, ids].min() > t.probs[i, rest].max()))
    return out


def reference_on_top(width: int, h: float, k: int, masses: np.ndarray) -> np.ndarray:
    """Brute force, independent of the library's solver: for each m, whether k outliers of mass m
    at entropy h are reachable and exceed every other token (by the relative OUTLIER_MARGIN).

    The rest is softmax(β z) over the n = V − k normal quantiles; its (entropy, top probability)
    curve is tabulated on a fine grid of β (plus the uniform and one-hot ends) and log p_max is
    interpolated linearly in the entropy: accurate to ~3e-5 relative, which moves the boundary in m
    by less than the grid step.
    """
    n = width - k
    z = torch.special.ndtri((torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n)
    ent, logtop = [math.log(n)], [-math.log(n)]
    for betas in torch.exp(torch.linspace(-9, 9, 2401, dtype=torch.float64)).split(200):
        logp = torch.log_softmax(betas[:, None] * z[None], dim=-1)
        ent += (-(logp.exp() * logp).sum(-1)).tolist()
        logtop += logp[:, -1].tolist()
    ent, logtop = np.array(ent + [0.0]), np.array(logtop + [0.0])
    keep = np.r_[True, np.diff(ent) < 0]  # strictly decreasing entropy along the table
    ent, logtop = ent[keep][::-1], logtop[keep][::-1]
    ok = np.zeros(len(masses), dtype=bool)
    for j, m in enumerate(masses):
        lo, hi = _outlier_entropy_range(width, k, m)
        if not lo - 1e-12 <= h <= hi + 1e-12 or m == 0:
            continue
        if m == 1:
            ok[j] = True
            continue
        h_rest = min(max((h - lo) / (1 - m), 0.0), math.log(n))
        top = math.exp(np.interp(h_rest, ent, logtop))
        ok[j] = m / k > (1 + T.OUTLIER_MARGIN) * (1 - m) * top
    return ok


def stated_ranges(message: str) -> dict[float, list[tuple[float, float]]]:
    """{h: [(lo, hi), ...]} from an infeasible-outliers message ("h=<h>: m ∈ [a, b] ∪ [c, d]; ...")."""
    import re

    out = {}
    for hv, ranges in re.findall(r"h=([0-9.e+-]+): m ∈ ([^;]*?)(?:;|\.$)", message):
        out[float(hv)] = [(float(a), float(b)) for a, b in re.findall(r"\[([0-9.e+-]+), ([0-9.e+-]+)\]", ranges)]
    return out


@st.composite
def outlier_cases(draw):
    width = draw(st.sampled_from(WIDTHS))
    k = draw(st.integers(1, 20))
    m = draw(st.floats(0.01, 0.99))
    lo, hi = _outlier_entropies(width, k, m)  # the feasible entropies (outliers on top) for (k, m)
    h = [lo + draw(st.floats(0.0, 1.0)) * (hi - lo) for _ in range(draw(st.integers(1, 2)))]
    return width, k, m, h, draw(st.integers(0, 1000))


@settings(max_examples=5, deadline=None)
@given(outlier_cases())
def test_outliers_mass_and_entropy_exact(case):
    width, k, m, h, seed = case
    t = T.outliers(width, h, k, m, seed=seed)
    assert_valid(t, width)
    assert (t.entropy - torch.tensor(h, dtype=torch.float64)).abs().max() <= TOL
    for i, ids in enumerate(t.meta["outlier_tokens"]):
        assert len(set(ids)) == k
        assert t.probs[i, ids].double().sum().item() == pytest.approx(m, abs=1e-6)
        assert torch.allclose(t.probs[i, ids].double(), torch.full((k,), m / k, dtype=torch.float64), rtol=1e-6)
    assert on_top(t) == [True] * len(h) and t.meta["outliers_on_top"].all()


def test_outliers_meta_tokens_and_edge_masses():
    width = 2000
    t = T.outliers(width, 3.0, 4, 0.6, seed=1, tokens=[5, 6, 7, 8])
    assert t.meta["outlier_tokens"].iloc[0] == [5, 6, 7, 8]
    assert t.ids == ["outlier-k4-m0.6-s1-0"]
    row = t.meta.iloc[0]
    assert row["kind"] == "outlier" and row["k"] == 4 and row["mass"] == 0.6 and row["seed"] == 1
    assert bool(row["outliers_on_top"]) and on_top(t) == [True]
    one = T.outliers(width, math.log(3), 3, 1.0)  # all mass on the outliers: uniform over them
    assert one.entropy.item() == pytest.approx(math.log(3), abs=1e-7) and (one.probs > 0).sum() == 3
    assert bool(one.meta["outliers_on_top"].iloc[0])
    assert T.outliers(width, 0.0, 1, 1.0, tokens=[9]).probs[0, 9] == 1.0
    # target i depends on (seed, i) and its own entropy only
    assert torch.equal(T.outliers(width, [2.0, 3.0], 3, 0.7, seed=2).probs[1],
                       T.outliers(width, [2.5, 3.0], 3, 0.7, seed=2).probs[1])
    # the rest is the same tempered quantile vector in a different random order per target
    two = T.outliers(width, [3.0, 3.0], 3, 0.7, seed=3)
    assert not torch.equal(two.probs[0], two.probs[1])
    assert torch.equal(two.probs[0].sort().values, two.probs[1].sort().values)


@pytest.mark.parametrize("width", WIDTHS)
def test_outliers_infeasible_states_range(width):
    k, m, h = 3, 0.5, 8.0  # 8 nats cannot be reached when half the mass sits on 3 tokens
    ranges = T.feasible_masses(width, h, k)
    assert len(ranges) == 1
    with pytest.raises(TargetError, match="infeasible") as err:
        T.outliers(width, [2.0, h], k, m)
    ((lo, hi),) = stated_ranges(str(err.value))[h]
    assert ranges[0][0] <= lo < hi <= ranges[0][1] and lo == pytest.approx(ranges[0][0], rel=1e-5)
    mid = 0.5 * (lo + hi)  # a mass from the stated range works
    assert T.outliers(width, h, k, mid).entropy.item() == pytest.approx(h, abs=TOL)


def test_low_outlier_mass_at_low_entropy_is_infeasible():
    """The issue's example: 3 'outliers' of 0.0033 at 1 nat sit far below the rest's top token."""
    import re

    V = 49_152
    with pytest.raises(TargetError, match="infeasible") as err:
        T.outliers(V, 1.0, 3, 0.01)
    message = str(err.value)
    # no mass works at 1 nat (3 tokens above all others need H ≥ ln 3); for m = 0.01 the message
    # states the entropies that do work, and one of them is accepted
    assert "m ∈ none" in message and "ln k ≤ h < ln V" in message
    lo, hi = (float(x) for x in re.search(r"entropy must lie in \[([0-9.]+), ([0-9.]+)\]", message).groups())
    assert 9.0 < lo < hi <= math.log(V)
    assert T.outliers(V, 0.5 * (lo + hi), 3, 0.01).meta["outliers_on_top"].all()
    # at 0.5 nats with k = 1 the entropy alone allows m ∈ [0, 0.1997] ∪ [0.8002, 0.967]; only the
    # upper interval has the outlier on top
    with pytest.raises(TargetError, match=r"m ∈ \[0\.80029\d*, 0\.96710\d*\]\.$"):
        T.outliers(V, 0.5, 1, 0.1)
    # accepted before (h = 3 is reachable with m = 0.2), but 0.2/3 is below the rest's top token
    with pytest.raises(TargetError, match=r"h=3: m ∈ \[0\.50585\d*, 0\.84798\d*\]"):
        T.outliers(V, 3.0, 3, 0.2)


def test_outliers_on_top_over_a_grid():
    """Every target of every feasible (h, k, m) of a grid, and at both ends of each feasible range
    (float32 storage included), has its smallest outlier strictly above its largest other token."""
    V, n_feasible = 49_152, 0
    for k in (1, 3, 10):
        cases = {m: [] for m in (0.2, 0.5, 0.8)}
        for h in (1.5, 3.0, 5.0, 8.0, 10.0):
            ranges = T.feasible_masses(V, h, k)
            for m in cases:
                if any(lo <= m <= hi for lo, hi in ranges):
                    cases[m] += [h, h]
            for lo, hi in ranges:
                cases.setdefault(lo, []).append(h)
                cases.setdefault(hi, []).append(h)
        for m, hs in cases.items():
            if hs:
                t = T.outliers(V, hs, k, m, seed=k)
                assert on_top(t) == [True] * len(hs), (k, m, hs)
                assert t.meta["outliers_on_top"].all()
                assert (t.entropy - torch.tensor(hs, dtype=torch.float64)).abs().max() <= TOL
                n_feasible += len(hs)
    assert n_feasible >= 60


@pytest.mark.parametrize("width, h, k", [(1000, 0.5, 1), (1000, 3.0, 5), (49_152, 10.5, 2), (1000, 1.5, 50),
                                         (1000, 4.5, 50), (49_152, 3.0, 3), (49_152, 8.0, 10)])
def test_feasible_masses_match_brute_force(width, h, k):
    grid = np.linspace(0, 1, 20001)
    entropy_ok = np.array([lo - 1e-12 <= h <= hi + 1e-12
                           for lo, hi in (_outlier_entropy_range(width, k, m) for m in grid)])
    ok = reference_on_top(width, h, k, grid)
    assert (ok <= entropy_ok).all() and (ok != entropy_ok).any()  # the outlier condition bites
    ranges = T.feasible_masses(width, h, k)
    assert len(ranges) <= 1  # analysed: the feasible set is one interval
    inside = np.zeros_like(ok)
    ends = []
    for lo, hi in ranges:
        inside |= (grid >= lo) & (grid <= hi)
        ends += [lo, hi]
    off = grid[ok != inside]  # disagreement only within a grid step of a reported end
    assert all(min((abs(m - e) for e in ends), default=1.0) <= 1e-4 for m in off), off[:5]


@pytest.mark.parametrize("width, k", [(380, 1), (49_152, 3)])
def test_feasible_masses_exist_only_from_ln_k_below_ln_V(width, k):
    """At h = ln V only the uniform distribution exists (no outliers); below ln k none exists; at
    h = ln k only m = 1; just below ln V a mass just above k/V."""
    assert T.feasible_masses(width, math.log(width), k) == []
    with pytest.raises(TargetError, match="infeasible"):
        T.outliers(width, math.log(width), k, k / width)
    assert T.feasible_masses(width, math.log(k) - 1e-3, k) == []
    assert T.feasible_masses(width, math.log(k), k) == [(1.0, 1.0)]
    ((lo, hi),) = T.feasible_masses(width, math.log(width) - 1e-3, k)
    assert k / width < lo < 2 * k / width and lo < hi
    t = T.outliers(width, math.log(width) - 1e-3, k, lo)
    assert on_top(t) == [True]


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0, mass=0.5), "1 ≤ k"),
    (dict(k=100, mass=0.5), "1 ≤ k"),
    (dict(k=2, mass=1.5), r"mass must be .* \[0, 1\]"),
    (dict(k=2, mass=float("nan")), "mass must be"),
    (dict(k=2, mass=0.5, tokens=[1, 1]), "distinct"),
    (dict(k=2, mass=0.5, tokens=[1, 100]), "distinct ids in"),
    (dict(k=2, mass=0.9, entropy=10.0), r"outside \[0, ln 100\]"),
    (dict(k=1, mass=0.999, entropy=4.0), "infeasible"),
    (dict(k=2, mass=0.0), "probability 0"),  # k tokens of probability 0 are not outliers
    (dict(k=2, mass=0.01), r"m must exceed about k/V"),  # even a uniform rest is above 0.005
])
def test_outliers_errors(kwargs, match):
    kwargs = {"entropy": 2.0, **kwargs}
    with pytest.raises(TargetError, match=match):
        T.outliers(100, **kwargs)


def test_infeasible_message_lists_ranges_that_are_accepted():
    width, k, m = 1000, 3, 0.5
    hs = [1.0, 1.2, 2.0, 6.0]  # none of them allows m = 0.5 with 3 outliers on top
    with pytest.raises(TargetError, match="infeasible") as err:
        T.outliers(width, hs, k, m)
    stated = stated_ranges(str(err.value))
    assert sorted(stated) == hs and stated[1.0] == [] and all(stated[h] for h in hs[1:])
    for h in hs[1:]:
        ((lo, hi),) = stated[h]
        for mass in (lo, 0.5 * (lo + hi), hi):
            t = T.outliers(width, h, k, mass)
            assert on_top(t) == [True] and abs(t.entropy.item() - h) <= TOL
    ((lo, _),) = T.feasible_masses(width, 2.0, k)  # the left end itself is accepted, just below it is not
    assert T.outliers(width, 2.0, k, lo).meta["outliers_on_top"].all()
    with pytest.raises(TargetError, match="infeasible"):
        T.outliers(width, 2.0, k, lo - 1e-6)


# --------------------------------------------------------------------------------------------
# LM-generated and reference targets
# --------------------------------------------------------------------------------------------


def test_from_model_reproducible_and_meta(tiny):
    model, tok = tiny
    a = T.from_model(model, tok, 5, seed=3)
    assert_valid(a, 384)
    assert torch.equal(a.probs, T.from_model(model, tok, 5, seed=3).probs)
    assert a.meta.drop(columns=["context_ids"]).equals(T.from_model(model, tok, 5, seed=3).meta.drop(columns=["context_ids"]))
    assert not torch.equal(a.probs, T.from_model(model, tok, 5, seed=4).probs)
    first3 = T.from_model(model, tok, 3, seed=3)  # target i depends on (seed, i) only
    assert first3.meta["context_ids"].tolist() == a.meta["context_ids"].tolist()[:3]
    assert (first3.probs - a.probs[:3]).abs().max() < 1e-5  # batch padding differs: float rounding
    row = a.meta.iloc[0]
    assert row["kind"] == "lm" and row["source_model"] == "tiny-llama-380" and row["target_id"] == "lm-tiny-llama-380-s3-0"
    # the context is fed in the prompt frame: the BOS token, then the window of the document
    bos, window = row["context_ids"][0], row["context_ids"][1:]
    assert bos == tok.bos_token_id and 8 <= len(window) <= 64 and row["context"] == tok.decode(window)
    from pydoc_data.topics import topics
    doc = tok(topics[row["document"]], add_special_tokens=False)["input_ids"]
    pos = row["position"]
    assert doc[pos - len(window):pos] == window and doc[pos] == row["next_token_id"]


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_from_model_padding_invariant(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    batched = T.from_model(model, tok, 6, seed=1, context_tokens=(2, 30), batch_size=6)
    assert len({len(c) for c in batched.meta["context_ids"]}) > 1  # the batch really is padded
    alone = T.from_model(model, tok, 6, seed=1, context_tokens=(2, 30), batch_size=1)
    assert (batched.probs - alone.probs).abs().max() < 1e-5
    # and each equals the plain unpadded forward pass through the optimisers' code path
    ids = torch.tensor([batched.meta["context_ids"].iloc[2]])
    direct = next_token_logprobs(model, embed(model, ids)).exp()
    assert (direct[0] - batched.probs[2]).abs().max() < 1e-5


def test_from_model_corpora(tiny, tmp_path):
    model, tok = tiny
    texts = ["The quick brown fox jumps over the lazy dog. " * 5, "Pack my box with five dozen liquor jugs. " * 5]
    listed = T.from_model(model, tok, 3, corpus=texts, seed=0, context_tokens=(4, 8))
    assert set(listed.meta["document"]) <= {"doc0", "doc1"}
    path = tmp_path / "corpus.txt"
    path.write_text(texts[0])
    filed = T.from_model(model, tok, 2, corpus=path, seed=0, context_tokens=(4, 8))
    assert (filed.meta["document"] == "corpus.txt").all()
    assert T.from_model(model, tok, 2, corpus=str(path), seed=0, context_tokens=(4, 8)).ids == filed.ids
    with pytest.raises(TargetError, match="not a file"):
        T.from_model(model, tok, 2, corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(TargetError, match="more than 400 tokens"):
        T.from_model(model, tok, 2, corpus=["short text"], context_tokens=(400, 400))
    with pytest.raises(TargetError, match="non-empty list of strings"):
        T.from_model(model, tok, 2, corpus=[1, 2])
    with pytest.raises(TargetError, match="positive int"):
        T.from_model(model, tok, 0)
    with pytest.raises(TargetError, match="context_tokens"):
        T.from_model(model, tok, 2, context_tokens=(10, 5))


def test_from_model_sampled(tiny):
    model, tok = tiny
    a = T.from_model(model, tok, 4, seed=2, sample=True, context_tokens=(3, 12))
    assert_valid(a, 384)
    assert a.meta["sampled"].all() and a.ids[0] == "lm-tiny-llama-380-sampled-s2-0"
    b = T.from_model(model, tok, 4, seed=2, sample=True, context_tokens=(3, 12), batch_size=1)
    assert a.meta["context_ids"].tolist() == b.meta["context_ids"].tolist()
    assert (a.probs - b.probs).abs().max() < 1e-5
    special = set(tok.all_special_ids)
    assert all(not special & set(c[1:]) for c in a.meta["context_ids"])  # no special token is sampled
    assert a.meta["context_ids"].tolist() != T.from_model(model, tok, 4, seed=3, sample=True,
                                                          context_tokens=(3, 12)).meta["context_ids"].tolist()


def test_reference_is_the_models_own_distribution(tiny):
    model, tok = tiny
    ref = T.reference(model, tok, ["hello world", "the cat sat on"])
    assert ref.meta["kind"].eq("reference").all() and ref.meta["target_id"].is_unique
    # strings are framed as prompts are: the BOS token, then the text
    assert ref.meta["context_ids"].iloc[0] == [tok.bos_token_id] + tok("hello world", add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(ref.meta["context_ids"]):
        with torch.no_grad():  # the model's own full forward, not dplib's last-position path
            direct = model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        assert (direct - ref.probs[i]).abs().max() < 1e-5
    by_ids = T.reference(model, tok, [ref.meta["context_ids"].iloc[1]])
    assert torch.allclose(by_ids.probs[0], ref.probs[1], atol=1e-6)
    lm = T.from_model(model, tok, 2, seed=0)  # the LM targets' recorded contexts reproduce them
    assert torch.allclose(T.reference(model, tok, lm.meta["context_ids"].tolist()).probs, lm.probs, atol=1e-6)


@pytest.mark.parametrize("contexts, match", [
    ([], "empty"), (["a", [1, 2]], "all strings"), ([[1, 999]], "outside"), ([[]], "empty"),
])
def test_reference_errors(tiny, contexts, match):
    model, tok = tiny
    with pytest.raises(TargetError, match=match):
        T.reference(model, tok, contexts)


# --------------------------------------------------------------------------------------------
# Cross-tokenizer mapping
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIB_CACHE", str(tmp_path))
    vocabulary._MAPS.clear()
    yield tmp_path
    vocabulary._MAPS.clear()


@pytest.mark.parametrize("method", T.MAP_METHODS)
def test_map_vocab_tiny(tiny, tiny_b, fresh_cache, method):
    (model, tok), (model_b, tok_b) = tiny, tiny_b
    src = T.from_model(model, tok, 4, seed=0)
    out = T.map_vocab(src, tok, tok_b, logits_width(model_b), method=method)
    assert_valid(out, 640)
    lost = out.meta["mass_lost"]
    assert ((lost >= 0) & (lost <= 1)).all() and (lost > 0).all()  # tiny has padding rows with mass
    assert out.ids == ["mapped-" + i for i in src.ids] and out.meta["source_target_id"].tolist() == src.ids
    assert (out.meta["kind"] == "lm").all() and out.meta["mapped"].all() and (out.meta["map_method"] == method).all()
    assert "source_context_ids" in out.meta and "context_ids" not in out.meta
    assert out.probs[:, len(tok_b):].abs().max() == 0  # nothing lands on padding rows
    vmap = T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640, method=method)
    dense = src.probs.double() @ vmap.matrix().to_dense()
    assert torch.allclose(dense.sum(-1), 1 - torch.tensor(lost.to_numpy()), atol=1e-9)
    assert torch.allclose(dense / dense.sum(-1, keepdim=True), out.probs.double(), atol=1e-6)


def test_map_vocab_places_strings(tiny, tiny_b, fresh_cache):
    (_, tok), (_, tok_b) = tiny, tiny_b
    word = tok(" the", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    p = torch.zeros(1, 384)
    p[0, word[0]], p[0, tok.bos_token_id] = 0.75, 0.25  # special tokens lose their mass
    out = T.map_vocab(Targets.from_probs(p), tok, tok_b, 640)
    assert out.meta["mass_lost"].iloc[0] == pytest.approx(0.25)
    assert tok_b.decode([int(out.probs.argmax())]) == " the" and out.probs.max() == 1.0
    first = T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640)
    exact = T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640, method="exact")
    placed = exact.dest >= 0
    assert torch.equal(exact.dest[placed], first.dest[placed]) and placed.sum() <= (first.dest >= 0).sum()
    # Onto itself the map is the identity on every row. (It used to lose the special tokens, the
    # padding rows and the byte-level tokens that decode alone to U+FFFD: the bug this replaces.)
    same = T.vocab_map(tok, tok, source_width=384, target_vocab_size=384, method="exact")
    assert torch.equal(same.dest, torch.arange(384))
    only_special = torch.zeros(1, 384)
    only_special[0, tok.eos_token_id] = 1.0
    with pytest.raises(TargetError, match="lose all their mass"):
        T.map_vocab(Targets.from_probs(only_special), tok, tok_b, 640)
    with pytest.raises(TargetError, match="not a mapping method"):
        T.map_vocab(Targets.from_probs(p), tok, tok_b, 640, method="all_tokens")
    with pytest.raises(TargetError, match="smaller than the target tokenizer"):
        T.map_vocab(Targets.from_probs(p), tok, tok_b, 500)
    with pytest.raises(TargetError, match="Targets batch"):
        T.map_vocab(p, tok, tok_b, 640)


def test_map_vocab_disk_cache(tiny, tiny_b, fresh_cache, monkeypatch):
    (_, tok), (_, tok_b) = tiny, tiny_b
    built = T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640)
    files = list((fresh_cache / "vocab_maps").glob("*.npy"))
    assert [f.name for f in files] == [f"{built.key}.npy"]
    assert T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640) is built  # memory hit
    vocabulary._MAPS.clear()

    def no_build(*args, **kwargs):
        raise AssertionError("the disk cache was not used")

    monkeypatch.setattr(vocabulary, "_build_dest", no_build)
    loaded = T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640)  # disk hit
    assert torch.equal(loaded.dest, built.dest)
    with pytest.raises(AssertionError, match="not used"):  # another method or width is another key
        T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640, method="exact")
    monkeypatch.undo()
    monkeypatch.setenv("DPLIB_CACHE", str(fresh_cache))
    files[0].write_bytes(b"garbage")  # a corrupt entry is rebuilt
    vocabulary._MAPS.clear()
    assert torch.equal(T.vocab_map(tok, tok_b, source_width=384, target_vocab_size=640).dest, built.dest)
    assert torch.equal(torch.from_numpy(np.load(files[0])).long(), built.dest)


def byte_level_name(data: bytes) -> str:
    """The vocabulary string of a byte-level BPE token with these bytes (GPT-2's bytes → unicode table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def assert_identity(out: Targets, src: Targets):
    from dplib import metrics

    assert out.probs.dtype == src.probs.dtype and torch.equal(out.probs, src.probs)
    assert (out.meta["mass_lost"] == 0).all()
    assert (metrics.kl(src.probs, out.probs) == 0).all()  # KL(original ‖ mapped)


def assert_bytes_match_decode(tok):
    """The raw bytes read from the vocabulary decode (U+FFFD for partial characters) as the tokenizer does."""
    data, _ = _token_bytes(tok, len(tok))
    texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False,
                             clean_up_tokenization_spaces=False)
    assert all(d is not None for d in data)
    bad = [(i, d, s) for i, (d, s) in enumerate(zip(data, texts, strict=True)) if d.decode("utf-8", "replace") != s]
    assert not bad, bad[:10]


@pytest.mark.parametrize("method", T.MAP_METHODS)
def test_map_vocab_onto_itself_is_identity(tiny, fresh_cache, method):
    model, tok = tiny
    lone = tok.convert_tokens_to_ids(byte_level_name(b"\xe2"))  # the byte 0xE2 alone: part of "—", "’", ...
    assert tok.decode([lone]) == "\ufffd"
    p = torch.zeros(1, 384)
    p[0, lone] = 1.0
    # the LM targets put mass on every row: special tokens, padding rows, partial UTF-8 tokens
    src = Targets.concat([T.from_model(model, tok, 3, seed=0), Targets.from_probs(p)])
    assert_identity(T.map_vocab(src, tok, tok, logits_width(model), method=method), src)
    assert torch.equal(T.vocab_map(tok, tok, source_width=384, target_vocab_size=384, method=method).dest,
                       torch.arange(384))
    wider = T.map_vocab(src, tok, tok, 448, method=method)  # a wider target: its extra rows get nothing
    assert torch.equal(wider.probs[:, :384], src.probs) and wider.probs[:, 384:].abs().max() == 0
    assert (wider.meta["mass_lost"] == 0).all()
    assert_bytes_match_decode(tok)


@pytest.mark.parametrize("method", T.MAP_METHODS)
def test_map_vocab_places_partial_utf8_by_bytes(tiny, tiny_b, fresh_cache, method):
    (_, tok), (_, tok_b) = tiny, tiny_b
    for data in (b"\xe2", b"\xe2\x80"):  # each decodes alone to U+FFFD; both vocabularies have them
        name = byte_level_name(data)
        v, t = tok.convert_tokens_to_ids(name), tok_b.convert_tokens_to_ids(name)
        assert tok.decode([v]) == "\ufffd" and t is not None
        p = torch.zeros(1, 384)
        p[0, v] = 1.0
        out = T.map_vocab(Targets.from_probs(p), tok, tok_b, 640, method=method)
        assert out.probs[0, t] == 1.0 and out.meta["mass_lost"].iloc[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["smollm2->gemma3", "gemma3->smollm2"])
def test_map_vocab_real_models(smollm2, gemma3, direction):
    (src_model, src_tok), (dst_model, dst_tok) = (smollm2, gemma3) if direction == "smollm2->gemma3" else (gemma3, smollm2)
    src_width, dst_width = logits_width(src_model), logits_width(dst_model)
    words = [" the", " house", " water"]
    probs = torch.zeros(len(words), src_width)
    for i, w in enumerate(words):
        ids = src_tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1
        probs[i, ids[0]] = 1.0
    out = T.map_vocab(Targets(probs, pd.DataFrame({"target_id": words, "kind": "custom"})),
                      src_tok, dst_tok, dst_width)
    assert_valid(out, dst_width)
    for i, w in enumerate(words):
        assert dst_tok.decode([int(out.probs[i].argmax())]) == w and out.probs[i].max() == 1.0
    assert (out.meta["mass_lost"] == 0).all()
    lm = T.map_vocab(T.from_model(src_model, src_tok, 2, seed=0), src_tok, dst_tok, dst_width)
    assert_valid(lm, dst_width)
    assert ((lm.meta["mass_lost"] >= 0) & (lm.meta["mass_lost"] <= 1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_map_vocab_real_model_onto_itself_is_identity(request, fresh_cache, which):
    model, tok = request.getfixturevalue(which)
    assert_bytes_match_decode(tok)  # byte-level (SmolLM2) and SentencePiece byte fallback (Gemma-3)
    src = T.from_model(model, tok, 2, seed=0)
    for method in T.MAP_METHODS:
        assert_identity(T.map_vocab(src, tok, tok, logits_width(model), method=method), src)


@pytest.mark.slow
@pytest.mark.parametrize("method", T.MAP_METHODS)
def test_map_vocab_real_models_partial_utf8(smollm2, gemma3, fresh_cache, method):
    (smol_model, smol), (gemma_model, gemma) = smollm2, gemma3
    smol_width, gemma_width = logits_width(smol_model), logits_width(gemma_model)
    lone = smol.convert_tokens_to_ids(byte_level_name(b"\xe2"))  # SmolLM2's token for the byte 0xE2
    fallback = gemma.convert_tokens_to_ids("<0xE2>")  # Gemma-3's byte-fallback token for it
    assert smol.decode([lone]) == gemma.decode([fallback]) == "\ufffd"
    p = torch.zeros(1, smol_width)
    p[0, lone] = 1.0
    out = T.map_vocab(Targets.from_probs(p), smol, gemma, gemma_width, method=method)
    assert out.probs[0, fallback] == 1.0 and out.meta["mass_lost"].iloc[0] == 0
    q = torch.zeros(1, gemma_width)
    q[0, fallback] = 1.0
    back = T.map_vocab(Targets.from_probs(q), gemma, smol, smol_width, method=method)
    assert back.probs[0, lone] == 1.0 and back.meta["mass_lost"].iloc[0] == 0
    # longer partial tokens, whose bytes no Gemma token has: "first_token" places them by their
    # valid UTF-8 prefix, else by their first byte; "exact" loses them
    two = smol.convert_tokens_to_ids(byte_level_name(b"\xe2\x80"))
    cyrillic = smol.convert_tokens_to_ids(byte_level_name("о".encode() + b"\xd0"))  # "о" + a lead byte
    dest = T.vocab_map(smol, gemma, source_width=smol_width, target_vocab_size=gemma_width, method=method).dest
    if method == "first_token":
        assert dest[two] == fallback and gemma.decode([int(dest[cyrillic])]) == "о"
    else:
        assert dest[two] == dest[cyrillic] == -1

"""dplib.metrics: the divergences' defining properties, exactness at zeros, log/prob input agreement."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dplib import metrics

WIDTHS = [49_152, 262_144]  # the embedded models' vocabularies


def random_probs(rows: int, width: int, seed: int, *, zeros: float = 0.0, sharp: float = 1.0,
                 dtype=torch.float64) -> torch.Tensor:
    """(rows, width) random distributions; a fraction `zeros` of the entries is exactly 0."""
    g = torch.Generator().manual_seed(seed)
    logits = sharp * torch.randn(rows, width, generator=g, dtype=torch.float64)
    if zeros:
        logits[torch.rand(rows, width, generator=g) < zeros] = -math.inf
        logits[:, 0] = 0.0  # keep every row non-empty
    return torch.softmax(logits, -1).to(dtype)


cases = st.tuples(st.sampled_from(WIDTHS), st.integers(0, 2**31 - 1),
                  st.sampled_from([0.0, 0.5, 0.99]), st.floats(0.1, 8.0))


@settings(max_examples=6, deadline=None)
@given(cases)
def test_divergence_properties(case):
    width, seed, zeros, sharp = case
    p = random_probs(2, width, seed, zeros=zeros, sharp=sharp)
    q = random_probs(2, width, seed + 1, zeros=0.0, sharp=sharp)
    assert torch.equal(metrics.kl(p, p), torch.zeros(2, dtype=torch.float64))
    assert (metrics.kl(p, q) >= 0).all() and (metrics.reverse_kl(p, q) >= 0).all()
    assert torch.allclose(metrics.js(p, q), metrics.js(q, p), rtol=0, atol=1e-12)
    assert (metrics.js(p, q) >= -1e-12).all() and (metrics.js(p, q) <= math.log(2) + 1e-12).all()
    assert metrics.js(p, p).abs().max() < 1e-12
    assert ((metrics.tv(p, q) >= 0) & (metrics.tv(p, q) <= 1 + 1e-12)).all()
    assert (metrics.entropy(p) >= 0).all() and (metrics.entropy(p) <= math.log(width) + 1e-9).all()


@settings(max_examples=6, deadline=None)
@given(cases)
def test_log_inputs_agree_with_probabilities(case):
    width, seed, zeros, sharp = case
    p = random_probs(2, width, seed, zeros=zeros, sharp=sharp)
    q = random_probs(2, width, seed + 7, zeros=0.0, sharp=sharp)
    lp, lq = p.log(), q.log()
    for fn in (metrics.kl, metrics.reverse_kl, metrics.js, metrics.tv):
        ref = fn(p, q)
        for a, b, kw in [(lp, q, {"log_p": True}), (p, lq, {"log_q": True}),
                         (lp, lq, {"log_p": True, "log_q": True})]:
            assert torch.allclose(fn(a, b, **kw), ref, rtol=1e-9, atol=1e-12), fn.__name__
    assert torch.allclose(metrics.entropy(lp, log_p=True), metrics.entropy(p), rtol=1e-12)
    assert torch.allclose(metrics.topk_recall(lp, q, 5, log_p=True), metrics.topk_recall(p, q, 5))
    assert torch.equal(metrics.top1_agree(p, lq), metrics.top1_agree(p, q))


def test_zeros_are_exact():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5, 0.0]], dtype=torch.float64)
    assert metrics.entropy(p).item() == pytest.approx(math.log(2), abs=1e-15)
    assert metrics.kl(p, q).item() == pytest.approx(math.log(2), abs=1e-15)  # q = 0 where p = 0: no NaN
    assert metrics.kl(q, p).item() == math.inf  # p = 0 < q: infinite, not NaN
    assert math.isfinite(metrics.js(q, p).item())
    one_hot = torch.tensor([[0.0, 1.0, 0.0]])
    assert metrics.entropy(one_hot).item() == 0.0
    assert metrics.kl(one_hot, one_hot).item() == 0.0
    assert metrics.entropy(torch.tensor([[0.0, 1.0]]).log(), log_p=True).item() == 0.0


def test_known_values():
    disjoint_p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    disjoint_q = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert metrics.js(disjoint_p, disjoint_q).item() == pytest.approx(math.log(2), abs=1e-15)
    assert metrics.tv(disjoint_p, disjoint_q).item() == 1.0
    uniform = torch.full((1, 1000), 1e-3, dtype=torch.float64)
    assert metrics.entropy(uniform).item() == pytest.approx(math.log(1000), abs=1e-12)
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    expected = sum(a * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist(), strict=True))
    assert metrics.kl(p, q).item() == pytest.approx(expected, abs=1e-15)
    assert metrics.reverse_kl(p, q).item() == pytest.approx(metrics.kl(q, p).item(), abs=1e-15)
    assert metrics.tv(p, q).item() == pytest.approx(0.5, abs=1e-15)


def test_top1_and_topk():
    p = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.5, 0.1, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1]])
    assert metrics.top1_agree(p, q).tolist() == [1.0, 0.0]
    assert metrics.topk_recall(p, q, 1).tolist() == pytest.approx([0.6, 0.1])
    assert metrics.topk_recall(p, q, 4).tolist() == pytest.approx([1.0, 1.0])


def test_batched_shapes_and_dtypes():
    p = random_probs(6, 50, 0).reshape(2, 3, 50)
    q = random_probs(6, 50, 1).reshape(2, 3, 50)
    for fn in (metrics.kl, metrics.reverse_kl, metrics.js, metrics.tv):
        assert fn(p, q).shape == (2, 3) and fn(p, q).dtype == torch.float64
    assert metrics.entropy(p).shape == (2, 3)
    half = metrics.kl(p.half(), q.half())
    assert half.dtype == torch.float32  # computed in float32 at least


def test_summary_columns():
    p = random_probs(4, 100, 0, zeros=0.5, dtype=torch.float32)
    logq = torch.log_softmax(torch.randn(4, 100), -1)
    out = metrics.summary(p, logq, k=5)
    assert set(out) == {"kl_nats", "reverse_kl_nats", "js_nats", "tv", "top1_agree", "top5_recall"}
    assert all(v.shape == (4,) for v in out.values())
    assert torch.allclose(out["kl_nats"], metrics.kl(p, logq.exp()), atol=1e-5)
    self_summary = metrics.summary(p, torch.log(p))
    assert self_summary["kl_nats"].abs().max() < 1e-6 and self_summary["top1_agree"].min() == 1.0

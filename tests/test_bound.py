"""Bounds: free-h, norm-constrained, layer-ℓ; the hierarchy free ≤ norm ≤ soft."""

from __future__ import annotations

import copy
import math

import families
import pandas as pd
import pytest
import torch
from helpers import in_thread, own_distribution, random_targets

from dplib.lm import kl_from_logprobs, norm_spec, output_layer
from dplib.optim.bound import (
    BoundConfig,
    LayerBoundConfig,
    _Problem,
    free_bound,
    layer_bound,
    norm_bound,
)
from dplib.optim.bound_objective import (
    PRECOND_TOKENS,
    TAIL_FLOOR,
    _gram,
    _Objective,
    _row_covariance,
)
from dplib.optim.lockstep import _stack, _take
from dplib.optim.soft import SoftConfig, optimize_soft
from dplib.targets import Targets, logits_width


def _meta(kind, n):
    return pd.DataFrame({"kind": [kind] * n})


def span_targets(model, n=2, seed=0, scale=1.0):
    """Targets softmax(W h0 + b): exactly reachable by the free-h problem."""
    head = output_layer(model)
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(n, head.weight.shape[1], generator=g, dtype=torch.float64) * scale
    logits = h0 @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    return Targets(torch.softmax(logits * head.scale, -1), _meta("span", n))


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": 0}, "tol"), ({"max_iter": 0}, "max_iter"), ({"solver": "BFGS"}, "solver"),
    ({"warm_start": 1}, "warm_start"), ({"max_batch": -1}, "max_batch"),
])
def test_bound_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BoundConfig(**kwargs)


def test_layer_config_validation(tiny):
    with pytest.raises(ValueError, match="layer"):
        LayerBoundConfig(layer=1.5)
    model, tok = tiny
    with pytest.raises(ValueError, match="out of range"):
        layer_bound(model, tok, random_targets(logits_width(model), 1), LayerBoundConfig(layer=7, steps=1),
                    progress=False)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_gemma"])
def test_free_bound_of_a_span_target_is_zero(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    r = free_bound(model, tok, span_targets(model, 3), progress=False)
    assert (r.kl.abs() <= 1e-6).all(), r.kl
    assert all(r.meta["converged"]) and r.meta["is_bound"] is True


def test_free_bound_solution_is_stationary_and_beats_h_zero(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 3, temperature=3.0)
    r = free_bound(model, tok, targets, progress=False)
    assert all(r.meta["converged"]) and max(r.meta["grad_norm"]) <= 1e-6
    assert (r.kl < r.initial_kl).all()
    # Moment matching at the optimum: Wᵀ q = Wᵀ p.
    w = output_layer(model).weight.double()
    gap = (r.logprobs.double().exp() - targets.probs.double()) @ w
    assert gap.norm(dim=-1).max() < 1e-4
    # Solver choice does not change the bound, and no warm start neither.
    other = free_bound(model, tok, targets, BoundConfig(solver="trust-ncg", warm_start=False), progress=False)
    torch.testing.assert_close(other.kl, r.kl, atol=1e-8, rtol=0)


def test_preconditioner_whitens_the_hessian(tiny):
    """Mᵀ Ĥ M = I, Ĥ the exact Hessian plus the tail floor when every token is kept (vocab ≤ PRECOND_TOKENS)."""
    model, _ = tiny
    head = output_layer(model)
    assert logits_width(model) <= PRECOND_TOKENS
    problem = _Problem(head, head.weight.detach(), None)
    obj = problem.objective(random_targets(logits_width(model), 2, temperature=2.0).probs)
    k = head.weight.shape[1]
    h = torch.randn(2, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, _, cache = obj.evaluate(h, torch.arange(2))
    m, inv_norm = obj.preconditioner(cache)
    eye = torch.eye(k, dtype=torch.float64)
    for i in range(2):
        hess = obj.hvp(eye, _stack([_take(cache, i)] * k))  # (k, k): column j is H e_j
        approx = hess + TAIL_FLOOR * head.scale**2 * problem.cov
        torch.testing.assert_close(m[i].T @ approx @ m[i], eye, atol=1e-6, rtol=0)
        assert inv_norm[i] >= torch.linalg.matrix_norm(torch.linalg.inv(m[i]), 2) * (1 - 1e-9)


def test_free_bound_chunks_are_independent(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 3, temperature=2.0)
    a = free_bound(model, tok, targets, BoundConfig(max_batch=0), progress=False)
    b = free_bound(model, tok, targets, BoundConfig(max_batch=1), progress=False)
    torch.testing.assert_close(a.kl, b.kl, atol=1e-9, rtol=0)


def test_target_with_zeros_reports_its_convergence(tiny):
    model, tok = tiny
    width = logits_width(model)
    probs = torch.zeros(1, width, dtype=torch.float64)
    probs[0, 10] = 1.0  # one-hot: the infimum (if 0) is approached only as ‖h‖ → ∞
    r = free_bound(model, tok, Targets(probs, None), BoundConfig(max_iter=30), progress=False)
    assert r.meta["converged"] == [r.meta["grad_norm"][0] <= BoundConfig().tol]  # what converged means
    assert r.kl[0] < r.initial_kl[0] and r.steps[0] <= 30
    assert r.meta["hidden_norm"][0] > 1.0


def test_softcap_is_flagged_not_certified(tiny_gemma):
    model, tok = tiny_gemma
    model = copy.deepcopy(model)
    model.config.final_logit_softcapping = 5.0
    head = output_layer(model)
    assert head.softcap == 5.0
    targets = random_targets(logits_width(model), 2, temperature=2.0)
    r = free_bound(model, tok, targets, progress=False)
    assert r.meta["is_bound"] is False and r.meta["certified"] is False and r.meta["notes"]
    assert (r.kl < r.initial_kl).all()
    n = norm_bound(model, tok, targets, progress=False)
    assert n.meta["is_bound"] is False and not any(n.meta["certified"])


def test_norm_spec_reads_gemma_one_plus_weight(tiny_gemma):
    model, _ = tiny_gemma
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(-0.5, 0.5, model.config.hidden_size))
    spec = norm_spec(model)
    assert spec.kind == "rms"
    torch.testing.assert_close(spec.gamma, 1 + model.model.norm.weight.double(), atol=1e-6, rtol=1e-6)
    assert spec.radius == pytest.approx(model.config.hidden_size ** 0.5)


def test_norm_spec_reads_llama_weight(tiny):
    model, _ = tiny
    spec = norm_spec(model)
    torch.testing.assert_close(spec.gamma, model.model.norm.weight.double(), atol=1e-6, rtol=1e-6)


def test_norm_spec_and_bound_for_layernorm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(0, 0.3)
        model.transformer.wte.weight.normal_(0, 0.5)
    spec = norm_spec(model)
    assert spec.kind == "layer"
    torch.testing.assert_close(spec.beta, model.transformer.ln_f.bias.double())
    targets = random_targets(96, 2, temperature=3.0)
    free = free_bound(model, None, targets, progress=False)
    norm = norm_bound(model, None, targets, progress=False)
    assert (norm.kl >= free.kl - 1e-7).all()
    assert all(norm.meta["converged"])
    # What LayerNorm can output: the norm bound's h is LayerNorm(x) for an input x, up to the closure
    # of the ball (‖u‖ = √d, on the sphere, is reached only as x → ∞: there x is taken large).
    ln = model.transformer.ln_f
    gamma, beta, eps, d = spec.gamma, spec.beta, ln.eps, 32
    u = (norm.hidden - beta) / gamma
    torch.testing.assert_close(u.sum(-1), torch.zeros(2, dtype=torch.float64), atol=1e-8, rtol=0)
    shortfall = (1 - u.pow(2).sum(-1) / d).clamp(min=1e-14)  # 1 − ‖u‖²/d ≥ 0
    x = u * (eps / shortfall).sqrt()[:, None]  # LayerNorm(c u) = γ ⊙ u + β exactly when c² = ε / (1 − ‖u‖²/d)
    h = torch.nn.functional.layer_norm(x, (d,), gamma, beta, eps)
    torch.testing.assert_close(h, norm.hidden, atol=1e-5, rtol=0)
    logprobs = torch.log_softmax(h @ model.lm_head.weight.double().T, -1)
    torch.testing.assert_close(kl_from_logprobs(targets.probs.double(), logprobs), norm.kl.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "olmo"])
def test_bound_hidden_reaches_the_bound_and_norm_hidden_is_a_norm_output(family):
    """Result.hidden is the head input at the optimum: the model's own head gives the bound's KL there;
    the norm bound's h = γ ⊙ u + β with ‖u‖ ≤ √d (and Σ u = 0 for LayerNorm)."""
    model, tok = families.build(family)
    targets = random_targets(logits_width(model), 3, temperature=2.0, seed=4)
    head, spec = output_layer(model), norm_spec(model)
    for r in (free_bound(model, tok, targets, progress=False), norm_bound(model, tok, targets, progress=False)):
        assert r.hidden.shape == (3, model.config.hidden_size) and r.hidden.dtype == torch.float64
        with torch.no_grad():
            logprobs = torch.log_softmax(head.logits(r.hidden.to(head.weight.dtype)), -1)
        torch.testing.assert_close(kl_from_logprobs(targets.probs, logprobs).double(), r.kl.double(),
                                   atol=2e-4, rtol=1e-4)
    u = (r.hidden - (0.0 if spec.beta is None else spec.beta)) / spec.gamma
    assert (u.norm(dim=-1) <= spec.radius * (1 + 1e-6)).all()
    if spec.kind == "layer":
        torch.testing.assert_close(u.sum(-1), torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_norm_bound_between_free_and_soft_on_tiny(tiny):
    model, tok = tiny
    targets = Targets.concat([own_distribution(model, tok, ["The quick brown", "def f(x):"], 3),
                              span_targets(model, 2, seed=1, scale=3.0)])
    free = free_bound(model, tok, targets, progress=False)
    norm = norm_bound(model, tok, targets, progress=False)
    soft = optimize_soft(model, tok, targets, SoftConfig(steps=60, prompt_length=3, lr=0.05), progress=False)
    assert (free.kl <= norm.kl + 1e-6).all()
    assert (norm.kl <= soft.kl + 1e-6).all()
    assert all(norm.meta["certified"])
    # A target from a real context is the output of the real norm: inside the ball, so norm = free there.
    torch.testing.assert_close(norm.kl[:2], free.kl[:2], atol=1e-6, rtol=0)


def test_layer_bound_improves_and_records_layer(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 2, temperature=2.0)
    r = layer_bound(model, tok, targets, LayerBoundConfig(steps=30, prompt_length=2), progress=False)
    assert r.meta["layer"] == model.config.num_hidden_layers // 2
    assert (r.kl < r.initial_kl).all() and r.prompt_embeds.shape == (2, 2, model.config.hidden_size)
    last = layer_bound(model, tok, targets, LayerBoundConfig(steps=5, prompt_length=2, layer=-1), progress=False)
    assert last.meta["layer"] == model.config.num_hidden_layers - 1


@pytest.mark.slow
def test_smollm2_free_bound_of_span_target(smollm2):
    model, tok = smollm2
    r = free_bound(model, tok, span_targets(model, 2, seed=3), progress=False)
    assert (r.kl.abs() <= 1e-6).all(), r.kl


@pytest.mark.slow
def test_smollm2_hierarchy(smollm2):
    """free ≤ norm ≤ soft on real targets: two of the model's own distributions, two random ones."""
    model, tok = smollm2
    targets = Targets.concat([
        own_distribution(model, tok, ["The capital of France is", "import numpy as"], 5),
        random_targets(logits_width(model), 2, seed=4, temperature=0.5)])
    free = free_bound(model, tok, targets, progress=False)
    norm = norm_bound(model, tok, targets, progress=False)
    soft = optimize_soft(model, tok, targets, SoftConfig(steps=40, prompt_length=5), progress=False)
    assert (free.kl <= norm.kl + 1e-6).all(), (free.kl, norm.kl)
    assert (norm.kl <= soft.kl + 1e-6).all(), (norm.kl, soft.kl)


# ---------------------------------------------------------------- robustness: tol, non-finite input, solver errors


def _small_objective(weight, probs):
    """The free-h objective of a bare (vocab, k) weight matrix, scale 1, no bias or soft-capping."""
    gram, colsum = _gram(weight)
    return _Objective(weight, None, 1.0, None, probs, _row_covariance(gram, colsum, len(weight)))


def _small_problem(n=4, vocab=40, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, k, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    return weight, probs


@pytest.mark.parametrize("tol", [math.inf, -math.inf, math.nan, -1e-6, True, "1e-6", None])
def test_bound_config_rejects_non_finite_or_non_number_tol(tol):
    # tol=inf (or True, i.e. 1) would report an unconverged point as a certified bound
    with pytest.raises(ValueError, match=r"tol=.*finite gradient-norm tolerance > 0, e\.g\. 1e-6"):
        BoundConfig(tol=tol)
    assert BoundConfig(tol=1).tol == 1 and BoundConfig(tol=1e-9).tol == 1e-9


@pytest.mark.parametrize("where, row", [("weight", 10), ("point", 11)])
def test_non_finite_hessian_raises_instead_of_hanging(where, row):
    weight, probs = _small_problem(n=3)
    h = torch.zeros(3, weight.shape[1], dtype=torch.float64)
    if where == "weight":
        weight[7, 2] = math.nan  # every row's Hessian is NaN: the first one is reported
    else:
        h[1, 0] = math.inf  # only the second row's
    obj = _small_objective(weight, probs)
    _, _, cache = obj.evaluate(h, torch.arange(3))
    out = in_thread(lambda: obj.preconditioner(cache, torch.tensor([10, 11, 12])))
    err = out.get("error")
    assert isinstance(err, FloatingPointError), out
    assert f"target row {row}" in str(err) and "NaN or inf" in str(err) and "finite" in str(err)


def test_preconditioner_of_all_zero_weights_is_finite():
    # a zero Hessian gave a zero jitter, which the old loop multiplied by 100 forever
    _, probs = _small_problem(n=2)
    obj = _small_objective(torch.zeros(40, 6, dtype=torch.float64), probs)
    _, _, cache = obj.evaluate(torch.zeros(2, 6, dtype=torch.float64), torch.arange(2))
    m, inv_norm = in_thread(lambda: obj.preconditioner(cache))["value"]
    assert torch.isfinite(m).all() and torch.isfinite(inv_norm).all()

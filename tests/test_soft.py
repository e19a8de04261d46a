"""optimize_soft: config validation, batching, seeding, early stopping, projection; real-model reach."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import own_distribution, random_targets

from dplib import lm
from dplib.lm import allowed_tokens, embed, kl_from_logprobs
from dplib.models import tiny_model
from dplib.optim import prompt_vectors as engine
from dplib.optim.bound import norm_bound
from dplib.optim.common import BestTracker
from dplib.optim.hard import score_prompt_text
from dplib.optim.prompt_vectors import _lr_at
from dplib.optim.soft import SoftConfig, nearest_tokens, optimize_soft
from dplib.seeds import derive_seed, generator
from dplib.targets import TargetError, logits_width


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_length": 0}, "prompt_length"),
    ({"prompt_length": 2.5}, "prompt_length"),
    ({"steps": -1}, "steps"),
    ({"lr": 0}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"eps": 0}, "eps"),
    ({"schedule": "linear"}, "schedule"),
    ({"patience": -1}, "patience"),
    ({"min_delta": -0.1}, "min_delta"),
    ({"init": "zeros"}, "init"),
    ({"prefix": None}, "prefix"),
    ({"suffix": 3}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"max_batch": -2}, "max_batch"),
    ({"restarts": 0}, "restarts"),
    ({"restarts": 1.5}, "restarts"),
    ({"min_steps": -1}, "min_steps"),
    ({"min_rel_improvement": 1.0}, "min_rel_improvement"),
    ({"min_rel_improvement": -0.1}, "min_rel_improvement"),
    ({"project": "yes"}, "project"),
    ({"warm_steps": -1}, "warm_steps"),
    ({"warm_steps": 11, "steps": 10}, "warm_steps"),
])
def test_config_validation_says_how_to_fix(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        SoftConfig(**kwargs)
    assert "use" in str(err.value)


def test_cosine_schedule_decays_to_zero():
    config = SoftConfig(lr=0.1, steps=10, schedule="cosine")
    assert _lr_at(config, 0) == pytest.approx(0.1)
    assert _lr_at(config, 5) == pytest.approx(0.05)
    assert _lr_at(config, 10) == pytest.approx(0.0, abs=1e-12)
    assert _lr_at(SoftConfig(lr=0.1, steps=10), 7) == 0.1


def test_wrong_width_rejected(tiny):
    model, tok = tiny
    with pytest.raises(TargetError, match="width"):
        optimize_soft(model, tok, random_targets(100, 1), SoftConfig(steps=1), progress=False)


def test_result_shapes_and_consistency(tiny):
    model, tok = tiny
    targets = own_distribution(model, tok, ["The quick brown", "def f(x):", "import os"], 3)
    config = SoftConfig(steps=20, prompt_length=4, lr=0.05)
    r = optimize_soft(model, tok, targets, config, progress=False)
    d = model.config.hidden_size
    assert r.prompt_embeds.shape == (3, 4, d) and r.prompt_embeds.dtype == torch.float32
    assert r.trace.shape == (21, 3)
    torch.testing.assert_close(r.trace[0], r.initial_kl)
    torch.testing.assert_close(r.kl, torch.nan_to_num(r.trace, nan=math.inf).min(0).values)
    # The stored log-probabilities are those of the best prompt.
    torch.testing.assert_close(kl_from_logprobs(targets.probs, r.logprobs), r.kl, atol=1e-5, rtol=1e-4)
    assert (r.steps == 20).all()
    assert r.meta["is_bound"] is False and r.meta["prefix_ids"] == [tok.bos_token_id]


def test_same_seed_same_trace_and_different_seed_differs(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 2)
    a = optimize_soft(model, tok, targets, SoftConfig(steps=10, seed=3), progress=False)
    b = optimize_soft(model, tok, targets, SoftConfig(steps=10, seed=3), progress=False)
    c = optimize_soft(model, tok, targets, SoftConfig(steps=10, seed=4), progress=False)
    assert torch.equal(a.trace, b.trace) and torch.equal(a.prompt_embeds, b.prompt_embeds)
    assert not torch.equal(a.trace, c.trace)


def test_batch_equals_separate_runs(tiny):
    model, tok = tiny
    targets = own_distribution(model, tok, ["The quick brown", "def f(x):", "import os"], 3)
    config = SoftConfig(steps=15, prompt_length=3, lr=0.05, patience=4, min_delta=0.02)
    batch = optimize_soft(model, tok, targets, config, progress=False)
    for i in range(3):
        alone = optimize_soft(model, tok, targets[i], config, progress=False)
        torch.testing.assert_close(alone.kl, batch.kl[i:i + 1], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(alone.trace[:, 0], batch.trace[:, i], atol=1e-4, rtol=1e-3, equal_nan=True)
        assert alone.steps[0] == batch.steps[i]


def test_chunking_matches_one_batch(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 3, seed=1)
    # max_batch counts batch rows (targets × restarts): one restart, so 2 targets per chunk
    one = optimize_soft(model, tok, targets, SoftConfig(steps=8, max_batch=0, restarts=1), progress=False)
    chunked = optimize_soft(model, tok, targets, SoftConfig(steps=8, max_batch=2, restarts=1), progress=False)
    assert chunked.meta["n_chunks"] == 2
    torch.testing.assert_close(one.trace, chunked.trace, atol=1e-4, rtol=1e-3)


def test_early_stopped_targets_freeze(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 2, seed=2)
    # An impossible min_delta: no step counts as an improvement, so every target stops after 3.
    r = optimize_soft(model, tok, targets, SoftConfig(steps=30, patience=3, min_delta=100.0, min_steps=0,
                                                      project=False), progress=False)
    assert (r.steps == 3).all()
    assert torch.isnan(r.trace[4:]).all() and not torch.isnan(r.trace[:4]).any()
    init = embed(model, torch.tensor(r.meta["init_ids"])).float()
    torch.testing.assert_close(r.prompt_embeds, init)  # the best is the initial prompt, untouched
    torch.testing.assert_close(r.kl, r.initial_kl)


def test_plateau_rule_waits_for_min_steps_and_still_stops_on_a_flat_loss(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 2, seed=2)
    # No step counts as progress (min_delta 100): a flat loss. Patience 3 alone stops after step 3;
    # min_steps 8 holds every target until step 8, then it stops at once.
    r = optimize_soft(model, tok, targets, SoftConfig(steps=30, patience=3, min_delta=100.0, min_steps=8,
                                                      restarts=1, project=False), progress=False)
    assert (r.steps == 8).all()
    assert torch.isnan(r.trace[9:]).all() and not torch.isnan(r.trace[:9]).any()


def test_relative_improvement_rule_counts_a_slow_descent_only_once_it_adds_up():
    """A loss falling 0.2 % a step makes progress every 6 steps under min_rel 1 %: patience 3 stops it,
    patience 8 never does; a flat loss stops after `patience` steps, but not before min_steps."""
    def run(patience, min_rel, losses, min_steps=0):
        tracker = BestTracker(1, patience, min_rel_improvement=min_rel, min_steps=min_steps)
        for step, loss in enumerate(losses):
            tracker.update(torch.tensor([loss]), step)
            if tracker.done:
                return step
        return None

    slow = [10.0 * 0.998**i for i in range(200)]
    assert run(3, 0.01, slow) is not None
    assert run(8, 0.01, slow) is None
    assert run(3, 0.0, slow) is None  # without the relative rule every tiny step counts
    flat = [5.0] * 200
    assert run(20, 0.01, flat) == 20
    assert run(20, 0.01, flat, min_steps=50) == 50
    assert run(0, 0.01, flat) is None  # patience 0: never stop


def _reference_soft(model, tok, targets, config, init_ids, warm_hidden=None):
    """The plain algorithm, written out: BOS + L vectors from init_ids, Adam on the sum of KLs (constant lr),
    full-model logits; returns the (steps + 1, T) KL trace. With warm_hidden (T, d), the first
    config.warm_steps steps minimise Σ ‖h − h*‖² / ‖h*‖² instead (h: the last position's final hidden state)."""
    emb = model.get_input_embeddings()
    bos = emb(torch.tensor([[tok.bos_token_id]])).detach().float()
    param = emb(init_ids).detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=config.lr, betas=config.betas, eps=config.eps)
    trace = []
    for step in range(config.steps + 1):
        x = torch.cat([bos.expand(len(param), -1, -1), param], dim=1)
        out = model(inputs_embeds=x, output_hidden_states=True)
        logprobs = out.logits[:, -1].float().log_softmax(-1)
        kl = kl_from_logprobs(targets.probs, logprobs)
        trace.append(kl.detach())
        if step == config.steps:
            break
        loss = kl
        if warm_hidden is not None and step < config.warm_steps:
            h = out.hidden_states[-1][:, -1].float()  # the final norm's output: what the head reads
            loss = (h - warm_hidden).pow(2).sum(-1) / warm_hidden.pow(2).sum(-1)
        loss.sum().backward()
        opt.step()
        opt.zero_grad()
    return torch.stack(trace)


def test_one_restart_is_the_single_start_algorithm(tiny):
    """restarts = 1 keeps the single-start seeds (derive_seed(seed, target_id, "init")) and algorithm."""
    model, tok = tiny
    targets = random_targets(logits_width(model), 3, seed=7)
    config = SoftConfig(steps=12, prompt_length=3, lr=0.05, schedule="constant", restarts=1, project=False)
    r = optimize_soft(model, tok, targets, config, progress=False)
    allowed = allowed_tokens(tok, logits_width(model)).nonzero().flatten()
    ids = torch.stack([allowed[torch.randint(len(allowed), (3,), generator=generator(derive_seed(0, t, "init")))]
                       for t in targets.ids])
    assert r.meta["init_ids"] == ids.tolist() and r.meta["restart"] == [0, 0, 0]
    torch.testing.assert_close(r.trace, _reference_soft(model, tok, targets, config, ids), atol=1e-4, rtol=1e-4)


def test_warm_start_fits_the_norm_bounds_hidden_state_then_the_kl(tiny):
    """warm_steps: the written-out algorithm (hidden-state fit to norm_bound's h*, then KL), step for step,
    with every KL through the model's own forward."""
    model, tok = tiny
    targets = random_targets(logits_width(model), 3, seed=5, temperature=2.0)
    config = SoftConfig(steps=14, warm_steps=8, prompt_length=3, lr=0.05, project=False)
    r = optimize_soft(model, tok, targets, config, progress=False)
    h_star = norm_bound(model, tok, targets, progress=False).hidden.float()
    ids = torch.tensor(r.meta["init_ids"])
    torch.testing.assert_close(r.trace, _reference_soft(model, tok, targets, config, ids, h_star), atol=1e-4, rtol=1e-4)
    cold = optimize_soft(model, tok, targets, dataclasses.replace(config, warm_steps=0), progress=False)
    assert not torch.allclose(r.trace[1:], cold.trace[1:])  # the warm phase changes the path


def test_restarts_keep_the_best_of_separate_runs(tiny, monkeypatch):
    """R restarts in one batch = the best of R separate runs seeded like restart r; the reported KL is
    the one the kept prompt reaches through the model's own forward pass."""
    model, tok = tiny
    targets = random_targets(logits_width(model), 3, seed=3)
    config = SoftConfig(steps=10, prompt_length=3, lr=0.05, restarts=3, project=False)
    batch = optimize_soft(model, tok, targets, config, progress=False)
    assert batch.trace.shape == (11, 3) and batch.prompt_embeds.shape[:2] == (3, 3)
    separate = []
    seed_of = engine._restart_seed
    for r in range(3):
        monkeypatch.setattr(engine, "_restart_seed", lambda c, t, k, _r, r=r: seed_of(c, t, k, r))
        separate.append(optimize_soft(model, tok, targets, dataclasses.replace(config, restarts=1), progress=False))
    monkeypatch.undo()
    kls = torch.stack([s.kl for s in separate], dim=1)  # (T, R)
    torch.testing.assert_close(batch.kl, kls.min(dim=1).values, atol=1e-4, rtol=1e-3)
    assert batch.meta["restart"] == kls.argmin(dim=1).tolist()
    for t, r in enumerate(batch.meta["restart"]):
        torch.testing.assert_close(batch.prompt_embeds[t], separate[r].prompt_embeds[t], atol=1e-4, rtol=1e-3)
        assert batch.meta["init_ids"][t] == separate[r].meta["init_ids"][t]
    # trace: the per-step best over restarts
    traces = torch.stack([s.trace for s in separate], dim=2)
    torch.testing.assert_close(batch.trace, traces.min(dim=2).values, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(batch.initial_kl, batch.trace[0])
    with torch.no_grad():
        bos = model.get_input_embeddings()(torch.full((3, 1), tok.bos_token_id)).float()
        logprobs = model(inputs_embeds=torch.cat([bos, batch.prompt_embeds], 1)).logits[:, -1].float().log_softmax(-1)
    torch.testing.assert_close(kl_from_logprobs(targets.probs, logprobs), batch.kl, atol=1e-4, rtol=1e-4)
    assert (batch.to_frame()["improvement_nats"] >= 0).all()


def test_restarts_chunk_by_rows(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 3, seed=1)
    one = optimize_soft(model, tok, targets, SoftConfig(steps=5, restarts=2, max_batch=0, project=False),
                        progress=False)
    chunked = optimize_soft(model, tok, targets, SoftConfig(steps=5, restarts=2, max_batch=4, project=False),
                            progress=False)
    assert chunked.meta["n_chunks"] == 2  # 4 rows = 2 targets × 2 restarts per chunk
    torch.testing.assert_close(one.kl, chunked.kl, atol=1e-4, rtol=1e-3)


def test_vocab_init_uses_embedding_module_including_gemma_scale(tiny_gemma):
    model, tok = tiny_gemma
    targets = random_targets(logits_width(model), 2)
    r = optimize_soft(model, tok, targets, SoftConfig(steps=0, project=False), progress=False)
    ids = torch.tensor(r.meta["init_ids"])
    assert allowed_tokens(tok, logits_width(model))[ids].all()
    scaled = model.get_input_embeddings()(ids)
    torch.testing.assert_close(r.prompt_embeds, scaled.float())
    raw = model.get_input_embeddings().weight[ids]
    assert not torch.allclose(scaled, raw)  # Gemma multiplies by √d inside the module


def test_gaussian_init_matches_embedding_scale(tiny):
    model, tok = tiny
    targets = random_targets(logits_width(model), 4)
    r = optimize_soft(model, tok, targets, SoftConfig(steps=0, init="gaussian", prompt_length=8, project=False),
                      progress=False)
    emb = model.get_input_embeddings().weight[allowed_tokens(tok, logits_width(model))]
    assert r.prompt_embeds.std().item() == pytest.approx(emb.std().item(), rel=0.2)


def test_prefix_and_suffix(tiny):
    model, tok = tiny
    assert lm.prompt_frame(model, tok, "bos", "").prefix_ids == (tok.bos_token_id,)
    assert lm.prompt_frame(model, tok, "", "").prefix_ids == ()
    frame = lm.prompt_frame(model, tok, "Hello", " world")
    prefix, suffix = list(frame.prefix_ids), list(frame.suffix_ids)
    assert prefix == tok("Hello", add_special_tokens=False)["input_ids"] and len(suffix) >= 1
    targets = random_targets(logits_width(model), 1)
    r = optimize_soft(model, tok, targets, SoftConfig(steps=5, prefix="", suffix=" world"), progress=False)
    assert r.meta["prefix_ids"] == [] and r.meta["suffix_ids"] == suffix
    assert torch.isfinite(r.kl).all()


def test_projection_is_nearest_token_and_its_kl_is_exact(tiny):
    model, tok = tiny
    width = logits_width(model)
    allowed = allowed_tokens(tok, width)
    ids = allowed.nonzero().flatten()[torch.tensor([5, 17, 99])]
    vectors = embed(model, ids).float() + 1e-4
    assert torch.equal(nearest_tokens(model, vectors, allowed, chunk=64), ids)

    targets = random_targets(width, 2, seed=5)
    r = optimize_soft(model, tok, targets, SoftConfig(steps=10, prompt_length=3), progress=False)
    assert r.prompt_ids.shape == (2, 3) and allowed[r.prompt_ids].all()
    with torch.no_grad():
        full = torch.cat([torch.full((2, 1), tok.bos_token_id), r.prompt_ids], dim=1)
        logprobs = model(full).logits[:, -1].float().log_softmax(-1)
    torch.testing.assert_close(r.projected_kl, kl_from_logprobs(targets.probs, logprobs), atol=1e-4, rtol=1e-4)


def test_projection_text_is_given_only_where_it_reproduces_the_ids_and_kl(tiny):
    """A projected prompt's text, where given, re-tokenises to its ids and re-scores to projected_kl;
    where the ids have no such text (e.g. a partial UTF-8 byte token), the text is None and the row says so."""
    model, tok = tiny
    targets = random_targets(logits_width(model), 6, seed=5)
    # a small lr keeps the prompts near their initial tokens, so some projections have a faithful text
    r = optimize_soft(model, tok, targets, SoftConfig(steps=10, prompt_length=3, lr=0.01), progress=False)
    frame = lm.prompt_frame(model, tok)
    rows = r.to_frame()
    assert rows["prompt_text_exact"].tolist() == [t is not None for t in r.prompt_text]
    for ids, text in zip(r.prompt_ids.tolist(), r.prompt_text, strict=True):
        decoded_reproduces = frame.encode(tok.decode(ids)) == frame.ids(ids)
        assert (text is not None) == decoded_reproduces
    exact = [i for i, t in enumerate(r.prompt_text) if t is not None]
    assert exact, "with 6 targets some projections have a faithful text"
    kl, _ = score_prompt_text(model, tok, [r.prompt_text[i] for i in exact], targets[exact])
    torch.testing.assert_close(kl, r.projected_kl[exact], atol=1e-4, rtol=1e-4)


def test_reaches_a_reachable_target_on_tiny(tiny):
    model, tok = tiny
    targets = own_distribution(model, tok, ["The quick brown fox", "def f(x): return"], 4)
    r = optimize_soft(model, tok, targets, SoftConfig(steps=150, prompt_length=4, lr=0.05), progress=False)
    assert (r.kl < 0.02).all()


@pytest.mark.slow
def test_smollm2_reaches_its_own_distribution(smollm2):
    """The issue's acceptance test: a real 5-token context's distribution, soft L = 5, < 0.05 in 300 steps."""
    model, tok = smollm2
    targets = own_distribution(model, tok, ["The capital of France is", "def fibonacci(n): return"], 5)
    r = optimize_soft(model, tok, targets, SoftConfig(prompt_length=5, steps=300), progress=False)
    assert (r.kl < 0.05).all(), r.kl


@pytest.mark.gpu
def test_cuda_bf16_model_float32_prompts():
    model, tok = tiny_model(380)
    model = model.to("cuda", torch.bfloat16)
    targets = random_targets(logits_width(model), 2)
    r = optimize_soft(model, tok, targets, SoftConfig(steps=20, prompt_length=3), progress=False)
    assert r.prompt_embeds.dtype == torch.float32 and r.prompt_embeds.device.type == "cpu"
    assert r.logprobs.dtype == torch.float32 and torch.isfinite(r.kl).all()
    assert (r.kl <= r.initial_kl).all() and r.meta["dtype"] == "bfloat16"

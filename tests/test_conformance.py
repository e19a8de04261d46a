"""Conformance: every method on every architecture family, checked against the model's own forward.

For each family of `families.FAMILIES` (tiny random models with non-trivial final norms, head
biases and logit transforms, so a dropped term shows), every registered method runs once on three
targets: two that the model itself produces after real contexts (computed here with the model's
own full forward, nothing of dplib) and one random target. Then, per family:

- every method's reported KL is recomputed through the model's own full forward (`model(...)
  .logits`): soft from its embeddings, hard from its text re-tokenised from scratch, layer_bound
  with the vectors injected by a hook of this file, the bounds from the exact reachability of the
  model's own distributions (free and norm bounds ≈ 0 there);
- the certified bounds sit below every prompt: free ≤ norm ≤ soft, projected soft, layer, hard;
- `reference` targets equal the model's own next-token distribution.

Tolerances: 1e-4 nats for a KL recomputed in float32 (batching and 2-D vs 3-D matmuls differ in
rounding only); 1e-6 for bounds (the solver's gradient tolerance is 1e-6); 2e-4 in probability for
targets.
A method added to `dplib.optim.METHODS` without a check here fails `test_every_method_is_checked`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import FAMILIES, LAYERS_PATH, build, full_forward_logprobs
from helpers import attr_path

from dplib import lm, targets
from dplib.optim import CONFIGS, METHODS, score_prompt_text

KL_TOL = 1e-4  # nats: a KL recomputed through the full forward, float32
BOUND_TOL = 1e-6  # nats: certified bounds against each other and against prompts
CONTEXTS = ["The quick brown fox", "def f(x): return"]
CONFIGS_USED = {
    "soft": dict(prompt_length=3, steps=40, lr=0.05),
    "hard": dict(prompt_length=3, steps=4, top_k=16, n_candidates=16, patience=0),
    "layer_bound": dict(prompt_length=3, steps=40, lr=0.05),
    "free_bound": {},
    "norm_bound": {},
}


def _kl(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    p = p.double()
    return (torch.special.xlogy(p, p) - p * logq.double()).sum(-1)




def _context_ids(tok, text: str) -> list[int]:
    """BOS, then the text: what the model's own distribution is taken after (independent of dplib)."""
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request):
    """(family, model, tokenizer, targets, {method: Result}) for one family."""
    family = request.param
    model, tok = build(family)
    own = torch.stack([full_forward_logprobs(model, [_context_ids(tok, c)])[0].exp() for c in CONTEXTS])
    batch = targets.Targets.concat([
        targets.Targets.from_probs(own.double(), kind="own", renormalize=True),
        targets.vanilla(lm.logits_width(model), [3.0], seed=1)])
    found = {m: METHODS[m](model, tok, batch, CONFIGS[m](**CONFIGS_USED[m]), progress=False) for m in METHODS}
    return family, model, tok, batch, found


def test_every_method_is_checked():
    assert set(METHODS) == set(CHECKS) == set(CONFIGS_USED), "add a conformance check for the new method"


# --------------------------------------------------------------------------------------------
# Each method's reported KL, recomputed through the model's own forward.
# --------------------------------------------------------------------------------------------


def _check_soft(family, model, tok, batch, res):
    frame_ids = [tok.bos_token_id]
    with torch.no_grad():
        pre = model.get_input_embeddings()(torch.tensor([frame_ids] * len(batch)))
        x = torch.cat([pre, res.prompt_embeds], dim=1)
        logq = model(inputs_embeds=x).logits[:, -1].float().log_softmax(-1)
    assert (_kl(batch.probs, logq) - res.kl.double()).abs().max() <= KL_TOL
    # the projection: its ids reach projected_kl; its text, where given, re-tokenises to the ids
    ids = [frame_ids + row for row in res.prompt_ids.tolist()]
    assert (_kl(batch.probs, full_forward_logprobs(model, ids)) - res.projected_kl.double()).abs().max() <= KL_TOL
    for row, text in zip(res.prompt_ids.tolist(), res.prompt_text, strict=True):
        assert (text is not None) == (tok.encode(tok.decode(row), add_special_tokens=False) == row)


def _check_hard(family, model, tok, batch, res):
    assert all(t is not None for t in res.prompt_text), "the filter keeps only faithful texts"
    ids = [_context_ids(tok, text) for text in res.prompt_text]  # from scratch: the text, not the ids
    assert [i[1:] for i in ids] == res.prompt_ids.tolist()
    assert (_kl(batch.probs, full_forward_logprobs(model, ids)) - res.kl.double()).abs().max() <= KL_TOL


def _check_layer(family, model, tok, batch, res):
    layer, L = res.meta["layer"], res.prompt_embeds.shape[1]

    def inject(module, args, output):  # this file's own hook: positions 1..L after layer ℓ
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, 1:1 + L] = res.prompt_embeds.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = attr_path(model, LAYERS_PATH[family])[layer].register_forward_hook(inject)
    try:
        init = torch.tensor(res.meta["init_ids"])
        ids = torch.cat([torch.full((len(batch), 1), tok.bos_token_id), init], dim=1)
        with torch.no_grad():
            logq = model(input_ids=ids).logits[:, -1].float().log_softmax(-1)
    finally:
        handle.remove()
    assert (_kl(batch.probs, logq) - res.kl.double()).abs().max() <= KL_TOL


def _check_bound(family, model, tok, batch, res):
    # the model's own distributions are softmax(logits(h)) at a real final hidden state, one that
    # the final norm produced: both bounds must reach them
    own = torch.tensor(batch.meta["kind"].eq("own").to_numpy())
    assert (res.kl[own].abs() <= 1e-5).all(), res.kl
    assert (_kl(batch.probs, res.logprobs) - res.kl.double()).abs().max() <= KL_TOL


CHECKS = {"soft": _check_soft, "hard": _check_hard, "layer_bound": _check_layer,
          "free_bound": _check_bound, "norm_bound": _check_bound}


@pytest.mark.parametrize("method", sorted(CHECKS))
def test_reported_kl_is_the_full_forward_kl(run, method):
    family, model, tok, batch, found = run
    CHECKS[method](family, model, tok, batch, found[method])


def test_certified_bounds_sit_below_every_prompt(run):
    family, model, tok, batch, found = run
    free, norm = found["free_bound"], found["norm_bound"]
    certified = torch.tensor(norm.meta["certified"]) & torch.tensor(free.meta["certified"] or [False])
    prompts = [found["soft"].kl, found["soft"].projected_kl, found["layer_bound"].kl, found["hard"].kl]
    assert (free.kl <= norm.kl + BOUND_TOL)[certified].all()
    for kl in prompts:
        assert (norm.kl.double() <= kl.double() + BOUND_TOL)[certified].all()
    # the softcapped family's bound is a local optimum, and says so
    assert certified.all() == (lm.output_layer(model).softcap is None)


def test_reference_targets_are_the_models_own_distribution(run):
    family, model, tok, batch, found = run
    ref = targets.reference(model, tok, CONTEXTS)
    assert ref.meta["context_ids"].tolist() == [_context_ids(tok, c) for c in CONTEXTS]
    own = batch.probs[:len(CONTEXTS)].float()
    assert (ref.probs - own).abs().max() <= 2e-4
    lm_targets = targets.from_model(model, tok, 2, seed=0, context_tokens=(4, 9))
    direct = torch.cat([full_forward_logprobs(model, [ids]).exp() for ids in lm_targets.meta["context_ids"]])
    assert (lm_targets.probs - direct).abs().max() <= 2e-4


# --------------------------------------------------------------------------------------------
# The GPU dtype policy, on CPU: bf16 weights, float32 prompts, log-softmax and losses.
# --------------------------------------------------------------------------------------------

BF16_FAMILIES = ("llama", "gemma2", "granite", "gpt2")


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bfloat16_weights_agree_with_float32(family):
    """Every method on a bf16 copy of the model agrees with float32 within 0.05 + 5 % of the KL.

    bf16 keeps ~3 significant digits, so logits of magnitude ~10 move by ~0.04: the tolerance is
    that rounding, not an optimiser difference (same seeds, same initial prompts). The hard search
    is compared prompt for prompt (its path is discrete).
    """
    model, tok = build(family)
    half = copy.deepcopy(model).to(torch.bfloat16)
    batch = targets.Targets.concat([targets.reference(model, tok, CONTEXTS[:1]),
                                    targets.vanilla(lm.logits_width(model), [3.0], seed=1)])
    for method in sorted(METHODS):
        config = CONFIGS[method](**CONFIGS_USED[method])
        a = METHODS[method](model, tok, batch, config, progress=False)
        b = METHODS[method](half, tok, batch, config, progress=False)
        assert b.kl.dtype != torch.bfloat16 and b.logprobs.dtype == torch.float32, method
        if b.prompt_embeds is not None:
            assert b.prompt_embeds.dtype == torch.float32, method
        assert torch.isfinite(b.kl).all(), method
        tol = 0.05 + 0.05 * a.kl.abs()
        if method == "hard":
            # a discrete search takes another path as soon as two candidates tie within bf16
            # rounding: compare the same prompts instead, and each run with its own text
            a_in_half, _ = score_prompt_text(half, tok, a.prompt_text, batch)
            b_own, _ = score_prompt_text(half, tok, b.prompt_text, batch)
            assert ((a_in_half - a.kl).abs() <= tol).all() and ((b_own - b.kl).abs() <= 1e-3).all(), method
            continue
        assert ((a.kl - b.kl).abs() <= tol).all(), (method, a.kl, b.kl)


def test_bfloat16_fast_path_check_passes_and_fingerprint_differs():
    model, _ = build("llama")
    half = copy.deepcopy(model).to(torch.bfloat16)
    lm.check(half)  # the fast path agrees with bf16's own forward within bf16 rounding
    assert lm.fingerprint(half) != lm.fingerprint(model)
    assert math.isfinite(float(lm.next_token_logprobs(half, lm.embed(half, torch.tensor([[0, 5, 9]]))).max()))

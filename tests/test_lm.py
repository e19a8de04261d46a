"""dplib.lm: what dplib reads from a model, the fast-path check, overrides, the prompt frame, identity."""

from __future__ import annotations

import copy

import pytest
import torch
from families import build, full_forward_logprobs

from dplib import lm, targets
from dplib.optim import (
    HardConfig,
    LayerBoundConfig,
    SoftConfig,
    layer_bound,
    optimize_hard,
    optimize_soft,
)


def test_logit_transforms_are_read_by_meaning():
    granite, _ = build("granite")
    cohere, _ = build("cohere")
    gemma2, _ = build("gemma2")
    assert lm.output_layer(granite).scale == pytest.approx(1 / 4.0)  # a divisor
    assert lm.output_layer(cohere).scale == pytest.approx(0.5)  # a multiplier
    assert lm.output_layer(gemma2).softcap == pytest.approx(5.0)
    for model in (granite, cohere, gemma2):
        lm.check(model)


def test_an_unknown_logit_field_is_refused_until_configured():
    model, _ = build("llama")
    model = copy.deepcopy(model)
    model.config.lm_head_multiplier = 2.0  # a field that may scale the logits: never ignored
    with pytest.raises(lm.ModelStructureError, match="lm_head_multiplier.*configure"):
        lm.output_layer(model)
    lm.configure(model, logit_scale=1.0)  # the user says what it does (here: nothing in this forward)
    assert lm.output_layer(model).scale == 1.0


def test_a_dropped_transform_is_caught_by_the_full_forward_check():
    """If dplib read a family's logits wrongly, the first call fails instead of giving a number."""
    model, tok = build("granite")
    model = copy.deepcopy(model)
    lm.configure(model, logit_scale=1.0, verify=False)  # pretend the divisor was not read
    with pytest.raises(lm.ModelStructureError, match="differs from the model's own forward"):
        optimize_soft(model, tok, targets.vanilla(lm.logits_width(model), [2.0]), SoftConfig(steps=1),
                      progress=False)


def test_missing_pieces_name_the_override():
    model, tok = build("llama")
    model = copy.deepcopy(model)
    model.model.renamed = model.model.layers
    del model.model.layers
    with pytest.raises(lm.ModelStructureError, match=r"decoder layers.*configure\(model, layers="):
        lm.layers(model)
    lm.configure(model, layers=model.model.renamed, verify=False)
    assert len(lm.layers(model)) == 2


def test_final_norm_must_be_the_bodys_last_step():
    model, _ = build("llama")
    model = copy.deepcopy(model)
    lm.configure(model, final_norm=model.model.layers[0].input_layernorm, verify=False)
    with pytest.raises(lm.ModelStructureError, match="not the last step"):
        lm.norm_spec(model)


@pytest.mark.parametrize("family, kind, has_beta", [
    ("llama", "rms", False), ("gemma3", "rms", False), ("gpt2", "layer", True), ("olmo", "layer", True),
    ("cohere", "layer", True), ("opt", "layer", True), ("gpt_neox", "layer", True)])
def test_norm_spec_reads_every_kind_of_final_norm(family, kind, has_beta):
    model, _ = build(family)
    spec = lm.norm_spec(model)
    assert spec.kind == kind and (spec.beta is not None) == has_beta
    norm = lm.final_norm(model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 0.3
    c = x - x.mean(-1, keepdim=True) if kind == "layer" else x
    expected = spec.gamma * c / c.pow(2).mean(-1, keepdim=True).sqrt() + (0 if spec.beta is None else spec.beta)
    with torch.no_grad():
        got = norm(x.float()[None])[0].double()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_layers_and_positions_per_family():
    for family, n_positions in [("gpt2", 256), ("bloom", None), ("opt", 256), ("llama", 256)]:
        model, _ = build(family)
        assert len(lm.layers(model)) == 2
        assert lm.max_positions(model) == n_positions


@pytest.mark.parametrize("method", ["soft", "hard", "layer_bound"])
def test_a_prompt_longer_than_the_positions_is_refused_before_any_forward(method, monkeypatch):
    model, tok = build("gpt2")  # learned positions: an over-long input is an IndexError inside torch
    batch = targets.vanilla(lm.logits_width(model), [2.0])
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    run = {"soft": lambda: optimize_soft(model, tok, batch, SoftConfig(prompt_length=300), progress=False),
           "hard": lambda: optimize_hard(model, tok, batch, HardConfig(prompt_length=300, n_swaps=1), progress=False),
           "layer_bound": lambda: layer_bound(model, tok, batch, LayerBoundConfig(prompt_length=300),
                                              progress=False)}[method]
    with pytest.raises(ValueError, match="at most 256"):
        run()
    assert not calls


def test_contexts_longer_than_the_positions_are_refused():
    model, tok = build("gpt2")
    with pytest.raises(ValueError, match="at most 256"):
        targets.reference(model, tok, [list(range(3, 303))])


def test_one_prompt_frame_for_every_method_even_without_a_tokenizer_bos():
    """A tokenizer without BOS: soft, hard, layer_bound and reference all use no BOS (the model
    config's bos_token_id is not consulted), so their numbers refer to the same context."""
    model, tok = build("llama")
    tok = copy.deepcopy(tok)
    tok.bos_token = None
    assert model.config.bos_token_id is not None and tok.bos_token_id is None
    frame = lm.prompt_frame(model, tok)
    assert frame.prefix_ids == () and frame.encode("hi there") == tok.encode("hi there", add_special_tokens=False)
    batch = targets.reference(model, tok, ["hi there"])
    assert batch.meta["context_ids"].iloc[0] == frame.encode("hi there")
    soft = optimize_soft(model, tok, batch, SoftConfig(steps=2, prompt_length=2), progress=False)
    hard = optimize_hard(model, tok, batch, HardConfig(steps=1, prompt_length=2, top_k=8, n_candidates=4),
                         progress=False)
    assert soft.meta["prefix_ids"] == [] and soft.meta["suffix_ids"] == []
    # the hard prompt's KL is that of its text, framed without BOS, through the model's own forward
    ids = frame.encode(hard.prompt_text[0])
    logq = full_forward_logprobs(model, [ids])
    p = batch.probs.double()
    kl = (torch.special.xlogy(p, p) - p * logq.double()).sum(-1)
    assert float((kl - hard.kl.double()).abs().max()) <= 1e-4


def test_fingerprint_is_the_weights_not_the_name():
    a, _ = build("llama", seed=0)
    b, _ = build("llama", seed=1)
    assert type(a).__name__ == type(b).__name__
    assert lm.fingerprint(a) != lm.fingerprint(b)
    assert lm.fingerprint(a) == lm.fingerprint(build("llama", seed=0)[0])
    half = copy.deepcopy(a).to(torch.bfloat16)
    assert lm.fingerprint(half) != lm.fingerprint(a)
    edited = copy.deepcopy(a)
    before = lm.fingerprint(edited)
    with torch.no_grad():
        edited.model.norm.weight.mul_(1.5)  # in place: the memo must notice
    assert lm.fingerprint(edited) != before


def test_check_runs_again_when_what_dplib_reads_changes():
    """The fast-path check is memoised, but not past a change of what it checked."""
    model, _ = build("cohere")
    model = copy.deepcopy(model)
    lm.check(model)
    model.config.logit_scale = 2.0  # Cohere's forward uses the value copied at build time (0.5)
    with pytest.raises(lm.ModelStructureError, match="differs"):
        lm.check(model)
    model.config.logit_scale = 0.5
    lm.check(model)
    with torch.no_grad():
        lm.final_norm(model).weight.mul_(1.5)  # in place: re-checked (and still consistent)
    lm.check(model)

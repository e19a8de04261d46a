"""Self-check of the tiny-family factory (tests/families.py) that the conformance suite relies on."""

from __future__ import annotations

import math

import pytest
import torch
from families import FAMILIES, FINAL_NORM, LAYERS_PATH, WIDTH, build, full_forward_logprobs
from helpers import attr_path

TEXTS = ["The quick brown fox jumps", "Hello world, this is", "In the beginning there was",
         "numbers 1 2 3 4 5", "abc def ghi jkl"]
REQUIRED = {"llama", "gemma3", "gemma2", "gpt2", "gpt_neox", "opt", "phi", "qwen2", "qwen3", "bloom",
            "olmo", "cohere", "granite"}




def _prompts(tok, n_tokens=4, long=False):
    """BOS + the first n_tokens of each text; all rows the same length."""
    texts = [t * 6 for t in TEXTS] if long else TEXTS
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"][:n_tokens] for t in texts]


def test_family_list():
    assert REQUIRED <= set(FAMILIES)
    assert len(set(FAMILIES)) == len(FAMILIES)
    with pytest.raises(ValueError, match="not known"):
        build("no-such-family")


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    model, tok = build(family, seed=0)
    assert len(tok) == 380 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    assert model.dplib_source == {"name": f"tiny-{family}", "kind": "tiny", "seed": 0, "cache_hit": None}
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert len(attr_path(model, LAYERS_PATH[family])) == 2
    assert isinstance(attr_path(model, FINAL_NORM[family]), torch.nn.Module)

    # Width, and an opinionated next-token distribution.
    lp = full_forward_logprobs(model, _prompts(tok))
    assert lp.shape == (len(TEXTS), WIDTH) == (5, 384) and lp.dtype == torch.float32
    entropy = -(lp.exp() * lp).sum(-1)
    assert entropy.mean() < 5.0 < math.log(WIDTH), entropy

    # inputs_embeds = get_input_embeddings()(ids) is the same entry point as input_ids, on
    # prompts longer than the sliding windows (16) of Gemma-2/3 and Mistral.
    ids = torch.tensor(_prompts(tok, 24, long=True))
    with torch.no_grad():
        by_ids = model(input_ids=ids).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert by_ids.shape == (5, 25, WIDTH)
    torch.testing.assert_close(by_embeds, by_ids, atol=1e-5, rtol=0)

    # Weights are a function of the seed alone.
    again, _ = build(family, seed=0)
    other, _ = build(family, seed=1)
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert not torch.equal(model.get_input_embeddings().weight, other.get_input_embeddings().weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_and_head_terms_are_random(family):
    """The final norm's weight/bias and any head bias are far from their identity/zero init."""
    model, _ = build(family)
    norm = attr_path(model, FINAL_NORM[family])
    params = dict(norm.named_parameters())
    if family == "olmo":
        assert params == {}  # OLMo's final LayerNorm has no parameters
    else:
        assert params["weight"].std() > 0.1
        if "bias" in params:
            assert params["bias"].std() > 0.1
    head = model.get_output_embeddings()
    assert (head.bias is not None) == (family == "phi")
    if head.bias is not None:
        assert head.bias.std() > 0.3


def test_logit_transforms_bite():
    """Gemma-2's soft-capping, Cohere's logit_scale, Granite's logits_scaling change the output."""
    for family, attr, identity in [("gemma2", "final_logit_softcapping", None),
                                   ("cohere", "logit_scale", 1.0), ("granite", "logits_scaling", 1.0)]:
        model, tok = build(family)
        ids = _prompts(tok)
        with_transform = full_forward_logprobs(model, ids)
        value = getattr(model.config, attr)
        setattr(model.config, attr, identity)
        if family == "cohere":
            model.logit_scale = identity  # CohereForCausalLM copies it at construction
        try:
            without = full_forward_logprobs(model, ids)
            raw = model(input_ids=torch.tensor(ids)).logits[:, -1]
        finally:
            setattr(model.config, attr, value)
            if family == "cohere":
                model.logit_scale = value
        assert (with_transform - without).abs().max() > 0.5, family
        if family == "gemma2":
            assert (raw.abs() > value).float().mean() > 0.02  # the cap bites on many tokens

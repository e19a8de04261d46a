"""Tiny random-weight causal LMs of many architecture families, for the conformance suite.

The conformance suite checks dplib's fast path (which takes a model apart: input embeddings,
decoder layers, final norm, LM head, logit transforms) against each model's own full forward
`model(input_ids=...).logits`. For that check to mean anything, every term that a sloppy
re-implementation could drop or get wrong must move the logits measurably. `build(family)` makes
such a model in memory from a transformers config (no download, well under a second), with the
shared tiny tokenizer `dplib.models.tiny_tokenizer(380)` (byte-level BPE; <bos>=0, <eos>=1,
<pad>=2; the tokenizer does not add BOS by itself) and a logits width of 384 (the vocabulary padded
to a multiple of 64, like real models' padded embedding matrices). `full_forward_logprobs` is the
independent reference: the model's own forward, nothing of dplib.

Shape of every model: hidden size 64, 2 layers, 4 attention heads of dim 16 (2 key/value heads
where the family has grouped-query attention), MLP width 128, 256 positions where the family has a
position limit; tied or untied embeddings as the family's config defaults; float32, eval mode,
`requires_grad` off. Weights are a function of `seed` alone.

Non-trivial settings, and what each one checks:

* Input embedding ~ N(0, 0.12) (default init is N(0, 0.02)): opinionated, non-uniform outputs.
* Learned position embeddings (GPT-2 `wpe`, OPT `embed_positions`) ~ N(0, 0.12): a fast path that
  feeds the decoder layers `inputs_embeds` without adding positions is caught.
* Final-norm weight = gain * (1 + N(0, 0.3)) per channel, and final-norm bias ~ N(0, 0.3) where the
  module has one (GPT-2, GPT-NeoX, OPT, Bloom, Phi, StableLM): a fast path that skips the final norm
  or applies a plain, un-weighted norm is caught. Gemma-2/3 RMSNorm multiplies by (1 + weight), so
  there the stored weight is gain * (1 + N(0, 0.3)) - 1: the *effective* scale is the same, and a
  fast path that forgets the "1 +" is caught too. OLMo's final LayerNorm has no parameters (left so).
* `gain` (in `_SPECS`) and the LM-head std scale the logits so that every family's next-token
  distribution is opinionated (entropy clearly below ln 384 = 5.95) despite its own logit
  transform; tied families are scaled through the final-norm gain, since their head is the
  embedding.
* Bloom's `word_embeddings_layernorm` gets random weight and bias too: it lives in
  `BloomModel.forward`, not in the embedding module, and applies to `inputs_embeds` as well, so a
  fast path that starts at the decoder layers must apply it itself.
* LM-head bias ~ N(0, 0.5) where the family has one (Phi): a fast path doing `h @ W.T` is caught.
* Gemma-2 `final_logit_softcapping` = 5.0 (default 30), with final-norm gain 3: the raw logits
  reach ~15 and ~10% of them exceed 5 in magnitude, so tanh capping changes the log-probs by up to
  ~12 nats; a fast path that forgets to cap is caught. (A cap of 3 was tried: a random tied head
  gives logits symmetric about 0, and capping at 3 keeps the entropy near 5.15 whatever the gain,
  too close to uniform; with 5 it is ~4.7.)
* Cohere `logit_scale` = 0.5 (a multiplier; default 0.0625).
* Granite `logits_scaling` = 4.0 (a divisor), `embedding_multiplier` = 6.0,
  `residual_multiplier` = 0.5, `attention_multiplier` = 0.125 (default 1.0 for all four). The
  embedding multiplier is applied in `GraniteModel.forward` after the lookup, so it is *not* part
  of `get_input_embeddings()(ids)`, but it applies to `inputs_embeds` too: both entry points agree.
* Gemma-2, Gemma-3 and Mistral use a sliding window of 16 tokens on their sliding layers: prompts
  longer than 16 tokens check that the fast path masks them like the model does.
* Gemma-2/3 scale embeddings by sqrt(64) inside the embedding module (Gemma-3:
  `Gemma3TextScaledWordEmbedding`; Gemma-2: `Gemma2TextScaledWordEmbedding`), so
  `get_input_embeddings()(ids)` already includes the scale and `model(inputs_embeds=...)` equals
  `model(input_ids=...)` for every family here (checked by tests/test_families.py).

Parameters inside the decoder layers keep their family's default init (layer norms 1, biases 0):
the fast path runs the layers as whole modules. Llama and Mistral have the same parameter shapes,
so with the same seed they have the same weights; they differ only by Mistral's sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from helpers import attr_path

H, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, MAX_POS = 64, 2, 4, 2, 16, 128, 256
VOCAB, PAD_TO = 380, 64
WIDTH = -(-VOCAB // PAD_TO) * PAD_TO  # 384


@dataclass(frozen=True)
class _Spec:
    config: str  # transformers config class name
    final_norm: str  # attribute path of the final norm, from the CausalLM
    layers: str  # attribute path of the decoder layer list, from the CausalLM
    kwargs: dict = field(default_factory=dict)  # family-specific config arguments
    gain: float = 1.0  # effective final-norm scale (multiplies 1 + N(0, 0.3))
    head_std: float = 0.12  # std of an untied LM head
    gemma_norm: bool = False  # RMSNorm computes x * (1 + weight)
    position_embedding: str | None = None  # learned position table, from the CausalLM


_LLAMA_LIKE = dict(hidden_size=H, intermediate_size=MLP, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                   max_position_embeddings=MAX_POS)

# Gains / head stds: measured so that the mean next-token entropy after a few tokens is ~3-4.5 nats.
_SPECS: dict[str, _Spec] = {
    "llama": _Spec("LlamaConfig", "model.norm", "model.layers", dict(**_LLAMA_LIKE, head_dim=HEAD_DIM),
                   head_std=0.3),
    "mistral": _Spec("MistralConfig", "model.norm", "model.layers",
                     dict(**_LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=16), head_std=0.3),
    "qwen2": _Spec("Qwen2Config", "model.norm", "model.layers", dict(**_LLAMA_LIKE), head_std=0.3),
    "qwen3": _Spec("Qwen3Config", "model.norm", "model.layers", dict(**_LLAMA_LIKE, head_dim=HEAD_DIM),
                   head_std=0.3),
    "phi3": _Spec("Phi3Config", "model.norm", "model.layers",
                  dict(**_LLAMA_LIKE, original_max_position_embeddings=MAX_POS), head_std=0.3),
    "gemma3": _Spec("Gemma3TextConfig", "model.norm", "model.layers",
                    dict(**_LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=16, query_pre_attn_scalar=HEAD_DIM),
                    gain=2.5, gemma_norm=True),
    "gemma2": _Spec("Gemma2Config", "model.norm", "model.layers",
                    dict(**_LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=16, query_pre_attn_scalar=HEAD_DIM,
                         final_logit_softcapping=5.0),
                    gain=3.0, gemma_norm=True),
    "gpt2": _Spec("GPT2Config", "transformer.ln_f", "transformer.h",
                  dict(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_inner=MLP, n_positions=MAX_POS),
                  gain=1.3, position_embedding="transformer.wpe"),
    "gpt_neox": _Spec("GPTNeoXConfig", "gpt_neox.final_layer_norm", "gpt_neox.layers",
                      dict(hidden_size=H, intermediate_size=MLP, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, max_position_embeddings=MAX_POS),
                      head_std=0.3),
    "opt": _Spec("OPTConfig", "model.decoder.final_layer_norm", "model.decoder.layers",
                 dict(hidden_size=H, ffn_dim=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      max_position_embeddings=MAX_POS, word_embed_proj_dim=H),
                 gain=1.3, position_embedding="model.decoder.embed_positions"),
    "phi": _Spec("PhiConfig", "model.final_layernorm", "model.layers", dict(**_LLAMA_LIKE), head_std=0.3),
    "bloom": _Spec("BloomConfig", "transformer.ln_f", "transformer.h",
                   dict(hidden_size=H, n_layer=LAYERS, n_head=HEADS), gain=0.9),
    "olmo": _Spec("OlmoConfig", "model.norm", "model.layers", dict(**_LLAMA_LIKE), head_std=0.3),
    "olmo2": _Spec("Olmo2Config", "model.norm", "model.layers", dict(**_LLAMA_LIKE), head_std=0.3),
    "stablelm": _Spec("StableLmConfig", "model.norm", "model.layers", dict(**_LLAMA_LIKE), head_std=0.3),
    "cohere": _Spec("CohereConfig", "model.norm", "model.layers", dict(**_LLAMA_LIKE, logit_scale=0.5),
                    gain=1.7),
    "granite": _Spec("GraniteConfig", "model.norm", "model.layers",
                     dict(**_LLAMA_LIKE, logits_scaling=4.0, embedding_multiplier=6.0,
                          residual_multiplier=0.5, attention_multiplier=0.125),
                     head_std=1.2),
}

FAMILIES: tuple[str, ...] = tuple(_SPECS)
FINAL_NORM: dict[str, str] = {f: s.final_norm for f, s in _SPECS.items()}
"""Attribute path of each family's final norm, from the CausalLM (OLMo's has no parameters)."""
LAYERS_PATH: dict[str, str] = {f: s.layers for f, s in _SPECS.items()}
"""Attribute path of each family's decoder-layer list, from the CausalLM."""




def build(family: str, *, seed: int = 0):
    """A tiny random causal LM of `family` and the tiny tokenizer: `(model, tokenizer)`.

    Frozen, float32, eval mode, on CPU; logits width 384. Weights are a function of `seed` alone.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    from dplib.models import tiny_tokenizer

    if family not in _SPECS:
        raise ValueError(f"family={family!r} is not known; use one of {', '.join(FAMILIES)}.")
    spec = _SPECS[family]
    tokenizer = tiny_tokenizer(VOCAB)
    config = getattr(transformers, spec.config)(
        vocab_size=WIDTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **spec.kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.12)
            if spec.position_embedding is not None:
                attr_path(model, spec.position_embedding).weight.normal_(0.0, 0.12)
            head = model.get_output_embeddings()
            if head.weight is not model.get_input_embeddings().weight:
                # Untied heads get their own std: the default init (0.02) gives near-uniform outputs.
                head.weight.normal_(0.0, spec.head_std)
            if getattr(head, "bias", None) is not None:
                head.bias.normal_(0.0, 0.5)
            norms = [attr_path(model, spec.final_norm)]
            if family == "bloom":
                norms.append(model.transformer.word_embeddings_layernorm)
            for norm in norms:
                if getattr(norm, "weight", None) is None:
                    continue  # OLMo: parameter-free LayerNorm
                scale = spec.gain * (1.0 + 0.3 * torch.randn_like(norm.weight))
                norm.weight.copy_(scale - 1.0 if spec.gemma_norm else scale)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.normal_(0.0, 0.3)
    model.eval()
    model.requires_grad_(False)
    model.dplib_source = {"name": f"tiny-{family}", "kind": "tiny", "seed": seed, "cache_hit": None}
    return model, tokenizer


def full_forward_logprobs(model, ids: list[list[int]]) -> torch.Tensor:
    """The model's own next-token log-probabilities after each row of `ids`: float32, (batch, width).

    Rows must all have the same length (no padding, no attention mask).
    """
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits[:, -1, :]
    return torch.log_softmax(logits.float(), dim=-1)


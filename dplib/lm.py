"""What dplib reads from a causal LM, in one place: the only module that knows how a model is built.

Every optimiser, bound and target builder asks this module for what it needs:

- `logits_width(model)`: the width of the next-token logits (can exceed `len(tokenizer)`).
- `output_layer(model)`: logits = softcap(scale · (W h + b)) for the final-norm output h, with every
  transform the family applies to its logits read from the config *by meaning*
  (`LOGIT_TRANSFORMS`: Cohere's multiplier `logit_scale`, Granite's divisor `logits_scaling`,
  Gemma-2's `final_logit_softcapping`). A config field that looks like another logit transform
  (`_SUSPECT_LOGIT_FIELD`) is refused, never ignored.
- `body(model)`: the decoder without its head (inputs_embeds → final-norm hidden states).
- `last_hidden` / `next_token_logprobs`: the hot path: the body, then the head on the last position
  only, as one 2-D matmul (full-sequence logits waste the head on positions never read, and
  `logits_to_keep=1` feeds the head a non-contiguous 3-D slice that is slow on CPU: measured by
  benchmarks/soft_step.py).
- `final_norm(model)` / `norm_spec(model)`: the final normalisation module, located under the names
  families use and *checked* to be what produces the body's output, then described by calling it
  (RMSNorm, Gemma's 1 + w, LayerNorm with or without affine parameters).
- `layers(model)`: the decoder's layer list; `embedding_matrix`: the input embedding as s · E[ids];
  `max_positions(model)`: the position limit (None where the config states none, e.g. ALiBi).
- `special_ids` / `allowed_tokens`: the ids a real prompt may not / may use.
- `PromptFrame` / `prompt_frame`: the one rule for what surrounds a prompt (BOS, prefix and suffix
  text, or the chat template with prefix "chat": `chat_frame`), used identically by soft, hard,
  layer_bound, `reference`, `from_model` and scoring.
- `continuation_logprobs`: log-probabilities along many continuations of one context, the context run
  once (chaining the conditionals of answer strings).
- `fingerprint(model)`: the identity of a model's weights and dtype (for caching results).

The first call on a model checks the fast path against the model's own full forward
(`model(input_ids).logits`) on a short probe: a family with a piece dplib does not know fails there
with an error naming the piece, instead of giving a wrong number. Anything dplib cannot find can be
supplied with `configure(model, ...)` (see its docstring); the error messages say which argument.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "CHAT", "LOGIT_TRANSFORMS", "ChatTemplateError", "ModelStructureError", "NormSpec", "OutputLayer", "PromptFrame",
    "allowed_tokens", "body", "bos_id", "chat_frame", "check", "check_length", "configure", "embed", "embedding_matrix", "final_norm", "fingerprint", "kl_from_logprobs",
    "last_hidden", "layers", "logits_width", "max_positions", "next_token_logprobs", "norm_spec", "continuation_logprobs",
    "output_layer", "prompt_frame", "special_ids", "text_config",
]


class ModelStructureError(NotImplementedError):
    """dplib cannot find (or does not understand) a piece of a model; the message names the piece and
    the `dplib.lm.configure(model, ...)` argument that supplies it."""


# --------------------------------------------------------------------------------------------
# Overrides: how a user supplies a piece dplib cannot find.
# --------------------------------------------------------------------------------------------

_OVERRIDES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {piece: value}
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (device, dtype) checked
_UNSET = object()


def configure(model, *, head=_UNSET, logit_scale=_UNSET, logit_softcap=_UNSET, body=_UNSET,
              final_norm=_UNSET, layers=_UNSET, max_positions=_UNSET, verify: bool = True):
    """Tell dplib a piece of `model` it cannot find (or reads wrongly); returns the model.

    Args (each optional; only the ones passed are set):
        head: the output layer module (a Linear-like module with `weight` (vocab, d_model) and
            optional `bias`).
        logit_scale: the total multiplier applied to the head's output (a divisor c is 1 / c).
            Setting it also declares that the config's logit fields have been accounted for.
        logit_softcap: c in c·tanh(logits / c), or None for none.
        body: the decoder module: called with `inputs_embeds=` it returns `.last_hidden_state`, the
            final-norm output that the head reads.
        final_norm: the final normalisation module (for `norm_bound`).
        layers: the decoder's sequence of layers (for `layer_bound`).
        max_positions: the longest sequence the model accepts, or None for no limit.
        verify: check the result against the model's full forward at once (recommended).
    """
    given = {k: v for k, v in dict(head=head, logit_scale=logit_scale, logit_softcap=logit_softcap, body=body,
                                   final_norm=final_norm, layers=layers, max_positions=max_positions).items()
             if v is not _UNSET}
    _OVERRIDES.setdefault(model, {}).update(given)
    _VERIFIED.pop(model, None)
    if verify:
        check(model)
    return model


def _override(model, piece: str, default=_UNSET):
    return _OVERRIDES.get(model, {}).get(piece, default)


def _missing(piece: str, model, what: str, argument: str) -> ModelStructureError:
    return ModelStructureError(
        f"dplib cannot find the {piece} of {type(model).__name__}: {what}. Supply it with "
        f"dplib.lm.configure(model, {argument}=...).")


# --------------------------------------------------------------------------------------------
# Config, width, device.
# --------------------------------------------------------------------------------------------


def text_config(model):
    """The config that describes the text decoder (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def logits_width(model) -> int:
    """The model's next-token logits width (rows of the output embedding), ≥ len(tokenizer)."""
    return int(output_layer(model).weight.shape[0])


def _param(model) -> Tensor:
    return next(model.parameters())


# --------------------------------------------------------------------------------------------
# The output layer and its logit transforms.
# --------------------------------------------------------------------------------------------

# Config fields that transform the head's output, by meaning: (kind, how the value is used).
LOGIT_TRANSFORMS = {
    "logit_scale": "multiply",  # Cohere, Cohere-2: logits * logit_scale
    "logits_scaling": "divide",  # Granite: logits / logits_scaling
    "final_logit_softcapping": "softcap",  # Gemma-2/3: c * tanh(logits / c)
}
# Fields that mention logits but do not act on the next-token logits.
_NOT_LOGIT_TRANSFORMS = {"attn_logit_softcapping", "output_router_logits", "num_logits_to_keep",
                         "output_logits", "moe_router_logit_softcapping", "router_logit_softcapping",
                         "logit_scale_init_value", "output_auxiliary_logits"}
# A config field whose name says it may scale, cap or shift the output logits.
_SUSPECT_LOGIT_FIELD = re.compile(r"logit|lm_head_mult|output_mult|width_mult|mup")


def _trivial(value) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and value in (0, 1))


@dataclass(frozen=True)
class OutputLayer:
    """logits = softcap(scale · (W h + b)); h is the final-norm output, shape (batch, d_model).

    weight: (vocab, d_model) the LM head (tied to the input embedding where the model ties them).
    bias: (vocab,) or None.
    scale: the total multiplier on the logits (Cohere's `logit_scale`, 1 / Granite's `logits_scaling`).
    softcap: c in c·tanh(x / c), or None. With soft-capping, KL(p ‖ softmax(logits(h))) is no
        longer convex in h, so the free-h "bound" is a local optimum, not a certified bound.
    """

    weight: Tensor
    bias: Tensor | None
    scale: float
    softcap: float | None

    def logits(self, hidden: Tensor) -> Tensor:
        """(batch, d_model) final hidden states → (batch, vocab) float32 logits."""
        logits = hidden.to(self.weight.dtype) @ self.weight.T  # model dtype; float32 from here on
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _logit_transforms(model) -> tuple[float, float | None]:
    """(scale, softcap) from the config, by meaning; refuses fields it does not understand."""
    cfg = text_config(model)
    scale, softcap = 1.0, None
    for name, kind in LOGIT_TRANSFORMS.items():
        value = getattr(cfg, name, None)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            if kind == "softcap" and not value:
                continue  # 0 / None: no capping
            raise ModelStructureError(f"config.{name} = {value!r} is not a positive number; dplib reads it as a "
                                      f"logit transform ({kind}). Fix the config, or pass dplib.lm.configure(model, "
                                      "logit_scale=..., logit_softcap=...).")
        if kind == "multiply":
            scale *= float(value)
        elif kind == "divide":
            scale /= float(value)
        else:
            softcap = float(value)
    unknown = {k: v for k, v in cfg.to_dict().items()
               if _SUSPECT_LOGIT_FIELD.search(k) and k not in LOGIT_TRANSFORMS and k not in _NOT_LOGIT_TRANSFORMS
               and not _trivial(v) and not isinstance(v, (dict, list, str))}
    if unknown:
        raise ModelStructureError(
            f"{type(model).__name__}'s config has {unknown}, which may transform the output logits in a way "
            "dplib does not know. Check the model's forward and pass the total effect with "
            "dplib.lm.configure(model, logit_scale=..., logit_softcap=...) (that also declares these fields "
            "accounted for).")
    return scale, softcap


def output_layer(model) -> OutputLayer:
    """W, bias, logit scale and soft-capping of a causal LM (see `LOGIT_TRANSFORMS`)."""
    head = _override(model, "head", None) or model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise _missing("output layer", model, "get_output_embeddings() returned no module with a weight",
                       "head")
    overridden = any(p in _OVERRIDES.get(model, {}) for p in ("logit_scale", "logit_softcap"))
    scale, softcap = (1.0, None) if overridden else _logit_transforms(model)
    scale = float(_override(model, "logit_scale", scale))
    softcap = _override(model, "logit_softcap", softcap)
    return OutputLayer(weight=head.weight, bias=getattr(head, "bias", None), scale=scale,
                       softcap=None if softcap is None else float(softcap))


# --------------------------------------------------------------------------------------------
# Body, embeddings, positions.
# --------------------------------------------------------------------------------------------


def body(model):
    """The decoder without its LM head: called with `inputs_embeds=` it returns `.last_hidden_state`."""
    found = _override(model, "body", None)
    if found is not None:
        return found
    if hasattr(model, "get_decoder"):
        found = model.get_decoder()
    if found is None or found is model:
        found = getattr(model, "base_model", None)
    if found is None or found is model:
        raise _missing("decoder body", model, "neither get_decoder() nor base_model gives the decoder", "body")
    return found


def embed(model, ids: Tensor) -> Tensor:
    """Token ids (..., n) → input embeddings (..., n, d_model) exactly as the model embeds them.

    Uses the embedding *module*, so Gemma's √d scaling is included: soft prompts live in that space.
    """
    return model.get_input_embeddings()(ids)


def embedding_matrix(model, probe: Tensor) -> tuple[Tensor, float]:
    """The input embedding weight E (vocab, d) and the scale s with embed(ids) = s · E[ids].

    Checked on `probe` ids, so an embedding module of another form fails loudly (hard prompts need
    the gradient with respect to the one-hot token matrix, s · grad @ Eᵀ).
    """
    module = model.get_input_embeddings()
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ModelStructureError(f"{type(module).__name__}, the input embedding of {type(model).__name__}, has no "
                                  "`weight`; hard prompts need an embedding module of the form scale · E[ids].")
    scale = getattr(module, "embed_scale", 1.0)
    scale = float(scale.item() if isinstance(scale, Tensor) else scale)
    with torch.no_grad():
        expected = weight[probe].float() * scale
        got = embed(model, probe).float()
    if not torch.allclose(got, expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()) + 1e-6):
        raise ModelStructureError(f"{type(module).__name__}: embeddings are not a scaled lookup scale · E[ids] of "
                                  "the weight; hard prompts need an embedding module of that form.")
    return weight, scale


_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(model) -> int | None:
    """The longest sequence the model accepts (config `max_position_embeddings`, GPT-2's `n_positions`,
    ...), or None where the config states no limit (ALiBi models such as Bloom)."""
    given = _override(model, "max_positions")
    if given is not _UNSET:
        return given
    cfg = text_config(model)
    for name in _POSITION_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_length(model, n: int, what: str = "the sequence") -> None:
    """Refuse a sequence of n positions that the model cannot take, before any forward pass."""
    limit = max_positions(model)
    if limit is not None and n > limit:
        raise ValueError(f"{what} has {n} positions but {type(model).__name__} accepts at most {limit} "
                         f"(config max positions); shorten the prompt, prefix or suffix.")


# --------------------------------------------------------------------------------------------
# The hot path: last-position hidden state and log-probabilities.
# --------------------------------------------------------------------------------------------


def last_hidden(model, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
    """Run the body; return the final-norm hidden state at the last position, (batch, d_model), contiguous.

    The hot path: it does not re-run `check` (every dplib entry point calls `check(model)` once
    first; do the same when calling this directly on a new model).
    """
    check_length(model, inputs_embeds.shape[1])
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    out = body(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state[:, -1, :].contiguous()


def next_token_logprobs(model, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                        head: OutputLayer | None = None) -> Tensor:
    """(batch, n, d_model) input embeddings → (batch, vocab) float32 next-token log-probabilities.

    Only the last position reaches the LM head. Pass `head=output_layer(model)` when calling in a loop.
    """
    head = head or output_layer(model)
    return torch.log_softmax(head.logits(last_hidden(model, inputs_embeds, attention_mask)), dim=-1)


def continuation_logprobs(model, context_embeds: Tensor, continuation_embeds: Tensor,
                          head: OutputLayer | None = None) -> Tensor:
    """Log-probabilities along B continuations of one shared context, the context run once.

    context_embeds: (1, n, d_model); continuation_embeds: (B, k, d_model) (right-padded rows are fine:
    a causal model's output at a position never sees later ones). Returns (B, k + 1, vocab) float32:
    row b, position j is the next-token distribution after the context and the first j tokens of
    continuation b. The context's key/value cache is computed once and repeated over the batch, so B
    continuations cost B·k positions, not B·(n + k). Call `check(model)` once first.
    """
    head = head or output_layer(model)
    check_length(model, context_embeds.shape[1] + continuation_embeds.shape[1])
    dec = body(model)
    out = dec(inputs_embeds=context_embeds, use_cache=True)
    cache = out.past_key_values
    batch = continuation_embeds.shape[0]
    cache.batch_repeat_interleave(batch)
    more = dec(inputs_embeds=continuation_embeds, past_key_values=cache, use_cache=True).last_hidden_state
    hidden = torch.cat([out.last_hidden_state[:, -1:, :].expand(batch, -1, -1), more], dim=1)
    b, k, d = hidden.shape
    return torch.log_softmax(head.logits(hidden.reshape(b * k, d)), dim=-1).reshape(b, k, -1)


def kl_from_logprobs(target_probs: Tensor, model_logprobs: Tensor) -> Tensor:
    """KL(p ‖ q) per row for (batch, vocab) target probabilities and model log-probabilities; float32.

    The hot-path form of `metrics.kl`: xlogy gives 0·log 0 = 0 exactly.
    """
    p = target_probs.float()
    return (torch.special.xlogy(p, p) - p * model_logprobs).sum(-1)


def check(model) -> None:
    """Check once per model (and device, dtype, weights) that the fast path equals the model's full forward.

    Runs `model(input_ids).logits` on a short probe and compares its last-position log-softmax with
    `output_layer(model).logits(last_hidden(...))`. A mismatch means a piece dplib read is wrong or
    missing (an unknown logit transform, a head or norm applied outside the body): it raises
    ModelStructureError rather than let any number be computed.
    """
    param = _param(model)
    head = output_layer(model)
    state = (param.device, param.dtype, _weights_state(model), head.scale, head.softcap)
    if _VERIFIED.get(model) == state:
        return
    width = int(head.weight.shape[0])
    ids = torch.tensor([[(17 + 7919 * i) % width for i in range(6)]], device=param.device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, -1, :].float()
        reference = torch.log_softmax(logits, -1)
        out = body(model)(inputs_embeds=embed(model, ids), use_cache=False)
        fast = torch.log_softmax(head.logits(out.last_hidden_state[:, -1, :].contiguous()), -1)
    if reference.shape != fast.shape:
        raise ModelStructureError(
            f"{type(model).__name__}: the model's logits have width {reference.shape[-1]} but its output layer "
            f"has {fast.shape[-1]} rows; supply the head with dplib.lm.configure(model, head=...).")
    # rounding differences (2-D vs 3-D matmuls) scale with the logits' magnitude: ~1e-6 relative in
    # float32, ~2⁻⁸ in bfloat16; a dropped transform, bias or norm term moves log-probs by O(1)
    scale = 1.0 + float(logits.abs().max())
    rel = 1e-5 if param.dtype == torch.float32 else 2.0 ** -6
    diff = float((reference - fast).abs().max())
    if not diff <= rel * scale:
        raise ModelStructureError(
            f"{type(model).__name__}: dplib's last-position path (body → output layer, scale {head.scale:g}, "
            f"softcap {head.softcap}) differs from the model's own forward by {diff:.3g} nats in log-probability. "
            "The family applies something dplib does not read (a logit transform, a norm or projection after "
            "the body, an embedding scale). Supply the missing piece with dplib.lm.configure(model, head=..., "
            "logit_scale=..., logit_softcap=..., body=...).")
    _VERIFIED[model] = state


# --------------------------------------------------------------------------------------------
# Final norm and layers.
# --------------------------------------------------------------------------------------------

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f")
_LAYER_NAMES = ("layers", "h", "blocks", "block", "decoder_layers")


def final_norm(model) -> torch.nn.Module:
    """The final normalisation module, checked to be the last thing the body applies.

    Looked up under the names families use (`norm`, `final_layernorm`, `final_layer_norm`, `ln_f`, ...),
    then checked on a probe: its output at the last position must equal the body's
    `last_hidden_state` (so a projection after the norm, as in some OPT sizes, is refused).
    """
    module = _override(model, "final_norm", None)
    if module is None:
        dec = body(model)
        module = next((getattr(dec, n) for n in _NORM_NAMES if isinstance(getattr(dec, n, None), torch.nn.Module)),
                      None)
        if module is None:
            raise _missing("final norm", model, f"the decoder {type(dec).__name__} has none of the attributes "
                           f"{_NORM_NAMES}", "final_norm")
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    try:
        width = logits_width(model)
        ids = torch.tensor([[(5 + 7919 * i) % width for i in range(4)]], device=_param(model).device)
        with torch.no_grad():
            hidden = body(model)(inputs_embeds=embed(model, ids), use_cache=False).last_hidden_state
    finally:
        handle.remove()
    out = seen.get("out")
    out = out[0] if isinstance(out, tuple) else out
    if out is None or out.shape != hidden.shape or not torch.allclose(out.float(), hidden.float(), atol=1e-5, rtol=1e-3):
        raise ModelStructureError(
            f"{type(module).__name__} is not the last step of {type(body(model)).__name__} (its output is not the "
            "body's last_hidden_state, e.g. a projection follows it): norm_bound cannot use it. Supply the "
            "final norm with dplib.lm.configure(model, final_norm=...).")
    return module


def layers(model) -> Sequence[torch.nn.Module]:
    """The decoder's layers, in order (`layers`, GPT-2/Bloom's `h`, ...), checked against the config."""
    found = _override(model, "layers", None)
    if found is not None:
        return found
    dec = body(model)
    n = getattr(text_config(model), "num_hidden_layers", None)
    for name in _LAYER_NAMES:
        value = getattr(dec, name, None)
        if isinstance(value, torch.nn.ModuleList) and len(value) and (n is None or len(value) == n):
            return value
    raise _missing("decoder layers", model, f"the decoder {type(dec).__name__} has no ModuleList named "
                   f"{_LAYER_NAMES} with num_hidden_layers={n} entries", "layers")


@dataclass(frozen=True)
class NormSpec:
    """What the final norm can output: γ ⊙ u + β, ‖u‖ < radius (and Σ u = 0 for LayerNorm).

    Read by calling the module, so Gemma's (1 + w), parameter-free LayerNorms (OLMo) and
    bias-free centred norms (Cohere) come out right without knowing their classes. ε only
    shrinks ‖u‖ below √d, so the closure ‖u‖ ≤ √d that the bound uses holds for any ε.
    """

    kind: str  # "rms" or "layer"
    gamma: Tensor  # (d,) float64, the effective scale
    beta: Tensor | None  # (d,) float64 shift (LayerNorm bias), or None
    radius: float  # √d


def norm_spec(model) -> NormSpec:
    """Describe the final norm by calling it: centring (LayerNorm) or not (RMSNorm), γ and β.

    Probes (float64 maths on the module's outputs): N(0) = β; N(c·1) for large c is γ for RMSNorm and
    β for LayerNorm (centring removes a constant); N(c·x) for centred x gives γ ⊙ x/rms(x) + β. The
    formula is then checked on random inputs, so a norm of another kind is refused.
    """
    norm = final_norm(model)
    d = int(text_config(model).hidden_size)
    p = _param(model)
    tol = 1e-4 if p.dtype == torch.float32 else 2e-2

    def call(x: Tensor) -> Tensor:
        with torch.no_grad():
            out = norm(x.to(p.device, p.dtype)[None, None])
        return (out[0] if isinstance(out, tuple) else out).double().cpu()[0, 0]

    big = 1e3
    beta = call(torch.zeros(d, dtype=torch.float64))
    at_ones = call(torch.full((d,), big, dtype=torch.float64))
    centred = torch.allclose(at_ones, beta, atol=tol * (1 + float(beta.abs().max())))
    g = torch.Generator().manual_seed(0)
    if centred:
        gamma = torch.zeros(d, dtype=torch.float64)
        weight = torch.zeros(d, dtype=torch.float64)
        for _ in range(2):  # two probes, each coordinate read from the one where it is larger
            x = torch.randn(d, generator=g, dtype=torch.float64)
            x -= x.mean()
            x /= x.pow(2).mean().sqrt()
            est = (call(big * x) - beta) / x
            better = x.abs() > weight
            gamma, weight = torch.where(better, est, gamma), torch.where(better, x.abs(), weight)
        kind = "layer"
    else:
        if beta.abs().max() > tol:
            raise ModelStructureError(f"the final norm {type(norm).__name__} shifts a zero input by β but does not "
                                      "centre: dplib knows RMSNorm and LayerNorm; supply a norm_bound-compatible "
                                      "module with dplib.lm.configure(model, final_norm=...).")
        gamma, beta, kind = at_ones, None, "rms"
    for _ in range(3):
        x = 3 * torch.randn(d, generator=g, dtype=torch.float64) + 0.5
        c = x - x.mean() if kind == "layer" else x
        expected = gamma * c / c.pow(2).mean().sqrt() + (0 if beta is None else beta)
        if not torch.allclose(call(x), expected, rtol=tol * 10, atol=tol * 10 * (1 + float(expected.abs().max()))):
            raise ModelStructureError(
                f"the final norm {type(norm).__name__} does not behave like {kind}-norm γ ⊙ x / √(mean x² + ε)"
                f"{' (+ β, x centred)' if kind == 'layer' else ''}; norm_bound does not support it.")
    return NormSpec(kind, gamma, beta, math.sqrt(d))


# --------------------------------------------------------------------------------------------
# Tokens: special and allowed.
# --------------------------------------------------------------------------------------------


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token: BOS, EOS, PAD, chat markers, every added token marked special."""
    ids = set(tokenizer.all_special_ids)
    ids |= {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return ids


def allowed_tokens(tokenizer, width: int, *, ascii_only: bool = False) -> Tensor:
    """(width,) bool mask of the token ids a real prompt may use.

    Excluded always: special tokens and the padding rows beyond `len(tokenizer)` (they have
    embeddings but no string). With `ascii_only`, tokens whose decoded text is empty or not
    printable ASCII are excluded too.
    """
    n = min(len(tokenizer), width)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[:n] = True
    mask[[i for i in special_ids(tokenizer) if 0 <= i < width]] = False
    if ascii_only:
        for i in range(n):
            if mask[i]:
                text = tokenizer.decode([i])
                mask[i] = bool(text) and text.isascii() and text.isprintable()
    return mask


# --------------------------------------------------------------------------------------------
# The prompt frame: what surrounds a prompt, for every method and target builder.
# --------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


@dataclass(frozen=True)
class PromptFrame:
    """The fixed parts around a prompt and the one rule that joins them.

    A prompt of ids P is fed as `prefix_ids + P + suffix_ids`; a prompt *text* t is fed as
        special + encode(prefix_text + t + suffix_text)        (`encode`)
    and the two agree exactly when t re-tokenises to P in place (`text_reproduces`).

    special: token ids before everything: the tokenizer's BOS token when prefix == "bos" (and
        the tokenizer has one), never text.
    prefix_text, suffix_text: fixed text around the prompt.
    prefix_ids, suffix_ids: `special + encode(prefix_text)` and `encode(suffix_text)`.
    max_positions: the model's position limit (None = none stated).
    """

    special: tuple[int, ...]
    prefix_text: str
    suffix_text: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    max_positions: int | None = None
    _tokenizer: object = field(default=None, repr=False, compare=False)

    @property
    def joined(self) -> bool:
        """True when prefix or suffix text can merge with the prompt text at a boundary."""
        return bool(self.prefix_text or self.suffix_text)

    def check_length(self, n_prompt: int) -> None:
        """Refuse a prompt of n_prompt positions that, framed, exceeds the model's position limit."""
        n = len(self.prefix_ids) + n_prompt + len(self.suffix_ids)
        if self.max_positions is not None and n > self.max_positions:
            raise ValueError(f"a prompt of {n_prompt} positions with its prefix ({len(self.prefix_ids)}) and suffix "
                             f"({len(self.suffix_ids)}) has {n} positions, but the model accepts at most "
                             f"{self.max_positions}; use a shorter prompt_length, prefix or suffix.")

    def ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """prefix_ids + prompt_ids + suffix_ids."""
        return [*self.prefix_ids, *map(int, prompt_ids), *self.suffix_ids]

    def encode(self, text: str) -> list[int]:
        """The from-scratch tokenisation of a prompt text, as the model sees it."""
        return [*self.special, *_encode(self._tokenizer, self.prefix_text + text + self.suffix_text)]

    def text_reproduces(self, prompts: Sequence[Sequence[int]]) -> tuple[list[bool], list[str]]:
        """For each prompt (ids), whether its decoded text re-tokenises to exactly its ids, alone and
        framed (so the text means what was scored); and the decoded texts."""
        tok = self._tokenizer
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            return [], []
        texts = tok.batch_decode(prompts)
        alone = tok(texts, add_special_tokens=False)["input_ids"]
        ok = [list(a) == p for a, p in zip(alone, prompts, strict=True)]
        idx = [i for i, good in enumerate(ok) if good]
        if self.joined and idx:
            whole = tok([self.prefix_text + texts[i] + self.suffix_text for i in idx],
                        add_special_tokens=False)["input_ids"]
            middle = list(self.prefix_ids[len(self.special):])
            for i, w in zip(idx, whole, strict=True):
                ok[i] = list(w) == middle + prompts[i] + list(self.suffix_ids)
        return ok, texts


def bos_id(tokenizer) -> int | None:
    """The BOS token id dplib puts before every prompt and context: the tokenizer's, or None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


CHAT = "chat"  # the `prefix` value that places the prompt inside the tokenizer's chat template


class ChatTemplateError(ValueError):
    """prefix="chat" cannot be used with this tokenizer; the message says what to set instead."""


def prompt_frame(model, tokenizer, prefix: str = "bos", suffix: str = "") -> PromptFrame:
    """The frame around a prompt: prefix "bos" = the tokenizer's BOS token (nothing if it has none),
    "" = nothing, "chat" = the tokenizer's chat template (`chat_frame`), any other string = that
    literal text; suffix = literal text after the prompt (with "chat": inside the user message)."""
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise TypeError(f"prefix and suffix must be strings ('bos', 'chat', '' or text); got {prefix!r}, {suffix!r}.")
    if prefix == CHAT:
        return chat_frame(model, tokenizer, suffix)
    special: tuple[int, ...] = ()
    prefix_text = prefix
    if prefix == "bos":
        prefix_text = ""
        bos = bos_id(tokenizer)
        if bos is not None:
            special = (bos,)
        else:
            log.info("prefix='bos' but the tokenizer has no BOS token: no prefix is used")
    return PromptFrame(special, prefix_text, suffix, special + tuple(_encode(tokenizer, prefix_text)),
                       tuple(_encode(tokenizer, suffix)), max_positions(model), tokenizer)


# A marker no template alters: the user message is rendered with it, then split there.
_PLACEHOLDER = "<<dplib-prompt-7f3a>>"


def chat_frame(model, tokenizer, suffix: str = "") -> PromptFrame:
    """The frame that places the prompt inside the model's chat template.

    The conversation is one user message, `prompt + suffix`, rendered by the tokenizer's chat
    template with the generation prompt, so the next token is the first of the assistant's answer
    (the template's default system message, if it adds one, is kept: it is what the model sees in
    use). The rendering is split at the prompt: prefix_text is everything before it, suffix_text
    everything after (`suffix`, the end of the user turn, the assistant header).

    BOS: templates write the BOS token as text (Gemma's "<bos>", SmolLM2's "<|im_start|>"); when the
    rendering starts with the tokenizer's BOS text it is moved into `special` as the id, once, so it
    is never doubled. The frame is checked against the conversation as Hugging Face tokenises it
    (`tokenizer(apply_chat_template(..., tokenize=False), add_special_tokens=False)`) on a probe
    prompt, and the template must insert the user message verbatim (a template that trims or
    rewrites it cannot hold an optimised prompt unchanged): either failure raises ChatTemplateError.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(
            f"prefix='chat' needs a chat template, but {type(tokenizer).__name__} has none "
            "(tokenizer.chat_template is not set; base models usually have none). Set "
            "tokenizer.chat_template to the model's Jinja template, or frame the prompt with plain text "
            "instead: prefix='bos', suffix='\\nAnswer:'.")

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    rendered = render(_PLACEHOLDER + suffix)
    if rendered.count(_PLACEHOLDER) != 1:
        raise ChatTemplateError("the chat template does not render the user message exactly once; dplib cannot "
                                "place a prompt in it. Set tokenizer.chat_template to one that does.")
    before, after = rendered.split(_PLACEHOLDER)
    pad = " \n"  # whitespace a trimming template would drop: the message must come through verbatim
    if render(pad + _PLACEHOLDER + pad + suffix) != before + pad + _PLACEHOLDER + pad + after:
        raise ChatTemplateError(
            "the chat template changes the user message (e.g. trims whitespace around it), so an optimised "
            "prompt would not reach the model unchanged. Set tokenizer.chat_template to a version that "
            "inserts message['content'] as is (e.g. without `| trim`).")
    special: tuple[int, ...] = ()
    bos, bos_text = bos_id(tokenizer), getattr(tokenizer, "bos_token", None)
    if bos is not None and bos_text and before.startswith(bos_text):
        special, before = (bos,), before[len(bos_text):]
    frame = PromptFrame(special, before, after, special + tuple(_encode(tokenizer, before)),
                        tuple(_encode(tokenizer, after)), max_positions(model), tokenizer)
    probe = "Hello there"
    expected = list(tokenizer(render(probe + suffix), add_special_tokens=False)["input_ids"])
    if frame.encode(probe) != expected:
        raise ChatTemplateError(
            "dplib's split of the chat template does not tokenise like the rendered conversation "
            f"({frame.encode(probe)} vs {expected} on a probe); the template's prefix or suffix text "
            "merges with the user message. Use prefix/suffix text instead of prefix='chat'.")
    return frame


# --------------------------------------------------------------------------------------------
# Identity: a fingerprint of the weights.
# --------------------------------------------------------------------------------------------

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_state(model) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (torch's version counters)."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


def fingerprint(model) -> str:
    """sha256 (hex, 32 chars) of the model's config, parameter names, shapes, dtypes and values.

    Two models share it only if they compute the same function in the same dtype: a name says
    nothing (in-memory models are all called after their class). Memoised per model and re-computed
    when any parameter is replaced or modified in place (tracked by torch's tensor version counters).
    """
    params = list(model.named_parameters())
    state = _weights_state(model)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == state:
        return memo[1]
    h = hashlib.sha256()
    h.update(json.dumps(text_config(model).to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps({k: str(v) for k, v in _OVERRIDES.get(model, {}).items()}, sort_keys=True).encode())
    for name, p in params:
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    digest = h.hexdigest()[:32]
    _FINGERPRINTS[model] = (state, digest)
    return digest

"""The hot path: the body, then the head on the last position only, as one 2-D matmul.

Full-sequence logits waste the head on positions never read, and `logits_to_keep=1` feeds the head a
non-contiguous 3-D slice that is slow on CPU (measured by benchmarks/soft_step.py).
`last_hidden_after` and `continuation_logprobs` run a shared context once and reuse its key/value
cache across the batch. `kl_from_logprobs` is the one KL-from-log-probs used on this path.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .decoder import body, check_length
from .head import OutputLayer, output_layer


# The key/value cache's name: transformers ≥ 5.24 calls it `cache` (output field and forward argument)
# and warns on the older `past_key_values`, which earlier 5.x releases need; both are read by name here.
def cache_kwarg(decoder) -> str:
    """The forward argument that passes a key/value cache to `decoder`: "cache" or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def output_cache(out):
    """The key/value cache a forward with use_cache=True returned (its field is named as above)."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


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


def last_hidden_after(model, context_embeds: Tensor, inputs_embeds: Tensor,
                      context_index: Tensor | None = None) -> Tensor:
    """`last_hidden` of [context, inputs] for B rows that follow C contexts, each context run once.

    context_embeds: (C, n, d_model), n ≥ 1, the contexts (a fixed prefix, or a prefix and the first
    prompt tokens); inputs_embeds: (B, k, d_model), k ≥ 1; context_index: (B,) long, the context each
    row follows (None: C must be 1, every row follows it). Returns (B, d_model): the final-norm hidden
    state at the last position of each row. The contexts' key/value cache is computed once and
    gathered over the batch, so a batch costs C·n + B·k positions, not B·(n + k). The same numbers as
    `last_hidden(cat([context, inputs]))` up to float rounding (checked by the optimisers that use it,
    `optim.hard`, once per search).
    """
    check_length(model, context_embeds.shape[1] + inputs_embeds.shape[1])
    if context_index is None and context_embeds.shape[0] != 1:
        raise ValueError(f"{context_embeds.shape[0]} contexts need a context_index (B,) saying which one "
                         "each row follows.")
    dec = body(model)
    cache = output_cache(dec(inputs_embeds=context_embeds, use_cache=True))
    if context_index is None:
        cache.batch_repeat_interleave(inputs_embeds.shape[0])
    else:
        cache.batch_select_indices(context_index)
    out = dec(inputs_embeds=inputs_embeds, use_cache=True, **{cache_kwarg(dec): cache}).last_hidden_state
    return out[:, -1, :].contiguous()


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
    cache = output_cache(out)
    batch = continuation_embeds.shape[0]
    cache.batch_repeat_interleave(batch)
    more = dec(inputs_embeds=continuation_embeds, use_cache=True, **{cache_kwarg(dec): cache}).last_hidden_state
    hidden = torch.cat([out.last_hidden_state[:, -1:, :].expand(batch, -1, -1), more], dim=1)
    b, k, d = hidden.shape
    return torch.log_softmax(head.logits(hidden.reshape(b * k, d)), dim=-1).reshape(b, k, -1)


def kl_from_logprobs(target_probs: Tensor, model_logprobs: Tensor, neg_entropy: Tensor | None = None) -> Tensor:
    """KL(p ‖ q) per row, nats: (..., vocab) target probabilities and model log-probabilities → (...,).

    The hot-path form of `metrics.kl`: xlogy gives 0·log 0 = 0 exactly. Computed in float32 (float64
    inputs stay float64). neg_entropy: (...,) Σ p log p of the same rows, precomputed, for callers that
    score many prompts against one target (the hard search, the bounds); the result is then
    neg_entropy − Σ p log q.
    """
    p = target_probs if target_probs.dtype == torch.float64 else target_probs.float()
    if neg_entropy is None:
        return (torch.special.xlogy(p, p) - p * model_logprobs).sum(-1)
    return neg_entropy - (p * model_logprobs).sum(-1)

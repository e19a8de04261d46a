"""The decoder body (inputs_embeds → final-norm hidden states), its input embeddings and position limit.

`body(model)` is the decoder without its head; `embed` embeds ids exactly as the model does (Gemma's
√d scaling included); `embedding_matrix` reads the embedding as s · E[ids] for hard prompts;
`max_positions` is the config's position limit (None where it states none, e.g. ALiBi).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import _UNSET, ModelStructureError, _missing, _override, text_config


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

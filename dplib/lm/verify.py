"""`check`: the fast path equals the model's own forward; `configure`: supply a piece dplib cannot find.

The first call of `check` on a model (and device, dtype, weights) compares the last-position path
(body → output layer) with `model(input_ids).logits` on a short probe: a family with a piece dplib
does not know fails there with an error naming the piece, instead of giving a wrong number.
"""

from __future__ import annotations

import torch

from .config import _OVERRIDES, _UNSET, _VERIFIED, ModelStructureError, _param, _weights_state
from .decoder import body, embed
from .head import output_layer


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

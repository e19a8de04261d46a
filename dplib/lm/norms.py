"""The final normalisation module and the decoder's layers, located and checked.

`final_norm` looks under the names families use (`_NORM_NAMES`) and checks the module is what
produces the body's output; `norm_spec` describes it by calling it (RMSNorm, Gemma's 1 + w,
LayerNorm with or without affine parameters); `layers` finds the layer list (`_LAYER_NAMES`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelStructureError, _missing, _override, _param, text_config
from .decoder import body, embed
from .head import logits_width

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

"""The output layer: logits = softcap(scale · (W h + b)), with every logit transform read from the config.

Transforms are read *by meaning* (`LOGIT_TRANSFORMS`: Cohere's multiplier `logit_scale`, Granite's
divisor `logits_scaling`, Gemma-2's `final_logit_softcapping`); a config field that looks like another
logit transform (`_SUSPECT_LOGIT_FIELD`) is refused, never ignored. `logits_width(model)` is the
width of the next-token logits (rows of the head; it can exceed `len(tokenizer)`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import _OVERRIDES, ModelStructureError, _missing, _override, text_config

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



def logits_width(model) -> int:
    """The model's next-token logits width (rows of the output embedding), ≥ len(tokenizer)."""
    return int(output_layer(model).weight.shape[0])

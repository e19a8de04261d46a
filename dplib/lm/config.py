"""The model's config, the pieces a user supplies, and the error for a piece dplib cannot find.

`ModelStructureError` names the missing piece and the `dplib.lm.configure(model, ...)` argument that
supplies it; `configure` (in `verify`) writes the overrides kept here, which every other `lm` module
reads with `_override`. Kept per model in weak dictionaries, so they go when the model does.
"""

from __future__ import annotations

import weakref

from torch import Tensor


class ModelStructureError(NotImplementedError):
    """dplib cannot find (or does not understand) a piece of a model; the message names the piece and
    the `dplib.lm.configure(model, ...)` argument that supplies it."""


# Overrides: how a user supplies a piece dplib cannot find (written by `verify.configure`).
_OVERRIDES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {piece: value}
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (device, dtype) checked
_UNSET = object()


def _override(model, piece: str, default=_UNSET):
    return _OVERRIDES.get(model, {}).get(piece, default)


def _missing(piece: str, model, what: str, argument: str) -> ModelStructureError:
    return ModelStructureError(
        f"dplib cannot find the {piece} of {type(model).__name__}: {what}. Supply it with "
        f"dplib.lm.configure(model, {argument}=...).")


# --------------------------------------------------------------------------------------------
# What every piece reads from the model: its config, a parameter, the state of its weights.
# --------------------------------------------------------------------------------------------


def text_config(model):
    """The config that describes the text decoder (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _param(model) -> Tensor:
    return next(model.parameters())


def _weights_state(model) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (torch's version counters)."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())

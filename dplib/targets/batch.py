"""The `Targets` batch type and its validation.

A target is a probability vector over a model's whole vocabulary — the logits width, which can
exceed `len(tokenizer)` — plus metadata. A batch of T targets is a `Targets`: `probs` (T, vocab),
`entropy` (T,) in nats, and one metadata row per target (`frame()`), whose `target_id` names the
target stably so that per-cell seeds can derive from it. `validate_probs` is the check every
sampler's output and every user-made batch passes; `TargetError` is the one error type of
`dplib.targets`, its message saying what is wrong and how to fix it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from .. import metrics
from ..lm import logits_width

SUM_TOLERANCE = 1e-4  # |Σ p − 1| allowed without renormalising


class TargetError(ValueError):
    """A target distribution is invalid; the message says what is wrong and how to fix it."""


def validate_probs(probs: Tensor, *, renormalize: bool = False, name: str = "probs") -> Tensor:
    """Check a (T, vocab) batch of distributions; return it (renormalised only if asked).

    Raises TargetError when a row is not finite, has a negative entry, or does not sum to 1
    within 1e-4 (with `renormalize=True` such rows are rescaled, with a warning).
    """
    if not isinstance(probs, Tensor):
        raise TargetError(f"{name} must be a torch.Tensor of shape (T, vocab), got {type(probs).__name__}.")
    if probs.ndim == 1:
        raise TargetError(f"{name} has shape {tuple(probs.shape)}; a batch of targets is 2-D (T, vocab): "
                          "use probs.unsqueeze(0) for a single target.")
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise TargetError(f"{name} must have shape (T, vocab) with T, vocab ≥ 1; got {tuple(probs.shape)}.")
    if not probs.is_floating_point():
        raise TargetError(f"{name} must be a floating-point tensor, got {probs.dtype}.")
    bad = ~torch.isfinite(probs).all(-1)
    if bad.any():
        raise TargetError(f"{name} rows {_rows(bad)} contain NaN or inf; every probability must be finite.")
    bad = (probs < 0).any(-1)
    if bad.any():
        raise TargetError(f"{name} rows {_rows(bad)} contain negative entries; probabilities must be ≥ 0 "
                          "(did you pass logits or log-probabilities? use probs = logits.softmax(-1)).")
    sums = probs.double().sum(-1)
    bad = (sums - 1).abs() > SUM_TOLERANCE
    if bad.any():
        if not renormalize:
            raise TargetError(
                f"{name} rows {_rows(bad)} do not sum to 1 within {SUM_TOLERANCE} (sums: "
                f"{[round(float(s), 6) for s in sums[bad][:5]]}); pass renormalize=True to rescale them.")
        if (sums[bad] <= 0).any():
            raise TargetError(f"{name} rows {_rows(bad & (sums <= 0))} have zero total mass and cannot be renormalised.")
        warnings.warn(f"renormalising {name} rows {_rows(bad)}, whose sums were off by up to "
                      f"{float((sums - 1).abs().max()):.3g}", stacklevel=3)
        probs = probs / sums.to(probs.dtype).unsqueeze(-1)
    return probs


def _rows(mask: Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    return str(idx[:10])[:-1] + (", ...]" if len(idx) > 10 else "]")


@dataclass
class Targets:
    """A batch of T target distributions over one vocabulary.

    Attributes:
        probs: (T, vocab) probabilities, float32 or float64, on CPU unless moved.
        meta: T rows of metadata; always has `target_id` (unique, stable) and `kind`. Samplers add
            `requested_entropy_nats`, `seed`, `k`, `mass`, `source_model`, `context`, `position`,
            `mass_lost`, ... as they apply; missing values are NaN/None.
    """

    probs: Tensor
    meta: pd.DataFrame = field(default=None)

    def __post_init__(self):
        self.probs = validate_probs(self.probs)
        if self.meta is None:
            self.meta = pd.DataFrame({"kind": ["custom"] * len(self.probs)})
        self.meta = self.meta.reset_index(drop=True).copy()
        if len(self.meta) != len(self.probs):
            raise TargetError(f"meta has {len(self.meta)} rows but probs has {len(self.probs)} targets.")
        if "kind" not in self.meta:
            self.meta["kind"] = "custom"
        if "target_id" not in self.meta:
            self.meta.insert(0, "target_id", [f"{k}-{i}" for i, k in enumerate(self.meta["kind"])])
        dup = self.meta["target_id"].duplicated()
        if dup.any():
            raise TargetError(f"target_id must be unique; repeated: {self.meta['target_id'][dup].tolist()[:5]}.")

    @classmethod
    def from_probs(cls, probs: Tensor, *, kind: str = "custom", renormalize: bool = False,
                   meta: pd.DataFrame | None = None) -> Targets:
        """Wrap user-made distributions (T, vocab) as Targets, validating (and optionally renormalising) them."""
        probs = validate_probs(probs, renormalize=renormalize)
        meta = pd.DataFrame({"kind": [kind] * len(probs)}) if meta is None else meta
        return cls(probs, meta)

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.probs.shape[1])

    @property
    def entropy(self) -> Tensor:
        """(T,) realised entropy in nats, computed in float64."""
        return metrics.entropy(self.probs.double())

    @property
    def ids(self) -> list[str]:
        return self.meta["target_id"].tolist()

    def frame(self) -> pd.DataFrame:
        """Per-target metadata as a DataFrame, with the realised `entropy_nats`."""
        df = self.meta.copy()
        df["entropy_nats"] = self.entropy.cpu().numpy()
        return df

    def __getitem__(self, idx) -> Targets:
        """A sub-batch: `idx` is an int, a slice, a list of ints, or a boolean mask."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, slice):
            rows = list(range(len(self)))[idx]
        elif isinstance(idx, Tensor) and idx.dtype == torch.bool:
            rows = idx.nonzero().flatten().tolist()
        else:
            rows = [int(i) for i in idx]
        return Targets(self.probs[rows], self.meta.iloc[rows])

    @staticmethod
    def concat(batches: Sequence[Targets]) -> Targets:
        """Join batches over the same vocabulary into one."""
        widths = {b.vocab_size for b in batches}
        if len(widths) != 1:
            raise TargetError(f"cannot concatenate targets of different vocabulary widths {sorted(widths)}.")
        dtype = batches[0].probs.dtype
        for b in batches[1:]:  # promote_types takes exactly two dtypes
            dtype = torch.promote_types(dtype, b.probs.dtype)
        return Targets(torch.cat([b.probs.to(dtype) for b in batches]),
                       pd.concat([b.meta for b in batches], ignore_index=True))

    def check_width(self, model) -> None:
        """Raise TargetError unless the targets' width equals the model's logits width."""
        width = logits_width(model)
        if self.vocab_size != width:
            raise TargetError(
                f"targets have width {self.vocab_size} but the model's logits width is {width}. "
                f"Build targets with vocab_size=logits_width(model) (= {width}; it can exceed "
                "len(tokenizer), the padding rows get zero mass), or map them across tokenizers "
                "with dplib.targets.map_vocab.")


def _check_vocab(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise TargetError(f"vocab_size must be an int ≥ 2 (the model's logits width, logits_width(model)); "
                          f"got {vocab_size!r}.")
    return vocab_size

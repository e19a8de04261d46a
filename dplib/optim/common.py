"""What every optimiser shares: config checks (`require`, `is_int`), best-so-far tracking, the Result type.

What an optimiser reads from the model (the forward pass, the output layer, the prompt frame) lives
in `dplib.lm`, the one package that knows how a causal LM is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Config validation, shared by every optimiser's config.
# --------------------------------------------------------------------------------------------


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless ok: for config checks whose message says how to fix the value."""
    if not ok:
        raise ValueError(message)


def is_int(x) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x) -> bool:
    """An int or a float that is not a bool (finiteness is the caller's rule)."""
    return isinstance(x, int | float) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Best-so-far tracking with per-target early stopping.
# --------------------------------------------------------------------------------------------


class BestTracker:
    """Keeps each target's best loss, the step it was reached and a patience counter.

    `update(loss, step)` takes (T,) current losses (inf for targets not evaluated this step) and
    returns a (T,) bool mask of the targets that improved (beat their best by more than `min_delta`);
    `active` is the mask of targets still running.

    Early stopping (patience 0 = never stop early): a target stops once `patience` consecutive steps
    have passed without *progress*, and only at a step ≥ `min_steps`. Progress means a loss below
    ref · (1 − min_rel_improvement) − min_delta, where ref is the loss at the target's last progress
    (so a slow but steady descent accumulates until it counts, and a plateau of noise does not).
    With min_rel_improvement = 0 and min_steps = 0 this is the plain rule "stop after `patience`
    steps without improving by more than `min_delta`".
    """

    def __init__(self, n: int, patience: int = 0, min_delta: float = 0.0, device=None, *,
                 min_rel_improvement: float = 0.0, min_steps: int = 0):
        self.best = torch.full((n,), math.inf, device=device)
        self.ref = torch.full((n,), math.inf, device=device)  # the loss at the last progress
        self.best_step = torch.full((n,), -1, dtype=torch.long, device=device)
        self.since = torch.zeros(n, dtype=torch.long, device=device)
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.steps = torch.zeros(n, dtype=torch.long, device=device)
        self.patience, self.min_delta = patience, min_delta
        self.min_rel, self.min_steps = min_rel_improvement, min_steps

    def update(self, loss: Tensor, step: int) -> Tensor:
        loss = loss.detach().to(self.best.device)
        improved = self.active & (loss < self.best - self.min_delta)
        self.best = torch.where(improved, loss, self.best)
        self.best_step = torch.where(improved, torch.full_like(self.best_step, step), self.best_step)
        progress = self.active & (loss < self.ref * (1.0 - self.min_rel) - self.min_delta)
        self.ref = torch.where(progress, loss, self.ref)
        self.since = torch.where(progress, torch.zeros_like(self.since), self.since + self.active.long())
        self.steps += self.active.long()
        if self.patience > 0 and step >= self.min_steps:
            self.active &= self.since < self.patience
        return improved

    @property
    def done(self) -> bool:
        return not bool(self.active.any())


# --------------------------------------------------------------------------------------------
# The Result shared by every optimiser.
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What an optimiser found, per target. Tensors are on CPU.

    method: "soft", "hard", "free_bound", "norm_bound", "layer_bound".
    target_ids: T target ids, in the order of the input Targets.
    kl: (T,) best KL(target ‖ model) in nats.
    initial_kl: (T,) KL at the initial prompt (bounds: at h = 0 / the initial point).
    logprobs: (T, vocab) float32, the model's next-token log-probabilities at the best prompt.
    steps: (T,) prompt optimisers: the steps each target took (early stopping makes these differ), i.e.
        its trace rows after row 0; bounds: solver iterations.
    trace: (n_rows, T) KL where the method stood: row 0 at the initial point, then one row per step
        (NaN once a target has stopped); `kl` is its minimum. Bounds: the solver's iterates after row 0.
    wall_s: wall-clock seconds of the whole call.
    prompt_embeds: (T, L, d_model) float32 best soft prompts (soft, layer_bound), else None.
    prompt_ids: (T, L) best token ids (hard; for soft, the nearest-token projection), else None.
    prompt_text: T decoded prompts (hard; for soft, the projection's text), else None. An entry is
        None where the text does not re-tokenise (framed) to exactly `prompt_ids`: no string
        reproduces that prompt, so none is presented as it.
    projected_kl: (T,) soft only: KL reached by the nearest-token projection of the best soft prompt.
    hidden: (T, d_model) float64, free_bound and norm_bound only: the output layer's input h at the
        optimum (what the final hidden state would have to be to reach `kl`).
    meta: plain values for run metadata: the config, solver tolerance, `is_bound`, notes.
    """

    method: str
    target_ids: list[str]
    kl: Tensor
    initial_kl: Tensor
    logprobs: Tensor
    steps: Tensor
    trace: Tensor
    wall_s: float
    prompt_embeds: Tensor | None = None
    prompt_ids: Tensor | None = None
    prompt_text: list[str | None] | None = None
    projected_kl: Tensor | None = None
    hidden: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One tidy row per target: target_id, method, kl_nats, initial_kl_nats, improvement_nats
        (initial − best: ≈ 0 flags a target the optimiser did not move, 'stuck'), steps, wall_s, and
        prompt_text, prompt_text_exact (the text re-tokenises to the prompt's ids) and
        projected_kl_nats where the method has them."""
        df = pd.DataFrame({
            "target_id": self.target_ids,
            "method": self.method,
            "kl_nats": self.kl.double().numpy(),
            "initial_kl_nats": self.initial_kl.double().numpy(),
            "improvement_nats": (self.initial_kl.double() - self.kl.double()).numpy(),
            "steps": self.steps.numpy(),
            "wall_s": self.wall_s,
        })
        if self.prompt_text is not None:
            df["prompt_text"] = self.prompt_text
            df["prompt_text_exact"] = [t is not None for t in self.prompt_text]
        if self.projected_kl is not None:
            df["projected_kl_nats"] = self.projected_kl.double().numpy()
        return df

    def trace_frame(self) -> pd.DataFrame:
        """The per-step trace in long form: target_id, method, step, kl_nats (stopped steps dropped)."""
        n_steps, n = self.trace.shape
        df = pd.DataFrame({
            "target_id": [t for _ in range(n_steps) for t in self.target_ids],
            "method": self.method,
            "step": [s for s in range(n_steps) for _ in range(n)],
            "kl_nats": self.trace.reshape(-1).double().numpy(),
        })
        return df.dropna(subset=["kl_nats"]).reset_index(drop=True)

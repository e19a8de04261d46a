"""What every optimiser shares: the last-position forward pass, the Result type, best-so-far tracking.

The forward pass is the hot path of the whole study. It runs the model *body* on input
embeddings, keeps only the last position's final hidden state as a contiguous (batch, d_model)
matrix, and applies the output layer to it as one 2-D matmul. Full-sequence logits would waste
the head on positions we never read, and `logits_to_keep=1` is a trap on CPU (it feeds the head a
non-contiguous 3-D slice that dispatches to slow batched matrix-vector products; see PERF_NOTES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# The model's output layer, read from the model itself.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputLayer:
    """logits = softcap(scale · (W h + b)); h is the final-norm output, shape (batch, d_model).

    weight: (vocab, d_model) the LM head (tied to the input embedding where the model ties them).
    bias: (vocab,) or None.
    scale: a multiplier on the logits (1.0 for Llama and Gemma-3; some families scale).
    softcap: c in c·tanh(x / c), or None. With soft-capping, KL(p ‖ softmax(logits(h))) is no
        longer convex in h, so the free-h "bound" is a local optimum, not a certified bound.
    """

    weight: Tensor
    bias: Tensor | None
    scale: float
    softcap: float | None

    def logits(self, hidden: Tensor) -> Tensor:
        """(batch, d_model) final hidden states → (batch, vocab) float32 logits."""
        logits = hidden @ self.weight.T  # (batch, vocab), in the model's dtype; float32 from here on
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def output_layer(model) -> OutputLayer:
    """Read W, bias, logit scaling and soft-capping from a causal LM (Llama family, Gemma 2/3, ...)."""
    head = model.get_output_embeddings()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere-style families
    return OutputLayer(weight=head.weight, bias=getattr(head, "bias", None), scale=scale,
                       softcap=float(softcap) if softcap else None)


def body(model):
    """The decoder without its LM head (`model.model` for Llama/Gemma)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def embed(model, ids: Tensor) -> Tensor:
    """Token ids (..., n) → input embeddings (..., n, d_model) exactly as the model embeds them.

    Uses the embedding *module*, so Gemma's √d scaling is included: soft prompts live in that
    scaled space.
    """
    return model.get_input_embeddings()(ids)


def last_hidden(model, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Run the model body; return the final-norm hidden state at the last position, (batch, d_model), contiguous."""
    out = body(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, -1, :].contiguous()


def next_token_logprobs(model, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                        head: OutputLayer | None = None) -> Tensor:
    """(batch, n, d_model) input embeddings → (batch, vocab) float32 next-token log-probabilities.

    Only the last position reaches the LM head. Pass `head=output_layer(model)` when calling in a loop.
    """
    head = head or output_layer(model)
    return torch.log_softmax(head.logits(last_hidden(model, inputs_embeds, attention_mask)), dim=-1)


def kl_from_logprobs(target_probs: Tensor, model_logprobs: Tensor) -> Tensor:
    """KL(p ‖ q) per row for (batch, vocab) target probabilities and model log-probabilities; float32.

    The hot-path form of `metrics.kl`: Σ p log p is a constant of the target, and xlogy gives
    0·log 0 = 0 exactly.
    """
    p = target_probs.float()
    return (torch.special.xlogy(p, p) - p * model_logprobs).sum(-1)


def allowed_tokens(tokenizer, width: int, *, ascii_only: bool = False) -> Tensor:
    """(width,) bool mask of the token ids a real prompt may use.

    Excluded always: special tokens (BOS, EOS, PAD, chat markers, every added special token) and the
    padding rows beyond `len(tokenizer)` (they have embeddings but no string). With `ascii_only`,
    tokens whose decoded text is empty or not printable ASCII are excluded too.
    """
    n = min(len(tokenizer), width)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[:n] = True
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    mask[[i for i in special if i < width]] = False
    if ascii_only:
        for i in range(n):
            if mask[i]:
                text = tokenizer.decode([i])
                mask[i] = bool(text) and text.isascii() and text.isprintable()
    return mask


# --------------------------------------------------------------------------------------------
# Best-so-far tracking with per-target early stopping.
# --------------------------------------------------------------------------------------------


class BestTracker:
    """Keeps each target's best loss, the step it was reached and a patience counter.

    `update(loss)` takes (T,) current losses (inf for targets not evaluated this step) and returns
    a (T,) bool mask of the targets that improved; `active` is the mask of targets still running.
    A target stops after `patience` consecutive steps without improving by more than `min_delta`
    (patience 0 = never stop early).
    """

    def __init__(self, n: int, patience: int = 0, min_delta: float = 0.0, device=None):
        self.best = torch.full((n,), math.inf, device=device)
        self.best_step = torch.full((n,), -1, dtype=torch.long, device=device)
        self.since = torch.zeros(n, dtype=torch.long, device=device)
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.steps = torch.zeros(n, dtype=torch.long, device=device)
        self.patience, self.min_delta = patience, min_delta

    def update(self, loss: Tensor, step: int) -> Tensor:
        loss = loss.detach().to(self.best.device)
        improved = self.active & (loss < self.best - self.min_delta)
        self.best = torch.where(improved, loss, self.best)
        self.best_step = torch.where(improved, torch.full_like(self.best_step, step), self.best_step)
        self.since = torch.where(improved, torch.zeros_like(self.since), self.since + self.active.long())
        self.steps += self.active.long()
        if self.patience > 0:
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
    steps: (T,) steps each target ran (early stopping makes these differ).
    trace: (n_steps, T) float32 KL at each step (NaN once a target has stopped).
    wall_s: wall-clock seconds of the whole call.
    prompt_embeds: (T, L, d_model) float32 best soft prompts (soft, layer_bound), else None.
    prompt_ids: (T, L) best token ids (hard; for soft, the nearest-token projection), else None.
    prompt_text: T decoded prompts (hard; for soft, the projection's text), else None.
    projected_kl: (T,) soft only: KL reached by the nearest-token projection of the best soft prompt.
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
    prompt_text: list[str] | None = None
    projected_kl: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.target_ids)

    def to_frame(self) -> pd.DataFrame:
        """One tidy row per target: target_id, method, kl_nats, initial_kl_nats, steps, wall_s, and
        prompt_text / projected_kl_nats where the method has them."""
        df = pd.DataFrame({
            "target_id": self.target_ids,
            "method": self.method,
            "kl_nats": self.kl.double().numpy(),
            "initial_kl_nats": self.initial_kl.double().numpy(),
            "steps": self.steps.numpy(),
            "wall_s": self.wall_s,
        })
        if self.prompt_text is not None:
            df["prompt_text"] = self.prompt_text
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

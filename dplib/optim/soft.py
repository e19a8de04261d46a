"""Soft prompts: L free vectors in the input-embedding space per target (`optimize_soft`, on the
prompt-vector engine `prompt_vectors.run_vectors`), and their projection onto the nearest real tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..lm import allowed_tokens, embed, kl_from_logprobs, logits_width
from ..targets import Targets
from .common import Result, require
from .prompt_vectors import PromptVectorsConfig, _forward, _Setup, run_vectors


@dataclass(frozen=True)
class SoftConfig(PromptVectorsConfig):
    """Every knob of `optimize_soft`, with its default. Plain values only (written to run metadata)."""

    project: bool = True  # also project the best prompts onto the nearest real tokens and score them
    # the defaults below come from benchmarks/soft_quality.py (docs/performance.md, "Soft prompt defaults")
    steps: int = 450  # Adam steps; the prompt is evaluated steps + 1 times (the last one only scored)
    restarts: int = 1  # R initialisations per target, extra rows of the same batch; the best is kept
    min_steps: int = 100  # with patience > 0: no target stops before this many Adam steps
    min_rel_improvement: float = 0.001  # with patience > 0: progress = KL below (1 − this) × KL at last progress

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.project, bool), f"project={self.project!r}: use True or False.")


def nearest_tokens(model, vectors: Tensor, allowed: Tensor, *, chunk: int = 8192) -> Tensor:
    """(..., d) float32 vectors → (...,) ids of the nearest allowed tokens (L2, embedding-module space).

    The vocabulary is embedded in chunks of `chunk` rows, so Gemma's 262k × 640 table is never
    materialised in float32 at once.
    """
    device = next(model.parameters()).device
    flat = vectors.reshape(-1, vectors.shape[-1]).to(device, torch.float32)
    best_d = torch.full((flat.shape[0],), math.inf, device=device)
    best_id = torch.zeros(flat.shape[0], dtype=torch.long, device=device)
    allowed = allowed.to(device)
    with torch.no_grad():
        for lo in range(0, len(allowed), chunk):
            ids = torch.arange(lo, min(len(allowed), lo + chunk), device=device)
            e = embed(model, ids).float()  # (c, d)
            d2 = (e * e).sum(-1)[None, :] - 2 * flat @ e.T  # ‖x‖² is the same for every token: left out
            d2[:, ~allowed[ids]] = math.inf
            value, idx = d2.min(dim=1)
            better = value < best_d
            best_d = torch.where(better, value, best_d)
            best_id = torch.where(better, ids[idx], best_id)
    return best_id.reshape(vectors.shape[:-1]).cpu()


def _project(setup: _Setup, tokenizer, targets: Targets, vectors: Tensor, config) -> tuple[Tensor, list, Tensor]:
    """Nearest-token projection of the best prompts: ids (T, L), texts, and the KL those ids reach.

    A text is given only where it re-tokenises, framed, to exactly the projected ids (so the text
    reaches the reported KL); elsewhere it is None: the ids are the projection, and no string means them.
    """
    allowed = allowed_tokens(tokenizer, logits_width(setup.model))
    ids = nearest_tokens(setup.model, vectors, allowed)
    chunk = config.max_batch or len(ids)
    kls = []
    with torch.no_grad():
        for lo in range(0, len(ids), chunk):
            sl = slice(lo, lo + chunk)
            hard = embed(setup.model, ids[sl].to(setup.device)).float()
            _, lp = _forward(setup, hard)
            kls.append(kl_from_logprobs(targets.probs[sl].to(setup.device), lp).cpu())
    exact, texts = setup.frame.text_reproduces(ids.tolist())
    return ids, [t if ok else None for t, ok in zip(texts, exact, strict=True)], torch.cat(kls)


def optimize_soft(model, tokenizer, targets: Targets, config: SoftConfig | None = None, *,
                  progress: bool = True, callback=None) -> Result:
    """Find, for each of T targets, L soft input vectors whose next-token distribution is closest.

    Args:
        model, tokenizer: a frozen causal LM (`load_model`); device and dtype are the model's.
        targets: T targets over the model's logits width (checked before any compute).
        config: `SoftConfig` (defaults if None).
        progress: show a tqdm bar.
        callback: None, or `callback(step, best_kl) -> bool`, called after every evaluation with
            `step` the Adam steps taken so far (0 = the initial prompts; counted per chunk of
            `max_batch` targets) and `best_kl` the mean over the chunk's targets of each target's best
            KL so far (nats). Returning True stops the run: the best prompts so far are returned
            (later chunks only score their initial prompts), as after early stopping.

    Returns:
        Result with method "soft": kl (T,) best KL in nats over all restarts, initial_kl (T,) the
        lowest initial KL over restarts, logprobs (T, vocab) at the best prompt, steps (T,) Adam steps taken (the
        longest restart; the trace's rows after row 0), trace (steps + 1, T) the per-step minimum over restarts (row 0 = the
        initial prompts; NaN once every restart of a target stopped), prompt_embeds (T, L, d_model)
        float32 of the kept restart (meta "restart" (T,) its index, meta "init_ids" its initial
        tokens), and when `config.project`:
        prompt_ids (T, L) nearest allowed tokens, projected_kl (T,) the KL those ids reach, and
        prompt_text: their decoded text where it re-tokenises (framed) to exactly those ids, else
        None (then no string reproduces the projection; `Result.to_frame` says so in
        `prompt_text_exact`).
    """
    config = SoftConfig() if config is None else config
    if not isinstance(config, SoftConfig):
        raise TypeError(f"config must be a SoftConfig, got {type(config).__name__}.")
    out, setup, init_ids, start = run_vectors(model, tokenizer, targets, config, method="soft", progress=progress,
                                              callback=callback)
    ids = text = projected = None
    if config.project:
        ids, text, projected = _project(setup, tokenizer, targets, out["vectors"], config)
    meta = {"config": dataclasses.asdict(config), "is_bound": False, "prefix_ids": list(setup.frame.prefix_ids),
            "suffix_ids": list(setup.frame.suffix_ids), "n_chunks": out["n_chunks"], "device": str(setup.device),
            "dtype": str(setup.dtype).replace("torch.", ""), "init_ids": init_ids.tolist(),
            "restart": out["restart"].tolist(), "lr": out["lr"]}
    return Result(method="soft", target_ids=targets.ids, kl=out["kl"], initial_kl=out["initial_kl"],
                  logprobs=out["logprobs"], steps=out["steps"], trace=out["trace"],
                  wall_s=time.perf_counter() - start, prompt_embeds=out["vectors"], prompt_ids=ids,
                  prompt_text=text, projected_kl=projected, meta=meta)

"""The prompt-vector engine: L free vectors per target, optimised with Adam, at the input or after a layer.

All T targets run as one batch (row t holds target t's own L vectors); the loss is the sum of the
per-target KLs, and since Adam is per-parameter the rows never interact: a batch gives the same
per-target results as T separate runs, up to float rounding. Logits are read at the last position
only, through `lm.last_hidden` and `lm.output_layer` (the model body, then the head as one 2-D matmul).
`soft.optimize_soft` (vectors at the input embeddings) and `bound.layer_bound` (vectors injected after
decoder layer ℓ) both run on `run_vectors`.

Shortcuts and choices, stated once:
- Each target's initialisation is drawn from its own generator, seeded by
  `derive_seed(config.seed, target_id, "init")`, so it does not depend on which other targets share
  the batch. With `restarts` = R > 1, restart r ≥ 1 is seeded by `derive_seed(config.seed, target_id,
  "init", r)` and runs as one more row of the same batch; the restart with the lowest KL is kept.
- A target that stops early (`patience`) is dropped from the batch — its rows are sliced out of the
  parameter and of Adam's moments — so it cannot change any more and costs nothing afterwards.
- Prompts are float32 parameters whatever the model's dtype; they are cast to the model's dtype
  for the forward pass (bfloat16 on CUDA). Log-softmax and KL are float32.
- Large T is split into chunks of `max_batch` targets, run one after the other.
- Injected after decoder layer ℓ, a forward hook replaces the residual stream at the prompt positions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import lm
from ..lm import allowed_tokens, embed, kl_from_logprobs, last_hidden, logits_width, output_layer
from ..seeds import derive_seed, generator
from ..targets import Targets
from .common import BestTracker, is_int, is_real, require

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")
INITS = ("vocab", "gaussian")
# lr=None: Adam's lr is LR_PER_EMBEDDING_RMS × the RMS of the allowed tokens' input embeddings
# (SmolLM2 ≈ 0.126 → 0.30; Gemma-3 ≈ 1.03 → 2.5), measured by benchmarks/soft_quality.py.
LR_PER_EMBEDDING_RMS = 2.4


@dataclass(frozen=True)
class PromptVectorsConfig:
    """The knobs shared by `SoftConfig` and `bound.LayerBoundConfig` (L vectors trained with Adam)."""

    prompt_length: int = 5  # L, trainable vectors per target
    steps: int = 300  # Adam steps; the prompt is evaluated steps + 1 times (the last one only scored)
    # Adam learning rate in embedding units (SmolLM2 embedding entries have RMS ≈ 0.126, Gemma-3's ≈ 1.03);
    # None (soft prompts only) = LR_PER_EMBEDDING_RMS × that RMS, the measured default
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    schedule: str = "constant"  # "constant" or "cosine" (lr decays to 0 at the last step)
    patience: int = 0  # stop a target after this many steps without progress (below); 0 = never stop early
    min_delta: float = 0.0  # nats; an improvement must beat the best by more than this to count
    min_rel_improvement: float = 0.0  # progress = KL below (1 − this) × the KL at the last progress, minus min_delta
    min_steps: int = 0  # no target stops early before this many Adam steps, whatever its patience
    restarts: int = 1  # R initialisations per target, run as extra rows of the same batch; the best is kept
    # Warm start from the bound: the first warm_steps of the `steps` Adam steps minimise the relative squared
    # distance of the final hidden state to the norm bound's optimum h* instead of the KL; 0 = off
    warm_steps: int = 0
    init: str = "vocab"  # "vocab": embeddings of random allowed tokens; "gaussian": N(mean, std) of them
    prefix: str = "bos"  # fixed text before the prompt; "bos" = the model's BOS token (none if it has none)
    suffix: str = ""  # fixed text after the prompt (the next token is predicted after it)
    seed: int = 0  # base seed; each target's init uses derive_seed(seed, target_id)
    max_batch: int = 64  # targets per chunk (memory bound); 0 = all targets in one chunk

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        require(is_int(self.prompt_length) and self.prompt_length >= 1,
               f"prompt_length={self.prompt_length!r}: use an integer ≥ 1 (the number of soft vectors).")
        require(is_int(self.steps) and self.steps >= 0,
               f"steps={self.steps!r}: use an integer ≥ 0 (0 only scores the initial prompt).")
        require(self.lr is None or (is_real(self.lr) and math.isfinite(self.lr) and self.lr > 0),
               f"lr={self.lr!r}: use a finite learning rate > 0, e.g. 0.3, or None for the scaled default.")
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               f"betas={self.betas!r}: use two numbers in [0, 1), e.g. (0.9, 0.999).")
        require(is_real(self.eps) and self.eps > 0, f"eps={self.eps!r}: use a number > 0, e.g. 1e-8.")
        require(self.schedule in SCHEDULES, f"schedule={self.schedule!r}: use one of {SCHEDULES}.")
        require(is_int(self.patience) and self.patience >= 0,
               f"patience={self.patience!r}: use an integer ≥ 0 (0 turns early stopping off).")
        require(is_real(self.min_delta) and self.min_delta >= 0,
               f"min_delta={self.min_delta!r}: use a number of nats ≥ 0.")
        require(is_real(self.min_rel_improvement) and 0.0 <= self.min_rel_improvement < 1.0,
               f"min_rel_improvement={self.min_rel_improvement!r}: use a fraction in [0, 1), e.g. 0.01 "
               "(1 % below the KL at the last progress); 0 counts any improvement as progress.")
        require(is_int(self.min_steps) and self.min_steps >= 0,
               f"min_steps={self.min_steps!r}: use an integer ≥ 0 (Adam steps before early stopping may act).")
        require(is_int(self.restarts) and self.restarts >= 1,
               f"restarts={self.restarts!r}: use an integer ≥ 1 (initialisations per target; 1 = no restarts).")
        require(is_int(self.warm_steps) and 0 <= self.warm_steps <= self.steps,
               f"warm_steps={self.warm_steps!r}: use an integer in [0, steps={self.steps}] (Adam steps fitting "
               "the final hidden state to the norm bound's optimum before minimising the KL; 0 = off).")
        require(self.init in INITS, f"init={self.init!r}: use one of {INITS}.")
        require(isinstance(self.prefix, str), f"prefix={self.prefix!r}: use a string ('bos', '' or any text).")
        require(isinstance(self.suffix, str), f"suffix={self.suffix!r}: use a string ('' or any text).")
        require(is_int(self.seed) and self.seed >= 0, f"seed={self.seed!r}: use an integer ≥ 0.")
        require(is_int(self.max_batch) and self.max_batch >= 0,
               f"max_batch={self.max_batch!r}: use an integer ≥ 1, or 0 for one chunk of all targets.")


@dataclass
class _Setup:
    """What one call needs besides the config: fixed context, head, device."""

    model: object
    device: torch.device
    dtype: torch.dtype
    head: object
    prefix: Tensor  # (1, P, d_model) model dtype
    suffix: Tensor  # (1, S, d_model) model dtype
    layer: int | None  # None: vectors are input embeddings; else they replace the output of layer `layer`
    frame: lm.PromptFrame  # the prefix and suffix around the prompt


def _setup(model, frame: lm.PromptFrame, layer: int | None = None) -> _Setup:
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    with torch.no_grad():
        prefix = embed(model, torch.tensor([frame.prefix_ids], dtype=torch.long, device=device)).to(dtype)
        suffix = embed(model, torch.tensor([frame.suffix_ids], dtype=torch.long, device=device)).to(dtype)
    return _Setup(model, device, dtype, output_layer(model), prefix, suffix, layer, frame)


class _Inject:
    """Forward hook on a decoder layer: replace the residual stream at the prompt positions."""

    def __init__(self, start: int, length: int):
        self.start, self.length, self.vectors = start, length, None

    def __call__(self, module, args, output):
        if self.vectors is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        s, e = self.start, self.start + self.length
        hidden = torch.cat([hidden[:, :s], self.vectors.to(hidden.dtype), hidden[:, e:]], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _forward(setup: _Setup, vectors: Tensor, placeholder: Tensor | None = None,
             hook: _Inject | None = None) -> tuple[Tensor, Tensor]:
    """(A, L, d) float32 prompt vectors → the final hidden state (A, d_model) in the model's dtype and the
    (A, vocab) float32 next-token log-probabilities.

    At the input (layer None) the vectors are the prompt's embeddings; with a layer hook the input
    at the prompt positions is `placeholder` and the hook swaps the vectors in after that layer.
    """
    n = vectors.shape[0]
    middle = vectors.to(setup.dtype) if hook is None else placeholder
    x = torch.cat([setup.prefix.expand(n, -1, -1), middle, setup.suffix.expand(n, -1, -1)], dim=1)
    if hook is not None:
        hook.vectors = vectors
    try:
        hidden = last_hidden(setup.model, x)
    finally:
        if hook is not None:
            hook.vectors = None
    return hidden, torch.log_softmax(setup.head.logits(hidden), dim=-1)


def _compact(param: Tensor, opt: torch.optim.Adam, keep: Tensor) -> tuple[Tensor, torch.optim.Adam]:
    """Drop the rows of stopped targets from the parameter and from Adam's moments."""
    new = param.detach()[keep].clone().requires_grad_(True)
    new_opt = torch.optim.Adam([new], **{k: v for k, v in opt.param_groups[0].items() if k in ("lr", "betas", "eps")})
    state = opt.state.get(param)
    if state:
        new_opt.state[new] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][keep].clone(),
                              "exp_avg_sq": state["exp_avg_sq"][keep].clone()}
    return new, new_opt


def _lr_at(config, step: int) -> float:
    if config.schedule == "cosine" and config.steps > 0:
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
    return config.lr


def _optimize_chunk(setup: _Setup, target_probs: Tensor, init: Tensor, config, bar,
                    placeholder: Tensor | None = None, row_scale: Tensor | None = None,
                    warm_hidden: Tensor | None = None, callback=None) -> dict:
    """Optimise one chunk of C rows (targets, or targets × restarts). `init` (C, L, d) float32 on the device.

    `row_scale` (C, 1, 1): the trained parameter is vectors / row_scale, so Adam's step is relative
    to each row's scale (used at hidden layers, whose residual norms differ by layer and model).
    `warm_hidden` (C, d_model) float32: for the first `config.warm_steps` steps the loss is each row's
    ‖h − h*‖² / ‖h*‖² (h the final hidden state) instead of its KL; the KL is still what is tracked.
    `callback(step, best_kl)` (see `optimize_soft`) is called after each evaluation; True stops the chunk.
    Returns best KL, best vectors, best log-probs, initial KL, steps, trace (all on CPU).
    """
    n = init.shape[0]
    device = setup.device
    scale = torch.ones(n, 1, 1, device=device) if row_scale is None else row_scale
    hook = None
    handle = None
    if setup.layer is not None:
        hook = _Inject(setup.prefix.shape[1], init.shape[1])
        handle = lm.layers(setup.model)[setup.layer].register_forward_hook(hook)
    try:
        # no early stop during the warm phase: the KL is not what it minimises
        tracker = BestTracker(n, config.patience, config.min_delta, device=device,
                              min_rel_improvement=config.min_rel_improvement,
                              min_steps=max(config.min_steps, config.warm_steps))
        best_vectors = init.clone()
        best_logprobs = torch.empty(n, setup.head.weight.shape[0], device=device)
        trace = torch.full((config.steps + 1, n), math.nan, device=device)
        rows = torch.arange(n, device=device)  # chunk rows still in the batch
        param = (init / scale).clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=config.lr, betas=config.betas, eps=config.eps)
        for step in range(config.steps + 1):
            last = step == config.steps
            with torch.set_grad_enabled(not last):
                vectors = param * scale[rows]
                hidden, model_logprobs = _forward(setup, vectors, None if placeholder is None else placeholder[rows],
                                                  hook)
                kl = kl_from_logprobs(target_probs[rows], model_logprobs)
                loss = kl
                if warm_hidden is not None and step < config.warm_steps:
                    h_star = warm_hidden[rows]
                    loss = (hidden.float() - h_star).pow(2).sum(-1) / h_star.pow(2).sum(-1).clamp_min(1e-12)
            full = torch.full((n,), math.inf, device=device)
            full[rows] = kl.detach()
            improved = tracker.update(full, step)[rows]
            trace[step, rows] = kl.detach()
            if improved.any():
                best_vectors[rows[improved]] = vectors.detach()[improved]
                best_logprobs[rows[improved]] = model_logprobs.detach()[improved]
            bar.update(1)
            # best_kl for the callback: each target's best over its restarts (rows t·R + r), averaged
            stop = callback is not None and bool(callback(
                step, float(tracker.best.reshape(-1, config.restarts).min(dim=1).values.mean())))
            if last or tracker.done or stop:
                break
            for group in opt.param_groups:
                group["lr"] = _lr_at(config, step)
            loss.sum().backward()  # rows are independent: the sum's gradient is each row's own gradient
            opt.step()
            opt.zero_grad(set_to_none=True)
            keep = tracker.active[rows]
            if not bool(keep.all()):
                param, opt = _compact(param, opt, keep)
                rows = rows[keep]
        if tracker.done or stop:  # stopped early: end the bar complete, not in tqdm's error colour
            bar.update(config.steps - step)
    finally:
        if handle is not None:
            handle.remove()
    return {"kl": tracker.best.cpu(), "vectors": best_vectors.cpu(), "logprobs": best_logprobs.cpu(),
            # steps: Adam steps taken, the trace's rows after row 0 (the tracker also counts the initial evaluation)
            "initial_kl": trace[0].cpu(), "steps": tracker.steps.cpu() - 1, "trace": trace.cpu()}


def _restart_seed(config, target_id: str, kind: str, restart: int) -> int:
    """Seed of a target's restart r: derive_seed(seed, target_id, kind, r), except restart 0, which
    keeps derive_seed(seed, target_id, kind) so that restarts = 1 reproduces the single-start results."""
    return derive_seed(config.seed, target_id, kind) if restart == 0 else derive_seed(config.seed, target_id, kind,
                                                                                      restart)


def _init_ids(model, tokenizer, target_ids: list[str], config) -> Tensor:
    """(T·R, L) random allowed token ids, row t·R + r for target t's restart r, each from its own
    seeded generator (`_restart_seed`), so no row depends on the other rows of the batch (CPU)."""
    allowed = allowed_tokens(tokenizer, logits_width(model)).nonzero().flatten()
    rows = []
    for tid in target_ids:
        for r in range(config.restarts):
            g = generator(_restart_seed(config, tid, "init", r))
            rows.append(allowed[torch.randint(len(allowed), (config.prompt_length,), generator=g)])
    return torch.stack(rows)


def _init_vectors(model, tokenizer, target_ids: list[str], config) -> tuple[Tensor, Tensor]:
    """(T·R, L, d) float32 initial vectors on CPU, and the (T·R, L) token ids they came from
    (row t·R + r: target t, restart r).

    "vocab": the embedding-module outputs of random allowed tokens (Gemma's √d scaling included).
    "gaussian": per-dimension Normal with the mean and std of all allowed tokens' embeddings.
    """
    ids = _init_ids(model, tokenizer, target_ids, config)
    device = next(model.parameters()).device
    with torch.no_grad():
        vectors = embed(model, ids.to(device)).float().cpu()
        if config.init == "gaussian":
            allowed = allowed_tokens(tokenizer, logits_width(model)).nonzero().flatten()
            mean, sq, count = 0.0, 0.0, 0
            for chunk in allowed.split(8192):
                e = embed(model, chunk.to(device)).double().cpu()
                mean, sq, count = mean + e.sum(0), sq + (e * e).sum(0), count + len(chunk)
            mean = mean / count
            std = (sq / count - mean**2).clamp_min(0).sqrt()
            noise = []
            for tid in target_ids:
                for r in range(config.restarts):
                    g = generator(_restart_seed(config, tid, "gaussian", r))
                    noise.append(torch.randn(config.prompt_length, len(mean), generator=g, dtype=torch.float64))
            vectors = (mean + std * torch.stack(noise)).float()
    return vectors, ids


def run_vectors(model, tokenizer, targets: Targets, config, *, method: str, layer: int | None = None,
                progress: bool = True, callback=None) -> tuple[dict, _Setup, Tensor, float]:
    """The shared loop of `optimize_soft` and `bound.layer_bound`, chunk by chunk.

    With R = config.restarts, each target's R initialisations run as R rows of the batch (rows never
    interact: Adam is per-parameter and the loss a sum of per-row KLs), and the restart with the lowest
    best KL is kept per target. Chunks hold max(1, max_batch // R) targets (max_batch counts rows).

    lr None: Adam runs on vectors / RMS(embeddings) with lr LR_PER_EMBEDDING_RMS (as on vectors
    with lr LR_PER_EMBEDDING_RMS × RMS, up to Adam's eps); outputs["lr"] is the lr in embedding units.

    Returns (merged outputs, setup, initial token ids (T, L) of the kept restarts, start time); the
    outputs are per target: kl, vectors, logprobs of the kept restart; initial_kl and trace the
    per-step minimum over restarts (so trace[0] = initial_kl and kl = the trace's minimum; NaN once
    every restart stopped); steps the most steps any restart ran; restart (T,) the kept restart.
    `callback`: as in `optimize_soft`.
    """
    targets.check_width(model)  # before any compute
    frame = lm.prompt_frame(model, tokenizer, config.prefix, config.suffix)
    frame.check_length(config.prompt_length)  # before any forward
    lm.check(model)  # once per call: `last_hidden` (the hot path) does not check
    start = time.perf_counter()
    setup = _setup(model, frame, layer)
    init, init_ids = _init_vectors(model, tokenizer, targets.ids, config)
    n, reps = len(targets), config.restarts
    warm = _warm_hidden(model, tokenizer, targets) if config.warm_steps else None  # (T, d) float32, CPU
    chunk = max(1, config.max_batch // reps) if config.max_batch else n  # targets per chunk
    rms = None
    if config.lr is None:  # Adam on vectors / rms with lr LR_PER_EMBEDDING_RMS: steps scale with the embeddings
        rms = embedding_rms(model, tokenizer)
        config = dataclasses.replace(config, lr=LR_PER_EMBEDDING_RMS)
    parts = []
    stopped = False

    def chunk_callback(step: int, best_kl: float) -> bool:  # once stopped, later chunks only score their init
        nonlocal stopped
        stopped = stopped or bool(callback(step, best_kl))
        return stopped

    bar = tqdm(total=(config.steps + 1) * math.ceil(n / chunk), desc=method, disable=not progress, leave=False)
    try:
        for lo in range(0, n, chunk):
            sl = slice(lo, min(n, lo + chunk))
            rows = slice(lo * reps, min(n, lo + chunk) * reps)
            probs = targets.probs[sl].to(setup.device, torch.float32).repeat_interleave(reps, dim=0)
            vectors = init[rows].to(setup.device)
            placeholder = scale = None
            if rms is not None:  # Adam on vectors / rms: its steps are lr × rms in embedding units
                scale = torch.full((vectors.shape[0], 1, 1), rms, device=setup.device)
            if layer is not None:
                placeholder = vectors.to(setup.dtype)
                vectors = _residual_after(setup, placeholder)
                scale = vectors.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-6)
            warm_rows = None if warm is None else warm[sl].to(setup.device).repeat_interleave(reps, dim=0)
            parts.append(_optimize_chunk(setup, probs, vectors, config, bar, placeholder, scale, warm_rows,
                                         chunk_callback if callback is not None else None))
    finally:
        bar.close()
    merged = {k: torch.cat([p[k] for p in parts], dim=1 if k == "trace" else 0) for k in parts[0]}
    merged = _best_restart(merged, n, reps)
    merged["n_chunks"] = len(parts)
    merged["lr"] = config.lr * (rms or 1.0)
    kept = torch.arange(n) * reps + merged["restart"]
    return merged, setup, init_ids[kept], start


def _warm_hidden(model, tokenizer, targets: Targets) -> Tensor:
    """(T, d_model) float32: the final hidden state at each target's norm-bound optimum (what the final
    norm can output that comes closest to the target), the aim of the warm phase (`warm_steps`)."""
    from .bound import norm_bound  # bound builds on this module: imported here, where it is used

    return norm_bound(model, tokenizer, targets, progress=False).hidden.float()


def _best_restart(rows: dict, n: int, reps: int) -> dict:
    """Per-row outputs (n·R rows, row t·R + r) → per-target outputs, keeping the restart of lowest KL."""
    restart = rows["kl"].reshape(n, reps).argmin(dim=1)  # ties: the lowest restart index
    kept = torch.arange(n) * reps + restart
    trace = torch.nan_to_num(rows["trace"].reshape(-1, n, reps), nan=math.inf).min(dim=2).values
    trace[torch.isinf(trace)] = math.nan
    return {"kl": rows["kl"][kept], "vectors": rows["vectors"][kept], "logprobs": rows["logprobs"][kept],
            "initial_kl": trace[0].clone(), "steps": rows["steps"].reshape(n, reps).max(dim=1).values,
            "trace": trace, "restart": restart}


def embedding_rms(model, tokenizer) -> float:
    """RMS of the entries of the allowed tokens' input embeddings (the embedding module's output, so
    Gemma's √d scale included): SmolLM2-135M ≈ 0.126, Gemma-3-270M ≈ 1.03. Chunked, float64."""
    allowed = allowed_tokens(tokenizer, logits_width(model)).nonzero().flatten()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in allowed.split(8192):
            e = embed(model, chunk.to(device)).double()
            total, count = total + float((e * e).sum()), count + e.numel()
    return math.sqrt(total / count)


def _residual_after(setup: _Setup, placeholder: Tensor) -> Tensor:
    """(A, L, d) float32 residual stream after `setup.layer` at the prompt positions, for these inputs."""
    captured = {}
    p, length = setup.prefix.shape[1], placeholder.shape[1]

    def grab(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured["h"] = hidden[:, p:p + length].float()

    handle = lm.layers(setup.model)[setup.layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            n = placeholder.shape[0]
            x = torch.cat([setup.prefix.expand(n, -1, -1), placeholder, setup.suffix.expand(n, -1, -1)], dim=1)
            lm.body(setup.model)(inputs_embeds=x, use_cache=False)
    finally:
        handle.remove()
    return captured["h"].contiguous()

"""Softmax-bottleneck bounds: what the output layer alone allows, per target.

- `free_bound`: min over h ∈ R^d of KL(p ‖ softmax(z(h))), z(h) = s·(W h + b) (soft-capped where
  the model caps). Without soft-capping this is convex and smooth (gradient s·Wᵀ(q − p), Hessian
  s²·Wᵀ(diag q − q qᵀ)W), so a stationary point is the global minimum and no prompt can beat it.
- `norm_bound`: h restricted to what the model's final normalisation can output. RMSNorm outputs
  γ ⊙ u with ‖u‖ = √d·√(m/(m+ε)) < √d (m = mean square of its input): the reachable set is the
  open ball ‖u‖ < √d scaled by γ. We minimise over its closure, ‖u‖ ≤ √d, which has the same
  infimum (continuity) and is convex, so the result is a certified lower bound on anything a prompt
  achieves. LayerNorm outputs γ ⊙ u + β with u also centred (Σ u = 0). γ, β and the kind of norm
  are derived by calling the model's own final-norm module (`lm.norm_spec`: Gemma's (1 + w) scale,
  parameter-free and bias-free LayerNorms come out right).
- `layer_bound`: the L prompt positions' residual stream after decoder layer ℓ is trained directly
  (Adam, as for soft prompts), the later layers running as usual.

Solver for the first two (existing optimisers only): SciPy's Newton-CG (or `trust-krylov` /
`trust-ncg`) with exact float64 Hessian-vector products, one independent solver per target, all run
in lockstep by `dplib.optim.lockstep.solve` (each in its own thread, their requests answered
together with batched float64 matmuls: per-target algorithms, batched cost).

Preconditioning by restarts. Peaked targets make the Hessian s²·Wᵀ(diag q − q qᵀ)W very ill-conditioned,
and plain Newton-CG then spends ~35 CG products per Newton iteration (measured on SmolLM2: 1,393
products for one target of entropy 0.5). SciPy's Newton-CG takes no preconditioner, so each target's
solver is restarted every `REFRESH` Newton iterations in new variables x, h = h_r + M_r x, where
M_rᵀ Ĥ M_r = I for a cheap approximation Ĥ of the Hessian at h_r (in `bound_objective`): exact over
the `PRECOND_TOKENS` most probable tokens, the rest of the vocabulary's mass times the covariance of
W's rows (the Hessian at the uniform distribution). Restarting loses nothing (Newton-CG keeps no
state between iterations); f and ∇f stay exact, only the coordinates change. Far from the optimum a Newton-CG step from a start
point's preconditioner can land where the next needs a thousand products, so the first restart is
`GLOBAL_ITERS` iterations of SciPy's trust-krylov, whose trust region keeps early steps sane.
What this schedule saves is measured by benchmarks/soft_step.py (docs/performance.md).
A target stops when its float64 gradient norm ‖∇_h KL‖ ≤ `tol` (checked after every iteration), after
`max_iter` iterations in all, or when a restart makes no progress; `meta["converged"]` says which.
A least-squares warm start (‖W h + c·1 − log p‖², via the (d+1)×(d+1) normal equations) is exact for
targets that are softmaxes of something in W's span; each target starts from the better of it and h = 0.
Targets with zero-probability tokens may have their infimum only as ‖h‖ → ∞: the gradient norm still
goes to 0 along the way, so they are reported like the others, with `converged` saying whether the
tolerance was met within `max_iter`.
Cost: the slowest target sets the wall time; see benchmarks/soft_step.py for 64 SmolLM2 targets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import lm
from ..lm import output_layer
from ..targets import Targets
from .bound_objective import _gram, _least_squares_start, _Objective, _row_covariance, _Sphere
from .common import Result, is_int, is_real, require
from .lockstep import SOLVERS, solve
from .prompt_vectors import PromptVectorsConfig, run_vectors

log = logging.getLogger(__name__)

# The restart schedule (module docstring); measured on 64 SmolLM2 targets, entropies 0.5-10 nats.
GLOBAL_ITERS = 8  # trust-krylov iterations of the first restart (5-12 measured alike)
REFRESH = 5  # Newton iterations between preconditioner refreshes after that (3 and 5 measured alike)


@dataclass(frozen=True)
class BoundConfig:
    """Knobs of `free_bound` and `norm_bound`. Plain values only."""

    tol: float = 1e-6  # stop a target when the float64 gradient norm ‖∇_h KL‖ ≤ tol (nats per unit of h)
    max_iter: int = 100  # solver iterations per target at most, all restarts together (‖h*‖ = ∞ may use them all)
    solver: str = "Newton-CG"  # SciPy method after the trust-krylov start: "Newton-CG", "trust-krylov", "trust-ncg"
    warm_start: bool = True  # least-squares warm start (else h = 0)
    max_batch: int = 64  # targets per chunk (memory: a few (max_batch, vocab) float64 arrays)

    def __post_init__(self):
        require(is_real(self.tol) and math.isfinite(self.tol) and self.tol > 0,
               f"tol={self.tol!r}: use a finite gradient-norm tolerance > 0, e.g. 1e-6 (an infinite or NaN "
               "tol would report any point, however far from the optimum, as a converged bound).")
        require(is_int(self.max_iter) and self.max_iter >= 1, f"max_iter={self.max_iter!r}: use an integer ≥ 1.")
        require(self.solver in SOLVERS, f"solver={self.solver!r}: use one of {SOLVERS}.")
        require(isinstance(self.warm_start, bool), f"warm_start={self.warm_start!r}: use True or False.")
        require(is_int(self.max_batch) and self.max_batch >= 0,
               f"max_batch={self.max_batch!r}: use an integer ≥ 1, or 0 for one chunk of all targets.")


@dataclass(frozen=True)
class LayerBoundConfig(PromptVectorsConfig):
    """Knobs of `layer_bound`: the soft-prompt knobs, plus the layer. `lr` is relative here: each
    target's Adam step is lr × the RMS of its initial residual vectors, since residual norms grow
    with depth."""

    lr: float = 0.02  # relative Adam learning rate (see above)
    layer: int | None = None  # decoder layer ℓ (0-based; negative counts from the end); None = middle, n_layers // 2

    def __post_init__(self):
        super().__post_init__()
        require(self.lr is not None, "lr=None: use a relative learning rate > 0 for layer_bound, e.g. 0.02.")
        require(self.layer is None or is_int(self.layer),
               f"layer={self.layer!r}: use an integer layer index (0-based, negative from the end) or None.")


def _solve(obj, x0: Tensor, config: BoundConfig):
    """`lockstep.solve` with the config's stopping rule and this module's restart schedule.

    Returns (h (T, k), ‖∇_h KL‖ (T,), iterations (T,), trace (n_iter + 1, T) KL per iteration).
    """
    return solve(obj, x0, tol=config.tol, max_iter=config.max_iter, solver=config.solver,
                 global_iters=GLOBAL_ITERS, refresh=REFRESH)



class _Problem:
    """The free problem for a weight matrix (vocab, k): objective, warm start, solve."""

    def __init__(self, head, weight: Tensor, bias: Tensor | None):
        self.head, self.weight, self.bias = head, weight.double(), None if bias is None else bias.double()
        self.gram, self.colsum = _gram(self.weight)
        self.cov = _row_covariance(self.gram, self.colsum, len(self.weight))

    def objective(self, probs: Tensor) -> _Objective:
        return _Objective(self.weight, self.bias, self.head.scale, self.head.softcap, probs, self.cov)

    def solve(self, probs: Tensor, config: BoundConfig) -> dict:
        """Free minimisation for a chunk of targets."""
        obj = self.objective(probs)
        n, k = len(probs), self.weight.shape[1]
        rows = torch.arange(n)
        zero = torch.zeros(n, k, dtype=torch.float64)
        initial, _, _ = obj.evaluate(zero, rows)
        h0 = zero
        if config.warm_start:
            h_ls = _least_squares_start(self.gram, self.colsum, self.weight, self.bias, self.head.scale, probs)
            kl_ls, _, _ = obj.evaluate(h_ls, rows)
            h0 = torch.where((kl_ls < initial)[:, None], h_ls, zero)
        h, gnorm, iters, trace = _solve(obj, h0, config)
        kl, _, _ = obj.evaluate(h, rows)
        return {"h": h, "kl": kl, "gnorm": gnorm, "iters": iters, "trace": torch.cat([initial[None], trace]),
                "initial": initial, "logprobs": obj.logprobs(h).float()}


def _chunks(n: int, size: int):
    size = size or n
    return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _pad_traces(parts: list[Tensor]) -> Tensor:
    """Join per-chunk (n_i, T_i) traces into one (max n_i, T) float32 tensor, NaN-padded."""
    n = max(len(p) for p in parts)
    return torch.cat([torch.cat([p, torch.full((n - len(p), p.shape[1]), math.nan, dtype=p.dtype)])
                      for p in parts], dim=1).float()


def _bound_meta(config, head, **extra) -> dict:
    convex = head.softcap is None
    notes = [] if convex else [
        f"final-logit soft-capping (c = {head.softcap}) makes KL non-convex in h: the value is a local "
        "optimum, not a certified lower bound"]
    return {"config": dataclasses.asdict(config), "is_bound": convex, "certified": convex,
            "tol": config.tol, "notes": notes, **extra}


def _checked_config(config: BoundConfig | None, model, targets: Targets) -> BoundConfig:
    """The config (default if None), after checking its type and the targets' width, before any compute."""
    config = BoundConfig() if config is None else config
    if not isinstance(config, BoundConfig):
        raise TypeError(f"config must be a BoundConfig, got {type(config).__name__}.")
    targets.check_width(model)
    lm.check(model)  # the output layer read is the model's own (logit transforms included)
    return config


# --------------------------------------------------------------------------------------------
# free_bound
# --------------------------------------------------------------------------------------------


def free_bound(model, tokenizer, targets: Targets, config: BoundConfig | None = None, *,
               progress: bool = True) -> Result:
    """min over h ∈ R^d of KL(target ‖ softmax(W h + b)) per target: no prompt can beat it.

    Solved in float64 on CPU to ‖∇‖ ≤ config.tol per target (see the module docstring).

    Returns:
        Result with method "free_bound": kl (T,) float64 bound in nats, initial_kl (T,) at h = 0,
        logprobs (T, vocab) float32 at the solution, steps (T,) solver iterations, trace
        (n_iter + 2, T) KL at h = 0, at the start point and after each iteration (NaN once done),
        hidden (T, d) float64 the minimiser h*.
        meta: "converged" (T,) list of bools (gradient norm ≤ tol reached), "grad_norm" (T,) list,
        "hidden_norm" (T,) ‖h*‖, "is_bound"/"certified" (False with soft-capping).
    """
    config = _checked_config(config, model, targets)
    start = time.perf_counter()
    head = output_layer(model)
    problem = _Problem(head, head.weight.detach().cpu(), None if head.bias is None else head.bias.detach().cpu())
    parts = [problem.solve(targets.probs[sl].cpu(), config) for sl in _chunks(len(targets), config.max_batch)]
    h = torch.cat([p["h"] for p in parts])
    gnorm = torch.cat([p["gnorm"] for p in parts])
    meta = _bound_meta(config, head, converged=(gnorm <= config.tol).tolist(), grad_norm=gnorm.tolist(),
                       hidden_norm=h.norm(dim=-1).tolist())
    return Result(method="free_bound", target_ids=targets.ids, kl=torch.cat([p["kl"] for p in parts]),
                  initial_kl=torch.cat([p["initial"] for p in parts]),
                  logprobs=torch.cat([p["logprobs"] for p in parts]), steps=torch.cat([p["iters"] for p in parts]),
                  trace=_pad_traces([p["trace"] for p in parts]), wall_s=time.perf_counter() - start,
                  hidden=h, meta=meta)


# --------------------------------------------------------------------------------------------
# norm_bound
# --------------------------------------------------------------------------------------------


def norm_bound(model, tokenizer, targets: Targets, config: BoundConfig | None = None, *,
               progress: bool = True) -> Result:
    """min KL(target ‖ softmax(W h + b)) over the h the model's final norm can output, per target.

    RMSNorm: h = γ ⊙ u, ‖u‖ ≤ √d (the closure of the reachable set; ε keeps ‖u‖ strictly below √d).
    LayerNorm: h = γ ⊙ u + β, ‖u‖ ≤ √d, Σ u = 0 (solved in an orthonormal basis of the centred subspace).
    The problem is convex (without soft-capping): the free minimiser is used where it lies inside the
    ball; otherwise the minimum is on the sphere, found by the same restarted solver on u = R v/‖v‖
    from the free solution's direction, and certified by its KKT multiplier λ = −⟨∇_u KL, u⟩/R² ≥ 0.

    Returns Result "norm_bound" (as free_bound; hidden = γ ⊙ u* + β, a final-norm output); meta adds "norm" (kind, radius), "interior",
    "multiplier", "certified" (per-target lists; converged and KKT holds).
    """
    config = _checked_config(config, model, targets)
    start = time.perf_counter()
    head = output_layer(model)
    spec = lm.norm_spec(model)
    weight = head.weight.detach().cpu().double() * spec.gamma  # (vocab, d): W diag(γ)
    bias = None if head.bias is None else head.bias.detach().cpu().double()
    if spec.kind == "layer":
        d = len(spec.gamma)
        centring = torch.eye(d, dtype=torch.float64) - 1.0 / d
        basis = torch.linalg.qr(centring[:, :-1]).Q  # (d, d − 1) orthonormal, spans Σ u = 0
        shift = head.weight.detach().cpu().double() @ spec.beta
        bias = shift if bias is None else bias + shift
        weight = weight @ basis
    problem = _Problem(head, weight, bias)
    outs = []
    for sl in _chunks(len(targets), config.max_batch):
        probs = targets.probs[sl].cpu()
        free = problem.solve(probs, config)
        u = free["h"]
        interior = (u.norm(dim=-1) <= spec.radius) & (free["gnorm"] <= config.tol)
        base = problem.objective(probs)
        sphere = _Sphere(base, spec.radius)
        v0 = torch.where(u.norm(dim=-1, keepdim=True) > 0, u, torch.ones_like(u))
        v, gnorm, iters, trace = _solve(sphere, v0 / v0.norm(dim=-1, keepdim=True) * spec.radius, config)
        point = torch.where(interior[:, None], u, sphere.point(v))
        hidden = point @ basis.T if spec.kind == "layer" else point  # u in R^d
        hidden = hidden * spec.gamma + (0.0 if spec.beta is None else spec.beta)  # h = γ ⊙ u + β
        rows = torch.arange(len(probs))
        kl, grad_u, _ = base.evaluate(point, rows)
        multiplier = -(grad_u * point).sum(-1) / spec.radius**2
        gnorm = torch.where(interior, free["gnorm"], gnorm)
        converged = gnorm <= config.tol
        outs.append({"kl": kl, "initial": free["initial"], "logprobs": base.logprobs(point).float(),
                     "steps": free["iters"] + torch.where(interior, 0, iters), "gnorm": gnorm,
                     "interior": interior, "multiplier": multiplier,
                     "certified": converged & (interior | (multiplier >= -config.tol)), "hidden": hidden,
                     "trace": torch.cat([free["trace"], torch.where(interior, math.nan, trace)])})

    def cat(key):
        return torch.cat([o[key] for o in outs])

    meta = _bound_meta(config, head, norm={"kind": spec.kind, "radius": spec.radius},
                       converged=(cat("gnorm") <= config.tol).tolist(), grad_norm=cat("gnorm").tolist(),
                       interior=cat("interior").tolist(), multiplier=cat("multiplier").tolist())
    meta["certified"] = (cat("certified") & (head.softcap is None)).tolist()
    return Result(method="norm_bound", target_ids=targets.ids, kl=cat("kl"), initial_kl=cat("initial"),
                  logprobs=cat("logprobs"), steps=cat("steps"), trace=_pad_traces([o["trace"] for o in outs]),
                  wall_s=time.perf_counter() - start, hidden=cat("hidden"), meta=meta)


# --------------------------------------------------------------------------------------------
# layer_bound
# --------------------------------------------------------------------------------------------


def layer_bound(model, tokenizer, targets: Targets, config: LayerBoundConfig | None = None, *,
                progress: bool = True) -> Result:
    """Train the residual stream after decoder layer ℓ at the L prompt positions, per target.

    The prompt positions' input embeddings are the initial tokens' (they only matter to a suffix,
    which attends to them in layers ≤ ℓ); after layer ℓ a forward hook replaces those positions'
    hidden states with the trained float32 vectors, and layers ℓ+1.. run as usual. Without a
    suffix this relaxes the soft prompt (any soft prompt's layer-ℓ states are one choice), so its
    optimum is ≤ soft's; found by Adam, it is a local optimum, not a certified bound (is_bound False).

    Returns Result "layer_bound" with prompt_embeds (T, L, d) the best residual vectors.
    """
    config = LayerBoundConfig() if config is None else config
    if not isinstance(config, LayerBoundConfig):
        raise TypeError(f"config must be a LayerBoundConfig, got {type(config).__name__}.")
    n_layers = len(lm.layers(model))
    layer = n_layers // 2 if config.layer is None else config.layer
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer={config.layer} is out of range for a model with {n_layers} decoder layers; "
                         f"use 0..{n_layers - 1} (or negative from the end), or None for the middle.")
    layer %= n_layers
    out, setup, init_ids, start = run_vectors(model, tokenizer, targets, config, method="layer_bound",
                                              layer=layer, progress=progress)
    meta = {"config": dataclasses.asdict(config), "is_bound": False, "layer": layer, "n_layers": n_layers,
            "n_chunks": out["n_chunks"], "init_ids": init_ids.tolist(), "restart": out["restart"].tolist(),
            "notes": ["local optimum of a relaxation of the soft prompt (Adam), not a certified bound"]}
    return Result(method="layer_bound", target_ids=targets.ids, kl=out["kl"], initial_kl=out["initial_kl"],
                  logprobs=out["logprobs"], steps=out["steps"], trace=out["trace"],
                  wall_s=time.perf_counter() - start, prompt_embeds=out["vectors"], meta=meta)

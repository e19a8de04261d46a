"""Softmax-bottleneck bounds: what the output layer alone allows, per target.

- `free_bound`: min over h ∈ R^d of KL(p ‖ softmax(z(h))), z(h) = s·(W h + b) (soft-capped where
  the model caps). Without soft-capping this is convex and smooth (gradient s·Wᵀ(q − p), Hessian
  s²·Wᵀ(diag q − q qᵀ)W), so a stationary point is the global minimum and no prompt can beat it.
- `norm_bound`: h restricted to what the model's final normalisation can output. RMSNorm outputs
  γ ⊙ u with ‖u‖ = √d·√(m/(m+ε)) < √d (m = mean square of its input): the reachable set is the
  open ball ‖u‖ < √d scaled by γ. We minimise over its closure, ‖u‖ ≤ √d, which has the same
  infimum (continuity) and is convex, so the result is a certified lower bound on anything a prompt
  achieves. LayerNorm outputs γ ⊙ u + β with u also centred (Σ u = 0). γ, β, ε and the kind of
  norm are derived by calling the model's own final-norm module (so Gemma's (1 + w) scale is right).
- `layer_bound`: the L prompt positions' residual stream after decoder layer ℓ is trained directly
  (Adam, as for soft prompts), the later layers running as usual.

Solver for the first two (existing optimisers only): SciPy's Newton-CG (or `trust-krylov` /
`trust-ncg`) with exact Hessian-vector products, one independent solver per target. One joint solve
over the sum of the separable objectives shares line searches / trust radii / CG across targets and
converges far worse (measured: a joint Newton-CG on 4 targets was still at ‖∇‖ ≈ 3e-4 after 32
iterations; alone, each reached 1e-7). So each target's solver runs in its own thread and `_Lockstep`
answers all their requests together with batched float64 matmuls: per-target algorithms, batched cost.
A target stops when its float64 gradient norm ‖∇_h KL‖ ≤ `tol` (checked after every iteration), after
`max_iter` Newton iterations, or when its solver gives up; `meta["converged"]` says which.
The variables are whitened (x = C^(1/2) h, C the covariance of W's rows: the Hessian at the uniform
distribution becomes the identity) so CG needs fewer products; the tolerance is still tested on ∇_h.
A least-squares warm start (‖W h + c·1 − log p‖², via the (d+1)×(d+1) normal equations) is exact for
targets that are softmaxes of something in W's span; each target starts from the better of it and h = 0.
Targets with zero-probability tokens may have their infimum only as ‖h‖ → ∞: the gradient norm still
goes to 0 along the way, so they are reported like the others, with `converged` saying whether the
tolerance was met within `max_iter`.
Cost: the slowest target sets the wall time (very peaked targets need 40-100 Newton iterations);
64 SmolLM2 targets with a spread of entropies took ~1,700 batched requests (see benchmarks/soft_step.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ..targets import Targets
from .common import Result, body, output_layer
from .soft import PromptVectorsConfig, _check, _is_int, run_vectors

log = logging.getLogger(__name__)

SOLVERS = ("Newton-CG", "trust-krylov", "trust-ncg")


@dataclass(frozen=True)
class BoundConfig:
    """Knobs of `free_bound` and `norm_bound`. Plain values only."""

    tol: float = 1e-6  # stop a target when the float64 gradient norm ‖∇_h KL‖ ≤ tol (nats per unit of h)
    max_iter: int = 100  # Newton iterations per target at most (targets with ‖h*‖ = ∞ may use them all)
    solver: str = "Newton-CG"  # SciPy method with Hessian-vector products: "Newton-CG", "trust-krylov", "trust-ncg"
    warm_start: bool = True  # least-squares warm start (else h = 0)
    max_batch: int = 64  # targets per chunk (memory: a few (max_batch, vocab) float64 arrays)

    def __post_init__(self):
        _check(isinstance(self.tol, (int, float)) and self.tol > 0,
               f"tol={self.tol!r}: use a gradient-norm tolerance > 0, e.g. 1e-6.")
        _check(_is_int(self.max_iter) and self.max_iter >= 1, f"max_iter={self.max_iter!r}: use an integer ≥ 1.")
        _check(self.solver in SOLVERS, f"solver={self.solver!r}: use one of {SOLVERS}.")
        _check(isinstance(self.warm_start, bool), f"warm_start={self.warm_start!r}: use True or False.")
        _check(_is_int(self.max_batch) and self.max_batch >= 0,
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
        _check(self.layer is None or _is_int(self.layer),
               f"layer={self.layer!r}: use an integer layer index (0-based, negative from the end) or None.")


# --------------------------------------------------------------------------------------------
# The objective: batched KL(p ‖ softmax(z(h))) with gradient and Hessian-vector products.
# --------------------------------------------------------------------------------------------


class _Objective:
    """f_t(x_t) = KL(p_t ‖ softmax(s·(x_t Wᵀ + b))), soft-capped if `softcap`; rows are independent.

    `evaluate(x, rows)` takes x (A, k) float64 for the rows `rows` of the target batch P (T, vocab)
    and returns (KL (A,), gradient (A, k), cache); `hvp(v, cache)` gives Hessian-vector products
    at the cached points. Everything is float64: float32 products stall CG near the optimum.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None, probs: Tensor):
        self.w = weight.double()
        self.bias = None if bias is None else bias.double()
        self.s, self.c = float(scale), softcap
        self.p = probs.double()
        self.p = self.p / self.p.sum(-1, keepdim=True)  # exact in float64: KL(p ‖ p) = 0, never < 0
        self.neg_entropy = torch.special.xlogy(self.p, self.p).sum(-1)

    def _logits(self, x: Tensor) -> Tensor:
        u = x @ self.w.T
        if self.bias is not None:
            u = u + self.bias
        return u * self.s

    def evaluate(self, x: Tensor, rows: Tensor):
        u = self._logits(x)
        if self.c is not None:
            t = torch.tanh(u / self.c)
            z, slope, curve = self.c * t, 1 - t * t, -2 * t * (1 - t * t) / self.c
        else:
            z, slope, curve = u, None, None
        logq = torch.log_softmax(z, dim=-1)
        q = logq.exp()
        p = self.p[rows]
        kl = self.neg_entropy[rows] - (p * logq).sum(-1)
        r = q - p  # ∂KL/∂z
        grad = self.s * ((r if slope is None else r * slope) @ self.w)
        return kl, grad, (q, slope, None if curve is None else r * curve)

    def logprobs(self, x: Tensor) -> Tensor:
        u = self._logits(x)
        if self.c is not None:
            u = self.c * torch.tanh(u / self.c)
        return torch.log_softmax(u, dim=-1)

    def hvp(self, v: Tensor, cache) -> Tensor:
        # float64 too: with float32 products CG loses conjugacy and needs ~3.5x more of them (measured).
        q, slope, curve_r = cache
        du = self.s * (v @ self.w.T)
        dz = du if slope is None else du * slope
        dr = q * dz - q * (q * dz).sum(-1, keepdim=True)  # (diag q − q qᵀ) dz
        if slope is not None:
            dr = dr * slope + curve_r * du
        return self.s * (dr @ self.w)


class _Sphere:
    """g_t(v_t) = f_t(R v_t / ‖v_t‖): the objective on the sphere of radius R (scale-invariant in v)."""

    def __init__(self, base: _Objective, radius: float):
        self.base, self.R = base, radius

    def point(self, v: Tensor) -> Tensor:
        return self.R * v / v.norm(dim=-1, keepdim=True)

    def evaluate(self, v: Tensor, rows: Tensor):
        r = v.norm(dim=-1, keepdim=True)
        vh = v / r
        kl, gu, cache = self.base.evaluate(self.R * vh, rows)
        proj = gu - (gu * vh).sum(-1, keepdim=True) * vh
        return kl, (self.R / r) * proj, (cache, r, vh, gu)

    def hvp(self, w: Tensor, cache) -> Tensor:
        # Hessian of f(R v/‖v‖): Jᵀ H_u J + Σ_k g_k ∇²u_k, J = (R/r)(I − v̂v̂ᵀ) and
        # Σ_k g_k ∇²u_k = −(R/r²)[P g v̂ᵀ + v̂ gᵀP + (gᵀv̂) P], P = I − v̂v̂ᵀ.
        base_cache, r, vh, g = cache

        def proj(a):
            return a - (a * vh).sum(-1, keepdim=True) * vh

        hu = self.base.hvp((self.R / r) * proj(w), base_cache)
        pg = proj(g)
        second = pg * (vh * w).sum(-1, keepdim=True) + vh * (pg * w).sum(-1, keepdim=True) \
            + (g * vh).sum(-1, keepdim=True) * proj(w)
        return (self.R / r) * proj(hu) - (self.R / r**2) * second


def _take(cache, i: int):
    """Row i of a (nested) cache of row-major tensors, keeping the row dimension."""
    if cache is None:
        return None
    if isinstance(cache, tuple):
        return tuple(_take(c, i) for c in cache)
    return cache[i:i + 1]


def _stack(caches: list):
    if caches[0] is None:
        return None
    if isinstance(caches[0], tuple):
        return tuple(_stack([c[j] for c in caches]) for j in range(len(caches[0])))
    return torch.cat(caches)


class _Lockstep:
    """One SciPy minimisation per target, each in its own thread, computed together.

    Every thread asks for f/∇f or a Hessian-vector product at its own point and blocks; once every
    live thread is waiting, the main thread answers all of them with batched matmuls. Each target
    thus gets its own, unmodified SciPy solver (own line search, own CG, own stopping), while the
    cost is that of one batched matmul per round of requests.
    """

    def __init__(self, obj, n: int):
        self.obj, self.n = obj, n
        self.cv = threading.Condition()
        self.pending: dict[int, tuple] = {}
        self.answers: dict[int, object] = {}
        self.alive = n
        self.cache: dict[int, tuple] = {}  # row -> (x as numpy, cache at x)
        self.calls = 0

    def ask(self, row: int, kind: str, x: np.ndarray, v: np.ndarray | None = None):
        with self.cv:
            self.pending[row] = (kind, x, v)
            self.cv.notify_all()
            while row not in self.answers:
                self.cv.wait()
            return self.answers.pop(row)

    def done(self):
        with self.cv:
            self.alive -= 1
            self.cv.notify_all()

    def serve(self):
        while True:
            with self.cv:
                while len(self.pending) < self.alive:
                    self.cv.wait()
                if self.alive == 0:
                    return
                batch, self.pending = self.pending, {}
            answers = self._answer(batch)
            with self.cv:
                self.answers.update(answers)
                self.cv.notify_all()

    def _answer(self, batch: dict) -> dict:
        self.calls += 1
        answers = {}
        need = [r for r, (kind, x, _) in batch.items()
                if kind == "f" or r not in self.cache or not np.array_equal(self.cache[r][0], x)]
        if need:
            x = torch.from_numpy(np.stack([batch[r][1] for r in need]))
            kl, grad, cache = self.obj.evaluate(x, torch.tensor(need))
            for i, r in enumerate(need):
                self.cache[r] = (batch[r][1], _take(cache, i))
                answers[r] = (float(kl[i]), grad[i].numpy().copy())
        hess = [r for r, (kind, _, _) in batch.items() if kind == "h"]
        if hess:
            v = torch.from_numpy(np.stack([batch[r][2] for r in hess]))
            hv = self.obj.hvp(v, _stack([self.cache[r][1] for r in hess]))
            for i, r in enumerate(hess):
                answers[r] = hv[i].numpy().copy()
        return answers


def _solve(obj, x0: Tensor, config: BoundConfig, to_h: Tensor | None = None):
    """Minimise every row of `obj` from x0 (T, k) float64, each with its own SciPy solver.

    A target stops when its gradient norm (in h: ∇_h = `to_h` ∇_x when the solver runs in whitened
    variables x) is ≤ tol, after `max_iter` iterations, or when its solver gives up.
    Returns (x (T, k), ‖∇_h‖ (T,), iterations (T,), trace (n_iter + 1, T) KL per iteration).
    """
    n, k = x0.shape
    hub = _Lockstep(obj, n)
    results: dict[int, tuple] = {}

    def gnorm_h(g: np.ndarray) -> float:
        return float(np.linalg.norm(g if to_h is None else to_h.numpy() @ g))

    def run(row: int):
        last = {"x": None, "g": math.inf}
        history = []

        def fun(x):
            f, g = hub.ask(row, "f", x.copy())
            last["x"], last["g"] = x.copy(), gnorm_h(g)
            return f, g

        def hessp(x, v):
            return hub.ask(row, "h", x.copy(), v.copy())

        def callback(intermediate_result):
            history.append(float(intermediate_result.fun))
            if last["x"] is not None and np.array_equal(intermediate_result.x, last["x"]) and last["g"] <= config.tol:
                raise StopIteration

        try:
            f0, g0 = fun(x0[row].numpy())
            history.append(f0)
            if last["g"] <= config.tol:
                results[row] = (x0[row].numpy(), 0, history)
                return
            options = {"maxiter": config.max_iter}
            if config.solver == "Newton-CG":
                options["xtol"] = 1e-300  # stop on the gradient test (callback), not on step size
            else:
                options["gtol"] = config.tol / (1.0 if to_h is None else float(torch.linalg.matrix_norm(to_h, 2)))
            res = minimize(fun, x0[row].numpy(), jac=True, hessp=hessp, method=config.solver, options=options,
                           callback=callback)
            results[row] = (res.x, int(res.nit), history)
        except Exception as err:  # noqa: BLE001 - reported, and the row keeps its start
            log.warning("bound solver failed on row %d: %s", row, err)
            results[row] = (x0[row].numpy(), 0, history)
        finally:
            hub.done()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    hub.serve()
    for t in threads:
        t.join()
    x = torch.from_numpy(np.stack([results[i][0] for i in range(n)])).double()
    _, grad, _ = obj.evaluate(x, torch.arange(n))
    gnorm = (grad if to_h is None else grad @ to_h).norm(dim=-1)
    iters = torch.tensor([results[i][1] for i in range(n)])
    n_hist = max(len(results[i][2]) for i in range(n))
    trace = torch.full((n_hist, n), math.nan, dtype=torch.float64)
    for i in range(n):
        trace[:len(results[i][2]), i] = torch.tensor(results[i][2], dtype=torch.float64)
    log.debug("bound solve: %d targets, %d batched requests, max ‖∇‖ %.3g", n, hub.calls, float(gnorm.max()))
    return x, gnorm, iters, trace


def _gram(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(k, k) WᵀW and (k,) Wᵀ1 in float64 (the one O(vocab·k²) cost, shared by whitening and warm start)."""
    w = weight.double()
    return w.T @ w, w.sum(0)


def _whitening(gram: Tensor, colsum: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(M, M⁻¹), M = C^(-1/2), C the covariance of W's rows: the Hessian at the uniform distribution.

    Solving in x = M⁻¹ h makes that Hessian the identity, which is what lets CG converge in a few
    dozen iterations (W's row covariance has a condition number ~10³ on SmolLM2).
    """
    mean = colsum / n
    cov = gram / n - torch.outer(mean, mean)
    ev, vec = torch.linalg.eigh(cov)
    ev = ev.clamp_min(float(ev.max()) * 1e-10)
    return (vec * ev.rsqrt()) @ vec.T, (vec * ev.sqrt()) @ vec.T


def _least_squares_start(gram: Tensor, colsum: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
                         probs: Tensor) -> Tensor:
    """(T, k) float64 minimisers of ‖s(W h + b) + c·1 − log p‖² over (h, c), zeros clipped.

    A zero probability is replaced by (the smallest positive one) / 10 in the logarithm: only a start.
    """
    n = weight.shape[0]
    p = probs.double()
    floor = torch.where(p > 0, p, torch.full_like(p, math.inf)).min(-1, keepdim=True).values / 10
    y = torch.log(torch.maximum(p, floor)) / scale  # (T, vocab)
    if bias is not None:
        y = y - bias.double()
    full = torch.zeros(len(gram) + 1, len(gram) + 1, dtype=torch.float64)  # normal equations of [W 1]
    full[:-1, :-1], full[:-1, -1], full[-1, :-1], full[-1, -1] = gram, colsum, colsum, n
    rhs = torch.cat([y @ weight.double(), y.sum(-1, keepdim=True)], dim=1)  # (T, k + 1)
    ridge = 1e-10 * full.diagonal().mean() * torch.eye(len(full), dtype=torch.float64)
    return torch.linalg.solve(full + ridge, rhs.T).T[:, :-1].contiguous()


class _Problem:
    """The free problem for a weight matrix (vocab, k): whitened objective, warm start, solve."""

    def __init__(self, head, weight: Tensor, bias: Tensor | None):
        self.head, self.weight, self.bias = head, weight.double(), None if bias is None else bias.double()
        self.gram, self.colsum = _gram(self.weight)
        self.m, self.m_inv = _whitening(self.gram, self.colsum, len(self.weight))
        self.white = self.weight @ self.m  # (vocab, k): logits = white @ x with x = M⁻¹ h

    def objective(self, probs: Tensor, whitened: bool = True) -> _Objective:
        w = self.white if whitened else self.weight
        return _Objective(w, self.bias, self.head.scale, self.head.softcap, probs)

    def solve(self, probs: Tensor, config: BoundConfig) -> dict:
        """Free minimisation for a chunk of targets; h and everything else in original coordinates."""
        obj = self.objective(probs)
        n, k = len(probs), self.weight.shape[1]
        rows = torch.arange(n)
        zero = torch.zeros(n, k, dtype=torch.float64)
        initial, _, _ = obj.evaluate(zero, rows)
        x0 = zero
        if config.warm_start:
            h_ls = _least_squares_start(self.gram, self.colsum, self.weight, self.bias, self.head.scale, probs)
            x_ls = h_ls @ self.m_inv
            kl_ls, _, _ = obj.evaluate(x_ls, rows)
            x0 = torch.where((kl_ls < initial)[:, None], x_ls, zero)
        x, gnorm, iters, trace = _solve(obj, x0, config, to_h=self.m_inv)
        kl, _, _ = obj.evaluate(x, rows)
        return {"h": x @ self.m, "kl": kl, "gnorm": gnorm, "iters": iters, "trace": torch.cat([initial[None], trace]),
                "initial": initial, "logprobs": obj.logprobs(x).float()}


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


# --------------------------------------------------------------------------------------------
# free_bound
# --------------------------------------------------------------------------------------------


def free_bound(model, tokenizer, targets: Targets, config: BoundConfig | None = None, *,
               progress: bool = True) -> Result:
    """min over h ∈ R^d of KL(target ‖ softmax(W h + b)) per target: no prompt can beat it.

    Solved in float64 on CPU to ‖∇‖ ≤ config.tol per target (see the module docstring).

    Returns:
        Result with method "free_bound": kl (T,) float64 bound in nats, initial_kl (T,) at h = 0,
        logprobs (T, vocab) float32 at the solution, steps (T,) Newton iterations, trace
        (n_iter + 2, T) KL at h = 0, at the start point and after each Newton iteration (NaN once done).
        meta: "converged" (T,) list of bools (gradient norm ≤ tol reached), "grad_norm" (T,) list,
        "hidden_norm" (T,) ‖h*‖, "is_bound"/"certified" (False with soft-capping).
    """
    config = BoundConfig() if config is None else config
    if not isinstance(config, BoundConfig):
        raise TypeError(f"config must be a BoundConfig, got {type(config).__name__}.")
    targets.check_width(model)
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
                  meta=meta)


# --------------------------------------------------------------------------------------------
# norm_bound
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormSpec:
    """What the final norm can output: γ ⊙ u + β, ‖u‖ < radius (and Σ u = 0 for LayerNorm)."""

    kind: str  # "rms" or "layer"
    gamma: Tensor  # (d,) float64, the effective scale (Gemma's 1 + w included)
    beta: Tensor | None  # (d,) float64 LayerNorm bias, else None
    eps: float
    radius: float  # √d


def final_norm(model):
    """The model's final normalisation module (Llama/Gemma `norm`, GPT-2 `ln_f`, ...)."""
    dec = body(model)
    for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
        if isinstance(getattr(dec, name, None), torch.nn.Module):
            return getattr(dec, name)
    raise NotImplementedError(f"cannot find the final norm of {type(model).__name__}: norm_bound supports "
                              "decoders whose final norm is `norm`, `final_layernorm`, `ln_f` or `final_norm`.")


def norm_spec(model) -> NormSpec:
    """Read γ (β) from the final-norm module by calling it, and check the formula on a random input."""
    norm = final_norm(model)
    d = int(model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config")
            else model.config.hidden_size)
    p = next(norm.parameters())
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if eps is None:
        raise NotImplementedError(f"{type(norm).__name__} has no `eps`/`variance_epsilon`; norm_bound cannot read it.")
    kind = "layer" if isinstance(norm, torch.nn.LayerNorm) or "LayerNorm" in type(norm).__name__ else "rms"

    def call(x):
        with torch.no_grad():
            return norm(x.to(p.device, p.dtype)[None]).double().cpu()[0]

    x = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if kind == "rms":
        gamma = call(torch.ones(d)) * math.sqrt(1 + eps)  # RMSNorm(1) = γ / √(1 + ε)
        beta = None
        expected = gamma * x / torch.sqrt((x * x).mean() + eps)
    else:
        beta = call(torch.zeros(d))  # LayerNorm(0) = β
        gamma = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
        c = x - x.mean()
        expected = gamma * c / torch.sqrt((c * c).mean() + eps) + beta
    got = call(x)
    if not torch.allclose(got, expected, rtol=1e-2 if p.dtype != torch.float32 else 1e-4, atol=1e-3):
        raise NotImplementedError(f"the final norm {type(norm).__name__} does not behave like {kind}-norm "
                                  "γ ⊙ x / √(mean x² + ε) (+ β); norm_bound does not support it.")
    return NormSpec(kind, gamma, beta, float(eps), math.sqrt(d))


def norm_bound(model, tokenizer, targets: Targets, config: BoundConfig | None = None, *,
               progress: bool = True) -> Result:
    """min KL(target ‖ softmax(W h + b)) over the h the model's final norm can output, per target.

    RMSNorm: h = γ ⊙ u, ‖u‖ ≤ √d (the closure of the reachable set; ε keeps ‖u‖ strictly below √d).
    LayerNorm: h = γ ⊙ u + β, ‖u‖ ≤ √d, Σ u = 0 (solved in an orthonormal basis of the centred subspace).
    The problem is convex (without soft-capping): the free minimiser is used where it lies inside the
    ball; otherwise the minimum is on the sphere, found by Newton-CG on u = R v/‖v‖ from the free
    solution's direction, and certified by its KKT multiplier λ = −⟨∇_u KL, u⟩/R² ≥ 0.

    Returns Result "norm_bound" (as free_bound); meta adds "norm" (kind, eps, radius), "interior",
    "multiplier", "certified" (per-target lists; converged and KKT holds).
    """
    config = BoundConfig() if config is None else config
    if not isinstance(config, BoundConfig):
        raise TypeError(f"config must be a BoundConfig, got {type(config).__name__}.")
    targets.check_width(model)
    start = time.perf_counter()
    head = output_layer(model)
    spec = norm_spec(model)
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
        base = problem.objective(probs, whitened=False)
        sphere = _Sphere(base, spec.radius)
        v0 = torch.where(u.norm(dim=-1, keepdim=True) > 0, u, torch.ones_like(u))
        v, gnorm, iters, trace = _solve(sphere, v0 / v0.norm(dim=-1, keepdim=True) * spec.radius, config)
        point = torch.where(interior[:, None], u, sphere.point(v))
        rows = torch.arange(len(probs))
        kl, grad_u, _ = base.evaluate(point, rows)
        multiplier = -(grad_u * point).sum(-1) / spec.radius**2
        gnorm = torch.where(interior, free["gnorm"], gnorm)
        converged = gnorm <= config.tol
        outs.append({"kl": kl, "initial": free["initial"], "logprobs": base.logprobs(point).float(),
                     "steps": free["iters"] + torch.where(interior, 0, iters), "gnorm": gnorm,
                     "interior": interior, "multiplier": multiplier,
                     "certified": converged & (interior | (multiplier >= -config.tol)),
                     "trace": torch.cat([free["trace"], torch.where(interior, math.nan, trace)])})

    def cat(key):
        return torch.cat([o[key] for o in outs])

    meta = _bound_meta(config, head, norm={"kind": spec.kind, "eps": spec.eps, "radius": spec.radius},
                       converged=(cat("gnorm") <= config.tol).tolist(), grad_norm=cat("gnorm").tolist(),
                       interior=cat("interior").tolist(), multiplier=cat("multiplier").tolist())
    meta["certified"] = (cat("certified") & (head.softcap is None)).tolist()
    return Result(method="norm_bound", target_ids=targets.ids, kl=cat("kl"), initial_kl=cat("initial"),
                  logprobs=cat("logprobs"), steps=cat("steps"), trace=_pad_traces([o["trace"] for o in outs]),
                  wall_s=time.perf_counter() - start, meta=meta)


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
    n_layers = len(body(model).layers)
    layer = n_layers // 2 if config.layer is None else config.layer
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer={config.layer} is out of range for a model with {n_layers} decoder layers; "
                         f"use 0..{n_layers - 1} (or negative from the end), or None for the middle.")
    layer %= n_layers
    out, setup, init_ids, start = run_vectors(model, tokenizer, targets, config, method="layer_bound",
                                              layer=layer, progress=progress)
    meta = {"config": dataclasses.asdict(config), "is_bound": False, "layer": layer, "n_layers": n_layers,
            "n_chunks": out["n_chunks"], "init_ids": init_ids.tolist(),
            "notes": ["local optimum of a relaxation of the soft prompt (Adam), not a certified bound"]}
    return Result(method="layer_bound", target_ids=targets.ids, kl=out["kl"], initial_kl=out["initial_kl"],
                  logprobs=out["logprobs"], steps=out["steps"], trace=out["trace"],
                  wall_s=time.perf_counter() - start, prompt_embeds=out["vectors"], meta=meta)

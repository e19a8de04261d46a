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
`trust-ncg`) with exact float64 Hessian-vector products, one independent solver per target. One joint
solve over the sum of the separable objectives shares line searches / trust radii / CG across targets
and converges far worse (measured: a joint Newton-CG on 4 targets was still at ‖∇‖ ≈ 3e-4 after 32
iterations; alone, each reached 1e-7). So each target's solver runs in its own thread and `_Lockstep`
answers all their requests together with batched float64 matmuls: per-target algorithms, batched cost.

Preconditioning by restarts. Peaked targets make the Hessian s²·Wᵀ(diag q − q qᵀ)W very ill-conditioned,
and plain Newton-CG then spends ~35 CG products per Newton iteration (measured on SmolLM2: 1,393
products for one target of entropy 0.5). SciPy's Newton-CG takes no preconditioner, so each target's
solver is restarted every `REFRESH` Newton iterations in new variables x, h = h_r + M_r x, where
M_rᵀ Ĥ M_r = I for a cheap approximation Ĥ of the Hessian at h_r: exact over the `PRECOND_TOKENS`
most probable tokens, the rest of the vocabulary's mass times the covariance of W's rows (the Hessian
at the uniform distribution). Restarting loses nothing (Newton-CG keeps no state between iterations);
f and ∇f stay exact, only the coordinates change. Far from the optimum a Newton-CG step from a start
point's preconditioner can land where the next needs a thousand products, so the first restart is
`GLOBAL_ITERS` iterations of SciPy's trust-krylov, whose trust region keeps early steps sane.
Measured with benchmarks/soft_step.py's 64 SmolLM2 targets: 4,117 batched requests and 207 s with
one whitened Newton-CG per target; 456 requests and 45-48 s with this schedule, the same bounds
(to the 4 decimals recorded before; two restart settings agree to 1.4e-7).
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
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from .. import lm
from ..lm import output_layer
from ..targets import Targets
from .common import Result, is_int, require
from .soft import PromptVectorsConfig, run_vectors

log = logging.getLogger(__name__)

SOLVERS = ("Newton-CG", "trust-krylov", "trust-ncg")
# The restart schedule (module docstring); measured on 64 SmolLM2 targets, entropies 0.5-10 nats.
GLOBAL_ITERS = 8  # trust-krylov iterations of the first restart (5-12 measured alike)
REFRESH = 5  # Newton iterations between preconditioner refreshes after that (3 and 5 measured alike)
PRECOND_TOKENS = 2048  # tokens whose Hessian terms the preconditioner keeps exactly (512-8192 alike)
TAIL_FLOOR = 1e-3  # least vocabulary-tail mass the preconditioner assumes, so it never trusts a flat direction


@dataclass(frozen=True)
class BoundConfig:
    """Knobs of `free_bound` and `norm_bound`. Plain values only."""

    tol: float = 1e-6  # stop a target when the float64 gradient norm ‖∇_h KL‖ ≤ tol (nats per unit of h)
    max_iter: int = 100  # solver iterations per target at most, all restarts together (‖h*‖ = ∞ may use them all)
    solver: str = "Newton-CG"  # SciPy method after the trust-krylov start: "Newton-CG", "trust-krylov", "trust-ncg"
    warm_start: bool = True  # least-squares warm start (else h = 0)
    max_batch: int = 64  # targets per chunk (memory: a few (max_batch, vocab) float64 arrays)

    def __post_init__(self):
        require(isinstance(self.tol, (int, float)) and not isinstance(self.tol, bool)
               and math.isfinite(self.tol) and self.tol > 0,
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


# --------------------------------------------------------------------------------------------
# The objective: batched KL(p ‖ softmax(z(h))) with gradient and Hessian-vector products.
# --------------------------------------------------------------------------------------------


class _Objective:
    """f_t(h_t) = KL(p_t ‖ softmax(s·(h_t Wᵀ + b))), soft-capped if `softcap`; rows are independent.

    `evaluate(h, rows)` takes h (A, k) float64 for the rows `rows` of the target batch P (T, vocab)
    and returns (KL (A,), gradient (A, k), cache); `hvp(v, cache)` gives Hessian-vector products
    at the cached points and `preconditioner(cache)` the restart coordinates there (see the module
    docstring). Everything is float64: float32 products stall CG near the optimum.
    `cov` (k, k) is the covariance of W's rows, the preconditioner's model of the vocabulary's tail.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None, probs: Tensor,
                 cov: Tensor):
        self.w = weight.double()
        self.bias = None if bias is None else bias.double()
        self.s, self.c = float(scale), softcap
        self.cov = cov
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

    def preconditioner(self, cache, rows=None) -> tuple[Tensor, Tensor]:
        """(M (A, k, k), ‖M⁻¹‖₂ upper bound (A,)) with Mᵀ Ĥ M = I at the cached points.

        Ĥ = Σ_{i ∈ top} q_i a_i a_iᵀ + max(1 − Σ_top q_i, TAIL_FLOOR) s² C + δ I, a_i = J_i − Σ_top q_j J_j, J_i = s·slope_i·w_i:
        the Gauss-Newton Hessian s²·Jᵀ(diag q − q qᵀ)J over the most probable tokens, the tail modelled
        by the row covariance C, δ only to keep the Cholesky factor finite.
        `rows` (A,) are the target rows of the cached points, for error messages (default 0..A−1).
        Raises FloatingPointError if Ĥ is not finite (NaN/inf in the weights, or in the point, e.g.
        from non-finite targets) or cannot be factorised; it never loops forever.
        """
        q, slope, _ = cache
        eye = torch.eye(self.w.shape[1], dtype=torch.float64)
        ms, norms = [], []
        for i in range(len(q)):
            row = i if rows is None else int(rows[i])
            top = torch.topk(q[i], min(PRECOND_TOKENS, len(q[i]))).indices
            jac = self.w[top] * self.s if slope is None else self.w[top] * (self.s * slope[i, top, None])
            qt = q[i, top]
            a = jac - qt @ jac
            hess = (a * qt[:, None]).T @ a + max(1 - float(qt.sum()), TAIL_FLOOR) * self.s**2 * self.cov
            if not bool(torch.isfinite(hess).all()):
                raise FloatingPointError(
                    f"the bound's Hessian for target row {row} (counted within its chunk of max_batch targets) "
                    "is not finite: the target probabilities, the output-layer weights or the solver's point "
                    "contain NaN or inf. Check that the targets and the model's weights are finite "
                    "(e.g. torch.isfinite(targets.probs).all()).")
            # δ grows until the factorisation succeeds (needed only for degenerate W); Ĥ is finite and
            # positive semi-definite, so a δ of up to 1e28 × its scale always does.
            jitter = max(1e-12 * float(hess.diagonal().abs().mean()), 1e-300)
            for _ in range(21):
                chol, info = torch.linalg.cholesky_ex(hess + jitter * eye)
                if int(info) == 0:
                    break
                jitter *= 100
            else:
                raise FloatingPointError(
                    f"the bound's Hessian for target row {row} could not be factorised even with a jitter of "
                    f"{jitter / 100:.3g}; the output-layer weights are degenerate or badly scaled.")
            ms.append(torch.linalg.solve_triangular(chol, eye, upper=False).T)  # M = L⁻ᵀ, Ĥ = L Lᵀ
            norms.append(float(hess.diagonal().sum() + len(eye) * jitter) ** 0.5)  # ‖Lᵀ‖₂ ≤ √trace
        return torch.stack(ms), torch.tensor(norms, dtype=torch.float64)


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

    def preconditioner(self, cache, rows=None) -> tuple[Tensor, Tensor]:
        # Near the sphere the Hessian in v is ≈ (R/r)² P H_u P, so the base coordinates scaled by r/R
        # fit it; along v̂ it is ~0, but the gradient has no v̂ component, so CG never moves that way.
        base_cache, r, _, _ = cache
        m, norm = self.base.preconditioner(base_cache, rows)
        ratio = (r / self.R).squeeze(-1)
        return m * ratio[:, None, None], norm / ratio


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


class _ServerFailed(RuntimeError):
    """Raised in a solver thread by `_Lockstep.ask` once the server has failed; its cause is the
    server's error, which the main thread re-raises from `_solve`."""


class _Lockstep:
    """One SciPy minimisation per target, each in its own thread, computed together.

    Every thread asks for f/∇f ("f"), a Hessian-vector product ("h") or its restart coordinates ("m")
    at its own point and blocks; f, ∇f and the curvature there are cached per row. Once every
    live thread is waiting, the main thread answers all of them with batched matmuls. Each target
    thus gets its own, unmodified SciPy solver (own line search, own CG, own stopping), while the
    cost is that of one batched matmul per round of requests.
    If answering fails (say `obj.evaluate` raises), every thread is woken: its pending and later
    `ask`s raise `_ServerFailed` from that error; once every thread is done, `serve` re-raises it.
    """

    def __init__(self, obj, n: int):
        self.obj, self.n = obj, n
        self.cv = threading.Condition()
        self.pending: dict[int, tuple] = {}
        self.answers: dict[int, object] = {}
        self.alive = n
        self.cache: dict[int, tuple] = {}  # row -> (x as numpy, cache at x)
        self.calls = 0
        self.error: BaseException | None = None  # the server's failure, once it has failed

    def ask(self, row: int, kind: str, x: np.ndarray, v: np.ndarray | None = None):
        with self.cv:
            if self.error is None:
                self.pending[row] = (kind, x, v)
                self.cv.notify_all()
                while row not in self.answers and self.error is None:
                    self.cv.wait()
                if row in self.answers:
                    return self.answers.pop(row)
            self.pending.pop(row, None)
            raise _ServerFailed(f"the bound solver's server failed: {self.error!r}") from self.error

    def done(self):
        with self.cv:
            self.alive -= 1
            self.cv.notify_all()

    def serve(self):
        """Answer rounds of requests until every thread is done; on an error, stop them all, then re-raise it."""
        try:
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
        except BaseException as err:  # KeyboardInterrupt too: no thread may be left waiting
            with self.cv:
                self.error = err
                self.pending.clear()
                self.cv.notify_all()  # every waiting ask raises; later ones raise at once
                while self.alive > 0:
                    self.cv.wait()
            raise

    def _answer(self, batch: dict) -> dict:
        self.calls += 1
        answers = {}
        fresh = [r for r, (_, x, _) in batch.items() if r not in self.cache or not np.array_equal(self.cache[r][0], x)]
        if fresh:
            x = torch.from_numpy(np.stack([batch[r][1] for r in fresh]))
            kl, grad, cache = self.obj.evaluate(x, torch.tensor(fresh))
            for i, r in enumerate(fresh):
                self.cache[r] = (batch[r][1], _take(cache, i), (float(kl[i]), grad[i].numpy().copy()))
        hess = [r for r, (kind, _, _) in batch.items() if kind == "h"]
        if hess:
            v = torch.from_numpy(np.stack([batch[r][2] for r in hess]))
            hv = self.obj.hvp(v, _stack([self.cache[r][1] for r in hess]))
            for i, r in enumerate(hess):
                answers[r] = hv[i].numpy().copy()
        pre = [r for r, (kind, _, _) in batch.items() if kind == "m"]
        if pre:
            m, inv_norm = self.obj.preconditioner(_stack([self.cache[r][1] for r in pre]), pre)
            for i, r in enumerate(pre):
                answers[r] = (m[i].numpy().copy(), float(inv_norm[i]))
        for r, (kind, _, _) in batch.items():
            if kind == "f":
                f, g = self.cache[r][2]
                answers[r] = (f, g.copy())
        return answers


def _restart(hub: _Lockstep, row: int, origin: np.ndarray, method: str, maxiter: int, tol: float,
             history: list[float]):
    """One SciPy run for target `row` in coordinates x, h = origin + M x, M the preconditioner at origin.

    Appends the KL after each iteration to `history`; stops early once ‖∇_h‖ ≤ tol at an iterate.
    Returns (the SciPy result, h at its end).
    """
    m, m_inv_norm = hub.ask(row, "m", origin)
    last = {"x": None, "g": math.inf}

    def fun(x):
        f, g = hub.ask(row, "f", origin + m @ x)
        last["x"], last["g"] = x.copy(), float(np.linalg.norm(g))
        return f, m.T @ g

    def hessp(x, v):
        return m.T @ hub.ask(row, "h", origin + m @ x, m @ v)

    def callback(intermediate_result):  # SciPy needs this exact name
        history.append(float(intermediate_result.fun))
        if np.array_equal(intermediate_result.x, last["x"]) and last["g"] <= tol:
            raise StopIteration

    if method == "Newton-CG":
        options = {"maxiter": maxiter, "xtol": 1e-300}  # stop on the gradient test (callback), not on step size
    else:
        options = {"maxiter": maxiter, "gtol": tol / m_inv_norm}  # ‖∇_x‖ < gtol implies ‖∇_h‖ < tol
    res = minimize(fun, np.zeros(len(origin)), jac=True, hessp=hessp, method=method, options=options,
                   callback=callback)
    return res, origin + m @ res.x


def _solve(obj, x0: Tensor, config: BoundConfig):
    """Minimise every row of `obj` from x0 (T, k) float64, each with its own restarted SciPy solver.

    Restarts: first `GLOBAL_ITERS` iterations of trust-krylov, then runs of at most `REFRESH` iterations
    of `config.solver`, each in fresh preconditioned coordinates (see the module docstring). A target
    stops when ‖∇_h‖ ≤ tol, after `max_iter` iterations in all, or when a restart makes no progress
    (neither f nor ‖∇‖ decreases). A row whose own solver fails keeps its best point so far (logged);
    an error in the batched computation (`obj`) stops every row and is re-raised here.
    Returns (h (T, k), ‖∇_h‖ (T,), iterations (T,), trace (n_iter + 1, T) KL per iteration).
    """
    n, k = x0.shape
    hub = _Lockstep(obj, n)
    results: dict[int, tuple] = {}

    def run(row: int):
        history: list[float] = []
        h = x0[row].numpy().copy()
        iters = restarts = 0
        try:
            f, g = hub.ask(row, "f", h)
            gnorm = float(np.linalg.norm(g))
            history.append(f)
            while gnorm > config.tol and iters < config.max_iter:
                first = restarts == 0 and GLOBAL_ITERS > 0
                method = "trust-krylov" if first else config.solver
                res, new_h = _restart(hub, row, h, method, min(GLOBAL_ITERS if first else REFRESH,
                                                               config.max_iter - iters), config.tol, history)
                iters, restarts = iters + int(res.nit), restarts + 1
                log.debug("row %d restart %s: %d iterations, %d products, KL %.6g -> %.6g, %s",
                          row, method, res.nit, res.get("nhev", 0), f, res.fun, res.message)
                new_f, new_g = hub.ask(row, "f", new_h)
                new_gnorm = float(np.linalg.norm(new_g))
                if not (new_f < f or new_gnorm < gnorm):
                    if first:
                        continue  # every trust-region step was rejected: go on with the local solver
                    break  # the solver can make no more progress from here
                h, f, gnorm = new_h, new_f, new_gnorm
        except _ServerFailed:
            pass  # the server failed: _solve re-raises its error once every thread is done
        except Exception as err:  # noqa: BLE001 - reported, and the row keeps its best point so far
            log.warning("bound solver failed on row %d: %s", row, err)
        finally:
            results[row] = (h, iters, history)
            hub.done()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        hub.serve()  # if answering fails, it stops every thread and re-raises the error here
    finally:
        for t in threads:
            t.join()
    x = torch.from_numpy(np.stack([results[i][0] for i in range(n)])).double()
    _, grad, _ = obj.evaluate(x, torch.arange(n))
    gnorm = grad.norm(dim=-1)
    iters = torch.tensor([results[i][1] for i in range(n)])
    n_hist = max(len(results[i][2]) for i in range(n))
    trace = torch.full((n_hist, n), math.nan, dtype=torch.float64)
    for i in range(n):
        trace[:len(results[i][2]), i] = torch.tensor(results[i][2], dtype=torch.float64)
    log.debug("bound solve: %d targets, %d batched requests, max ‖∇‖ %.3g", n, hub.calls, float(gnorm.max()))
    return x, gnorm, iters, trace


def _gram(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(k, k) WᵀW and (k,) Wᵀ1 in float64 (the one O(vocab·k²) cost, shared by the preconditioner and warm start)."""
    w = weight.double()
    return w.T @ w, w.sum(0)


def _row_covariance(gram: Tensor, colsum: Tensor, n: int) -> Tensor:
    """(k, k) covariance of W's n rows: the Hessian of the free problem at the uniform distribution."""
    mean = colsum / n
    return gram / n - torch.outer(mean, mean)


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

"""Lockstep: one SciPy minimisation per row, each in its own thread, all rows' requests answered as one batch.

For T independent problems min_x f_t(x_t) over x_t ∈ R^k, one joint SciPy solve over the sum shares
line searches, trust radii and CG across rows and converges far worse (measured for the bounds: a
joint Newton-CG on 4 targets was still at ‖∇‖ ≈ 3e-4 after 32 iterations; alone, each reached 1e-7).
So each row gets its own, unmodified SciPy solver (own line search, own CG, own stopping) in its
own thread, and `_Lockstep` answers all their requests together: per-row algorithms, batched cost.

`solve(obj, x0, ...)` drives it. The objective `obj` provides, for A of the T rows at a time:
- `evaluate(x, rows)`: x (A, k) float64, rows (A,) int64 → (f (A,), ∇f (A, k), cache at x);
- `hvp(v, cache)`: v (A, k) → (A, k) Hessian-vector products at the cached points;
- `preconditioner(cache, rows)`: → (M (A, k, k) with Mᵀ Ĥ M ≈ I for an approximate Hessian Ĥ,
  an upper bound on ‖M⁻¹‖₂ (A,)).
A cache is a row-major tensor, a (nested) tuple of them, or None (`_take` / `_stack` cut and join it).

Restarts. SciPy's Newton-CG takes no preconditioner, so each row's solver is restarted every
`refresh` iterations in new variables y, x = x_r + M_r y, M_r the preconditioner at x_r. Restarting
loses nothing (Newton-CG keeps no state between iterations); f and ∇f stay exact, only the
coordinates change. The first restart is `global_iters` iterations of trust-krylov, whose trust
region keeps early steps sane far from the optimum. `dplib.optim.bound` is the user; its module
docstring says why this schedule and what it measured.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

log = logging.getLogger(__name__)

SOLVERS = ("Newton-CG", "trust-krylov", "trust-ncg")  # SciPy methods that take hessp, for after the first restart


def _take(cache, i: int):
    """Row i of a (nested) cache of row-major tensors, keeping the row dimension."""
    if cache is None:
        return None
    if isinstance(cache, tuple):
        return tuple(_take(c, i) for c in cache)
    return cache[i:i + 1]


def _stack(caches: list):
    """Join per-row caches (as `_take` cuts them) back into one, in order."""
    if caches[0] is None:
        return None
    if isinstance(caches[0], tuple):
        return tuple(_stack([c[j] for c in caches]) for j in range(len(caches[0])))
    return torch.cat(caches)


class _ServerFailed(RuntimeError):
    """Raised in a solver thread by `_Lockstep.ask` once the server has failed; its cause is the
    server's error, which the main thread re-raises from `solve`."""


class _Lockstep:
    """One SciPy minimisation per row, each in its own thread, computed together.

    Every thread asks for f/∇f ("f"), a Hessian-vector product ("h") or its restart coordinates ("m")
    at its own point and blocks; f, ∇f and the curvature there are cached per row. Once every
    live thread is waiting, the main thread answers all of them with one batched call. Each row
    thus gets its own, unmodified SciPy solver (own line search, own CG, own stopping), while the
    cost is that of one batched call per round of requests.
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
            raise _ServerFailed(f"the lockstep server failed: {self.error!r}") from self.error

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
    """One SciPy run for row `row` in coordinates y, x = origin + M y, M the preconditioner at origin.

    Appends f after each iteration to `history`; stops early once ‖∇f‖ ≤ tol (in x) at an iterate.
    Returns (the SciPy result, x at its end).
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
        options = {"maxiter": maxiter, "gtol": tol / m_inv_norm}  # ‖∇_y‖ < gtol implies ‖∇_x‖ < tol
    res = minimize(fun, np.zeros(len(origin)), jac=True, hessp=hessp, method=method, options=options,
                   callback=callback)
    return res, origin + m @ res.x


def solve(obj, x0: Tensor, *, tol: float, max_iter: int, solver: str, global_iters: int, refresh: int):
    """Minimise every row of `obj` from x0 (T, k) float64, each with its own restarted SciPy solver.

    Restarts: first `global_iters` iterations of trust-krylov (none if 0), then runs of at most
    `refresh` iterations of `solver` (one of SOLVERS), each in fresh preconditioned coordinates
    (see the module docstring). A row stops when ‖∇f‖ ≤ tol, after `max_iter` iterations in all, or
    when a restart makes no progress (neither f nor ‖∇f‖ decreases). A row whose own solver fails
    keeps its best point so far (logged); an error in the batched computation (`obj`) stops every
    row and is re-raised here.
    Returns (x (T, k) float64, ‖∇f‖ (T,) at x, iterations (T,) int64, trace (n_iter + 1, T) float64:
    f at the start and after each iteration, NaN once a row is done).
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
            while gnorm > tol and iters < max_iter:
                first = restarts == 0 and global_iters > 0
                method = "trust-krylov" if first else solver
                res, new_h = _restart(hub, row, h, method, min(global_iters if first else refresh, max_iter - iters),
                                      tol, history)
                iters, restarts = iters + int(res.nit), restarts + 1
                log.debug("row %d restart %s: %d iterations, %d products, f %.6g -> %.6g, %s",
                          row, method, res.nit, res.get("nhev", 0), f, res.fun, res.message)
                new_f, new_g = hub.ask(row, "f", new_h)
                new_gnorm = float(np.linalg.norm(new_g))
                if not (new_f < f or new_gnorm < gnorm):
                    if first:
                        continue  # every trust-region step was rejected: go on with the local solver
                    break  # the solver can make no more progress from here
                h, f, gnorm = new_h, new_f, new_gnorm
        except _ServerFailed:
            pass  # the server failed: solve re-raises its error once every thread is done
        except Exception as err:  # noqa: BLE001 - reported, and the row keeps its best point so far
            log.warning("lockstep solver failed on row %d: %s", row, err)
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
    log.debug("lockstep solve: %d rows, %d batched requests, max ‖∇‖ %.3g", n, hub.calls, float(gnorm.max()))
    return x, gnorm, iters, trace

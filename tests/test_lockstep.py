"""dplib.optim.lockstep: one SciPy solver per row, their requests answered together.

Tested on a small problem with a known answer, independent of the bounds that use it:
f_t(x) = Σ_j exp(u_j) − u_j − 1 with u = B x − c_t, minimised (f = 0) exactly at x*_t = B⁻¹ c_t.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from helpers import in_thread

from dplib.optim import lockstep
from dplib.optim.lockstep import SOLVERS, _stack, _take, solve

K = 4  # dimension of each row's x
SCHEDULE = {"global_iters": 8, "refresh": 5}  # the bounds' restart schedule


class Convex:
    """The known-answer objective above, in the protocol `lockstep.solve` drives (float64 throughout).

    Counts calls and the rows of each `evaluate`, to check that requests are batched.
    """

    def __init__(self, centres: torch.Tensor, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.b = torch.eye(K, dtype=torch.float64) + 0.3 * torch.randn(K, K, generator=g, dtype=torch.float64)
        self.c = centres.double()
        self.evaluated_rows: list[int] = []  # rows per evaluate call

    def argmin(self) -> torch.Tensor:
        return torch.linalg.solve(self.b, self.c.T).T

    def evaluate(self, x, rows):
        self.evaluated_rows.append(len(rows))
        u = x @ self.b.T - self.c[rows]
        e = torch.expm1(u)  # exp(u) − 1 without cancellation, so f stays exact to ~1e-16·|u| near 0
        return (e - u).sum(-1), e @ self.b, e + 1

    def hvp(self, v, cache):
        return (cache * (v @ self.b.T)) @ self.b  # Bᵀ diag(exp u) B v

    def preconditioner(self, cache, rows=None):
        hess = torch.einsum("ji,aj,jk->aik", self.b, cache, self.b)  # exact: Bᵀ diag(exp u) B
        chol = torch.linalg.cholesky(hess)
        eye = torch.eye(K, dtype=torch.float64).expand_as(hess)
        m = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)  # Mᵀ H M = I
        return m, hess.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt()  # ‖M⁻¹‖₂ = ‖Lᵀ‖₂ ≤ √trace H


def centres(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(obj, x0, timeout=30.0, **kwargs):
    """solve(...) in a hang-guarded thread; its return value, or the error it raised."""
    kwargs = {"tol": 1e-7, "max_iter": 100, "solver": "Newton-CG", **SCHEDULE, **kwargs}
    out = in_thread(lambda: solve(obj, x0, **kwargs), timeout=timeout)
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("global_iters", [0, 8])
def test_every_row_reaches_the_known_minimum(solver, global_iters):
    obj = Convex(centres(3))
    x0 = torch.zeros(3, K, dtype=torch.float64)
    x, gnorm, iters, trace = run(obj, x0, solver=solver, global_iters=global_iters)
    torch.testing.assert_close(x, obj.argmin(), atol=1e-6, rtol=0)
    assert (gnorm <= 1e-7).all(), gnorm
    _, grad, _ = obj.evaluate(x, torch.arange(3))
    torch.testing.assert_close(gnorm, grad.norm(dim=-1), atol=0, rtol=0)  # the reported norm is at x
    assert (iters >= 1).all() and (iters <= 100).all()
    # trace: f at the start, then after each iteration, never increasing, NaN once a row is done
    assert trace.shape == (int(iters.max()) + 1, 3)
    f0, _, _ = obj.evaluate(x0, torch.arange(3))
    torch.testing.assert_close(trace[0], f0, atol=0, rtol=0)
    for row in range(3):
        column = trace[:, row]
        done = torch.isnan(column)
        assert int((~done).sum()) == int(iters[row]) + 1 and not done[:int(iters[row]) + 1].any()
        assert (column[~done].diff() <= 1e-12).all(), column
        assert column[~done][-1] < 1e-12


def test_a_batch_gives_the_same_result_as_separate_runs_with_fewer_calls():
    obj = Convex(centres(4))
    x0 = torch.zeros(4, K, dtype=torch.float64)
    x, gnorm, iters, trace = run(obj, x0)
    assert obj.evaluated_rows[0] == 4  # the first request of every row is answered in one call
    separate_calls = 0
    for row in range(4):
        alone = Convex(obj.c[row:row + 1])
        xa, ga, ia, ta = run(alone, x0[row:row + 1])
        separate_calls += len(alone.evaluated_rows)
        torch.testing.assert_close(xa[0], x[row], atol=1e-12, rtol=0)
        assert int(ia[0]) == int(iters[row])
        torch.testing.assert_close(ta[:, 0], trace[:len(ta), row], atol=1e-12, rtol=0, equal_nan=True)
    assert len(obj.evaluated_rows) < separate_calls


def test_a_row_that_starts_at_its_minimum_takes_no_iteration():
    obj = Convex(centres(2))
    x0 = obj.argmin().clone()
    x0[1] = 0.0
    x, gnorm, iters, trace = run(obj, x0, tol=1e-6)
    assert iters[0] == 0 and torch.equal(x[0], x0[0]) and torch.isnan(trace[1:, 0]).all()
    assert iters[1] >= 1 and gnorm[1] <= 1e-6


def test_max_iter_caps_every_row():
    obj = Convex(centres(3) * 3)  # far from the start: one iteration does not converge
    x, gnorm, iters, trace = run(obj, torch.zeros(3, K, dtype=torch.float64), max_iter=1)
    assert (iters <= 1).all() and (gnorm > 1e-7).any() and len(trace) <= 2


class FailsOnCall(Convex):
    """The known-answer objective, whose `evaluate` raises on its `fail_at`-th call."""

    def __init__(self, centres, fail_at: int):
        super().__init__(centres)
        self.fail_at = fail_at

    def evaluate(self, x, rows):
        if len(self.evaluated_rows) + 1 == self.fail_at:
            self.evaluated_rows.append(len(rows))
            raise RuntimeError("evaluate failed on purpose")
        return super().evaluate(x, rows)


def test_an_error_in_the_batched_objective_stops_every_solver_thread():
    obj = FailsOnCall(centres(4), fail_at=3)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError) as info:
        run(obj, torch.zeros(4, K, dtype=torch.float64))
    assert type(info.value) is RuntimeError and str(info.value) == "evaluate failed on purpose"  # the original
    assert len(obj.evaluated_rows) == 3  # nothing was evaluated after the failure
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert left == [], f"solver threads left running: {left}"


def test_a_failing_row_keeps_its_start_and_does_not_block_the_others(monkeypatch, caplog):
    real = lockstep._restart

    def restart(hub, row, *args, **kwargs):
        if row == 1:
            raise ValueError("row 1 fails on purpose")
        return real(hub, row, *args, **kwargs)

    monkeypatch.setattr(lockstep, "_restart", restart)
    obj = Convex(centres(4))
    x0 = torch.zeros(4, K, dtype=torch.float64)
    x, gnorm, iters, _ = run(obj, x0)
    assert torch.equal(x[1], x0[1]) and iters[1] == 0
    assert (gnorm[[0, 2, 3]] <= 1e-7).all(), gnorm
    torch.testing.assert_close(x[[0, 2, 3]], obj.argmin()[[0, 2, 3]], atol=1e-6, rtol=0)
    assert "row 1 fails on purpose" in caplog.text


def test_take_and_stack_cut_and_join_nested_caches():
    a, b = torch.arange(6.0).reshape(3, 2), torch.arange(3.0)
    cache = (a, (b, None), None)
    rows = [_take(cache, i) for i in range(3)]
    assert rows[1][0].shape == (1, 2) and rows[1][1][1] is None and rows[1][2] is None
    joined = _stack(rows)
    assert torch.equal(joined[0], a) and torch.equal(joined[1][0], b) and joined[1][1] is None
    assert _take(None, 0) is None and _stack([None, None]) is None
    assert math.isclose(float(_stack([_take(b, 2), _take(b, 0)])[0]), 2.0)

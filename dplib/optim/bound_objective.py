"""The bounds' objective: KL(p ‖ softmax(s·(W h + b))) per target, batched, in float64.

`_Objective` gives the value, gradient, Hessian-vector products and the restart preconditioner
that `dplib.optim.lockstep` drives (see `dplib.optim.bound`'s module docstring for the schedule and
what it measured); `_Sphere` is the same objective on the sphere ‖h‖ = R (for `norm_bound`);
`_least_squares_start` is the warm start. Everything is float64: float32 products stall CG near the
optimum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..lm import kl_from_logprobs

PRECOND_TOKENS = 2048  # tokens whose Hessian terms the preconditioner keeps exactly (512-8192 alike)
TAIL_FLOOR = 1e-3  # least vocabulary-tail mass the preconditioner assumes, so it never trusts a flat direction


class _Objective:
    """f_t(h_t) = KL(p_t ‖ softmax(s·(h_t Wᵀ + b))), soft-capped if `softcap`; rows are independent.

    `evaluate(h, rows)` takes h (A, k) float64 for the rows `rows` of the target batch P (T, vocab)
    and returns (KL (A,), gradient (A, k), cache); `hvp(v, cache)` gives Hessian-vector products
    at the cached points and `preconditioner(cache)` the restart coordinates there (see
    `dplib.optim.bound`'s module docstring): the objective protocol of `dplib.optim.lockstep`.
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
        kl = kl_from_logprobs(p, logq, self.neg_entropy[rows])
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

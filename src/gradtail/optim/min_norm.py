"""The min-norm element of the convex hull of k vectors, from their Gram matrix (docs/methods/gbg.md §2.4).

``min_norm_weights(M)`` returns alpha on the simplex minimising ||sum_g alpha_g v_g||^2 = alpha^T M alpha,
where M = [<v_a, v_b>] is the Gram matrix (the MGDA sub-problem; Sener & Koltun, NeurIPS 2018).

- k = 1: alpha = [1].
- k = 2: closed form gamma = clip((M22 - M12) / (M11 + M22 - 2 M12), 0, 1) on the first vector; a zero
  denominator (identical vectors: every point has the same norm) gives gamma = 1/2.
- k >= 3: start from the best pair (every pair solved in closed form at once), then **projected gradient
  descent on the simplex with exact line search**. Each iteration builds candidate targets: the projections
  onto the simplex (sort-based Euclidean projection) of gradient steps alpha - t M alpha for the step sizes
  t = 4^j / L, j = 0..11 (L = the largest absolute row sum of M, an upper bound of its largest
  eigenvalue), plus the minimiser on the current face (the support of alpha; a small KKT solve, cut back
  to stay non-negative), which finishes a face in one step where plain gradient projection would zig-zag.
  The new iterate is the exact minimiser of the quadratic on the best segment [alpha, target] (the
  two-point closed form again). Every accepted move decreases the objective, so the result's norm never
  exceeds the best pair's, hence any vertex's. It stops when the L1 change of alpha is below ``tol`` or
  after ``max_iter`` iterations. (Chosen over Frank-Wolfe, the MGDA-UB code's method, whose O(1/t) rate
  is too slow for a 1e-5 stopping rule on ill-conditioned Gram matrices.)

Everything stays on M's device: the iterations are tensor operations without host copies; convergence is
read on the host only once every ``check_every`` iterations (one scalar), and an iterate that has
converged is frozen in between, so the result does not depend on ``check_every``. The solve runs in
float64 (k x k is tiny) and returns float32 (float64 if M is float64). A non-finite M gives uniform weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradtail.errors import InputError

_DEGENERATE = 1e-20
_NUM_STEPS = 12
_RIDGE = 1e-12


def gram_matrix(grads: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """M[a, b] = <g_a, g_b> for k vectors given as a (k, D) tensor or a list of k tensors of any shape.

    Computed on the vectors' device by one matrix product (docs/methods/gbg.md §2.4: no host copies per
    tensor).
    """
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise InputError(f"gram_matrix expects a (k, D) tensor, got shape {tuple(grads.shape)}")
        flat = grads
    else:
        if len(grads) == 0:
            raise InputError("gram_matrix needs at least one vector")
        flat = torch.stack([g.reshape(-1) for g in grads])
    if not flat.dtype.is_floating_point or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return flat @ flat.T


def _pair_gamma(m11: torch.Tensor, m12: torch.Tensor, m22: torch.Tensor) -> torch.Tensor:
    """Weight on the first of two vectors minimising the norm of their convex combination
    (docs/methods/gbg.md §2.4).

    Works elementwise on tensors of any shape; a zero denominator (identical vectors) gives 1/2.
    """
    denom = m11 + m22 - 2.0 * m12
    safe = torch.where(denom > _DEGENERATE, denom, torch.ones_like(denom))
    gamma = torch.where(denom > _DEGENERATE, (m22 - m12) / safe, torch.full_like(denom, 0.5))
    return gamma.clamp(0.0, 1.0)


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of a vector onto the probability simplex (sort-based; Duchi et al. 2008)."""
    k = v.shape[-1]
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, dim=-1) - 1.0
    ind = torch.arange(1, k + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    # rho = the largest index (1-based) satisfying the condition; cond[0] is always true.
    rho = torch.where(cond, ind, torch.zeros_like(ind)).amax(dim=-1, keepdim=True).clamp_min(1.0)
    theta = css.gather(-1, (rho - 1).long()) / rho
    return (v - theta).clamp_min(0.0)


def _best_pair(m: torch.Tensor) -> torch.Tensor:
    """The simplex point supported on the best pair (i, j), each pair solved in closed form
    (docs/methods/gbg.md §2.4)."""
    k = m.shape[0]
    diag = torch.diagonal(m)
    mii = diag[:, None].expand(k, k)
    mjj = diag[None, :].expand(k, k)
    gamma = _pair_gamma(mii, m, mjj)
    cost = gamma * gamma * mii + 2.0 * gamma * (1.0 - gamma) * m + (1.0 - gamma) ** 2 * mjj
    flat = torch.argmin(cost.reshape(-1))
    i, j = flat // k, flat % k
    idx = torch.arange(k, device=m.device)
    g = gamma.reshape(-1)[flat]
    return g * (idx == i).to(m.dtype) + (1.0 - g) * (idx == j).to(m.dtype)


def _face_newton_point(m: torch.Tensor, sol: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    """The minimiser on the current face (support of ``sol``), cut back to stay on the simplex.

    Solves the KKT system of min x^T M x s.t. sum x = 1, x_i = 0 off the support (a tiny ridge keeps it
    solvable for dependent vectors), then moves from ``sol`` towards it as far as non-negativity allows.
    Gradient projection finds the face, this step finishes it exactly (gradient-projection active set).
    """
    k = m.shape[0]
    active = (sol > 0).to(m.dtype)
    kkt = torch.zeros(k + 1, k + 1, dtype=m.dtype, device=m.device)
    kkt[:k, :k] = m * torch.outer(active, active) + torch.diag(1.0 - active + ridge * active)
    kkt[:k, k] = active
    kkt[k, :k] = active
    rhs = torch.zeros(k + 1, dtype=m.dtype, device=m.device)
    rhs[k] = 1.0
    x, _ = torch.linalg.solve_ex(kkt, rhs)
    d = x[:k] - sol
    ratio = torch.where(d < 0, sol / (-d).clamp_min(_DEGENERATE), torch.full_like(d, float("inf")))
    step = ratio.amin().clamp(0.0, 1.0)
    return (sol + step * d).clamp_min(0.0)


def min_norm_weights(
    gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-5, check_every: int = 4
) -> torch.Tensor:
    """alpha on the simplex minimising alpha^T M alpha (docs/methods/gbg.md §2.4); see the module docstring.

    Args:
        gram: the (k, k) Gram matrix of the (normalised) objective gradients, on any device.
        max_iter: bound on the projected-gradient iterations (k >= 3).
        tol: stop once the L1 change of alpha in one iteration is below this.
        check_every: iterations between host reads of the convergence flag (one scalar each).

    Example:
        >>> import torch
        >>> from gradtail.optim.min_norm import gram_matrix, min_norm_weights
        >>> min_norm_weights(gram_matrix(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))).tolist()  # orthogonal
        [0.5, 0.5]
        >>> min_norm_weights(gram_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))).tolist()  # clipped
        [1.0, 0.0]
        >>> triangle = torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])  # interior optimum
        >>> [round(a, 3) for a in min_norm_weights(gram_matrix(triangle)).tolist()]
        [0.333, 0.333, 0.333]
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise InputError(f"gram must be a non-empty square matrix, got shape {tuple(gram.shape)}")
    check_every = max(1, int(check_every))
    out_dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=out_dtype, device=gram.device)
    m = gram.detach().to(torch.float64)
    # A non-finite M (an overflowed fp16 gradient) gives the uniform weights, not NaNs (no host check).
    finite = torch.isfinite(m).all()
    m = torch.where(finite, 0.5 * (m + m.T), torch.zeros_like(m))
    uniform = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
    if k == 2:
        gamma = _pair_gamma(m[0, 0], m[0, 1], m[1, 1])
        return torch.where(finite, torch.stack([gamma, 1.0 - gamma]), uniform).to(out_dtype)

    sol = _best_pair(m)
    lipschitz = m.abs().sum(dim=1).amax().clamp_min(_DEGENERATE)
    # Step sizes 1/L, 4/L, 16/L, ...: every projected-gradient direction is a descent direction, and the
    # exact line search makes any step safe, so the longest useful one is kept (a projection-arc search).
    steps = (4.0 ** torch.arange(_NUM_STEPS, device=m.device, dtype=m.dtype))[:, None] / lipschitz
    ridge = _RIDGE * torch.diagonal(m).abs().amax().clamp_min(_DEGENERATE)
    done = torch.zeros((), dtype=torch.bool, device=m.device)
    for it in range(max_iter):
        grad = m @ sol
        pg = project_to_simplex(sol[None, :] - steps * grad[None, :])  # (S, k)
        targets = torch.cat([pg, _face_newton_point(m, sol, ridge)[None, :]])
        # Exact line search on each segment [sol, target]: the two-point closed form.
        mt = targets @ m
        v11 = sol @ grad
        v12 = mt @ sol
        v22 = (mt * targets).sum(dim=1)
        gamma = _pair_gamma(v11.expand_as(v12), v12, v22)
        values = gamma**2 * v11 + 2.0 * gamma * (1.0 - gamma) * v12 + (1.0 - gamma) ** 2 * v22
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
        best = torch.argmin(values)
        new = gamma[best] * sol + (1.0 - gamma[best]) * targets[best]
        new = torch.where(torch.isfinite(new).all() & (values[best] <= v11), new, sol)
        change = (new - sol).abs().sum()
        sol = torch.where(done, sol, new)
        done = done | (change < tol)
        if (it + 1) % check_every == 0 and bool(done):
            break
    return torch.where(finite, sol, uniform).to(out_dtype)


__all__ = ["gram_matrix", "min_norm_weights", "project_to_simplex"]

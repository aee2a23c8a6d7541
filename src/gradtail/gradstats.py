"""Per-class gradient statistics: the one home of P (positive) and N (negative) logit gradients.

Definitions (eql.md §1): for every class j, from step 0 and never reset,

- ``pos[j]`` = P_j = sum over steps and samples whose target for class j is 1 of |dL/dz_ij|
- ``neg[j]`` = N_j = the same over samples whose target for class j is 0
- ``ratio()`` = g_j = P_j / (N_j + 1e-10)

Optionally a C x C matrix ``matrix[j, c]`` = sum over samples of class c of |dL/dz_ij| (GALA, gala.md §1);
then P_j = matrix[j, j] and the negative gradient *produced* by class c is the column sum minus the
diagonal.

Rules kept here, so that every method follows them (eql.md §1):

1. Timing: callers read the statistics, build the step's loss, then call an ``update_*`` method with that
   step's gradient. Nothing here is read after the update within one step.
2. Detachment: every update works on ``detach()``-ed tensors; buffers never carry autograd history.
3. Synchronization: each update SUM-all-reduces the step's per-class sums (one collective, all parts
   concatenated) through :func:`gradtail.distributed.all_reduce_sum_`, which is a no-op without a
   process group. Every rank must call the update every step.
4. Buffers: the sums are registered buffers, so ``state_dict()`` checkpoints them.
5. Precision: sums are float64 whatever the training precision; inputs are cast before summing.
6. Scale: callers may pass gradients of a scaled loss; ratios do not change.

Two ways to feed the statistics: closed form (the loss computes |dL/dz| itself and calls
:meth:`GradientStatistics.update_from_softmax_grad` / :meth:`update_from_elementwise_grad`), or an
autograd hook (:meth:`GradientStatistics.attach_hook`). A hook that was attached but never fired is an
error at the next attach, so statistics cannot silently stay at zero.
"""

from __future__ import annotations

import torch
from torch import nn

from gradtail.distributed import all_reduce_sum_
from gradtail.errors import InputError, TrainingError

RATIO_EPS = 1e-10


class GradientStatistics(nn.Module):
    """Accumulators of per-class positive / negative |dL/dz| (float64 buffers, synced, checkpointed).

    Args:
        num_classes: C, the number of classifier channels tracked.
        track_matrix: also keep the C x C matrix M[j, c] (rows: classifier j, columns: sample class c).
    """

    pos: torch.Tensor
    neg: torch.Tensor
    steps: torch.Tensor

    def __init__(self, num_classes: int, track_matrix: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.track_matrix = track_matrix
        self.register_buffer("pos", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        if track_matrix:
            self.register_buffer("matrix", torch.zeros(num_classes, num_classes, dtype=torch.float64))
        self._pending_hook = False

    # ------------------------------------------------------------------ reading
    def ratio(self, eps: float = RATIO_EPS) -> torch.Tensor:
        """g_j = P_j / (N_j + eps) (eql.md §1), float64, shape (C,)."""
        return self.pos / (self.neg + eps)

    def negative_produced(self) -> torch.Tensor:
        """phi_c = sum_{j != c} M[j, c]: negative gradient produced by samples of class c (gala.md §1)."""
        if not self.track_matrix:
            raise TrainingError("negative_produced() needs GradientStatistics(track_matrix=True)")
        return self.matrix.sum(dim=0) - torch.diagonal(self.matrix)

    @property
    def is_empty(self) -> bool:
        """True before the first update (every weight derived from the statistics is at its initial value)."""
        return int(self.steps) == 0

    # ------------------------------------------------------------------ updating
    @torch.no_grad()
    def update_from_softmax_grad(
        self, grad_abs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
    ) -> None:
        """Add one step of single-label gradients.

        Args:
            grad_abs: (n, C) |dL/dz| for each sample and class channel.
            targets: (n,) class index per sample; channel ``targets[i]`` is the positive of sample i.
            valid: optional (n,) bool mask of samples to count (ignored labels excluded).
        """
        grad_abs, targets = self._check(grad_abs, targets)
        g = grad_abs.detach().to(torch.float64)
        onehot = torch.zeros_like(g)
        if valid is not None:
            keep = valid.to(device=g.device, dtype=torch.bool)
            g = g[keep]
            targets = targets[keep]
            onehot = onehot[keep]
        onehot.scatter_(1, targets.view(-1, 1), 1.0)
        self._accumulate(g, onehot, targets)

    @torch.no_grad()
    def update_from_elementwise_grad(self, grad_abs: torch.Tensor, target_matrix: torch.Tensor) -> None:
        """Add one step of element-wise (sigmoid, multi-label) gradients.

        Args:
            grad_abs: (n, C) |dL/dz|; rows already restricted to samples that count.
            target_matrix: (n, C) in {0, 1}; 1 marks a positive element. A background sample is a row
                of zeros (it only adds negatives).
        """
        if grad_abs.shape != target_matrix.shape or grad_abs.dim() != 2:
            raise InputError(
                f"grad_abs {tuple(grad_abs.shape)} and target_matrix {tuple(target_matrix.shape)} "
                "must both be (n, C)"
            )
        if grad_abs.shape[1] != self.num_classes:
            raise InputError(f"expected {self.num_classes} class channels, got {grad_abs.shape[1]}")
        if self.track_matrix:
            raise TrainingError("the C x C matrix is defined for single-label targets only")
        g = grad_abs.detach().to(torch.float64)
        t = target_matrix.detach().to(torch.float64)
        self._accumulate(g, t, None)

    def attach_hook(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Collect |dL/dz| of ``logits`` by an autograd hook during the coming backward pass.

        Raises :class:`TrainingError` if the hook attached at the previous call never fired (the
        backward pass did not reach these logits), instead of letting statistics stay silently at zero.
        """
        if self._pending_hook:
            raise TrainingError(
                "gradient statistics hook attached at the previous step never fired: the backward pass "
                "did not reach the logits, so statistics would silently stay stale"
            )
        if not logits.requires_grad:
            raise TrainingError("cannot collect gradient statistics: logits do not require grad")
        targets = targets.detach()
        valid = None if valid is None else valid.detach()

        def hook(grad: torch.Tensor) -> None:
            self._pending_hook = False
            self.update_from_softmax_grad(grad.abs(), targets, valid)

        self._pending_hook = True
        logits.register_hook(hook)

    def _check(self, grad_abs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if grad_abs.dim() != 2 or grad_abs.shape[1] != self.num_classes:
            raise InputError(f"grad_abs must be (n, {self.num_classes}), got {tuple(grad_abs.shape)}")
        if targets.dim() != 1 or targets.shape[0] != grad_abs.shape[0]:
            raise InputError(
                f"targets must be ({grad_abs.shape[0]},) to match grad_abs, got {tuple(targets.shape)}"
            )
        return grad_abs, targets.to(device=grad_abs.device, dtype=torch.long)

    def _accumulate(self, g: torch.Tensor, pos_mask: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Per-class sums of this step, one all-reduce, then add (rules 1, 3, 5)."""
        pos_step = (g * pos_mask).sum(dim=0)
        neg_step = (g * (1.0 - pos_mask)).sum(dim=0)
        parts = [pos_step, neg_step]
        if self.track_matrix:
            assert targets is not None
            # M[j, c] += sum_{i: y_i = c} |dL/dz_ij|  ==  G^T @ onehot(y)   (gala.md §1)
            parts.append((g.t() @ pos_mask).reshape(-1))
        flat = torch.cat(parts).to(self.pos.device)
        all_reduce_sum_(flat)
        c = self.num_classes
        self.pos.add_(flat[:c])
        self.neg.add_(flat[c : 2 * c])
        if self.track_matrix:
            self.matrix.add_(flat[2 * c :].view(c, c))
        self.steps.add_(1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, track_matrix={self.track_matrix}"

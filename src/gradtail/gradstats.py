"""Per-class gradient statistics: the one home of P (positive) and N (negative) logit gradients.

Definitions (docs/methods/eql.md §1): for every class j, from step 0 and never reset,

- ``pos[j]`` = P_j = sum over steps and samples whose target for class j is 1 of |dL/dz_ij|
- ``neg[j]`` = N_j = the same over samples whose target for class j is 0
- ``ratio()`` = g_j = P_j / (N_j + 1e-10)

Optionally a C x C matrix ``matrix[j, c]`` = sum over samples of class c of |dL/dz_ij| (GALA,
docs/methods/gala.md §1); then P_j = matrix[j, j] and the negative gradient *produced* by class c is the
column sum minus the diagonal.

Rules kept here, so that every method follows them (docs/methods/eql.md §1):

1. Timing: callers read the statistics, build the step's loss, then call an ``update_*`` method with that
   step's gradient. Nothing here is read after the update within one step.
2. Detachment: every update works on ``detach()``-ed tensors; buffers never carry autograd history.
3. Synchronization: each update SUM-all-reduces the step's per-class sums (one collective, all parts
   concatenated) through :func:`gradtail.distributed.all_reduce_sum_`, which is a no-op without a
   process group. Every rank must call the update every step.
4. Buffers: the sums are registered buffers, so ``state_dict()`` checkpoints them.
5. Precision: sums are float64 whatever the training precision; inputs are cast before summing, with
   autocast disabled. A step whose sums are not finite on any rank (an fp16 overflow caught by the
   gradient scaler) is skipped on every rank: the finiteness flag travels in the same all-reduce, so
   the skip needs no extra collective and no device sync.
6. Scale: callers may pass gradients of a scaled loss; ratios do not change. The ``scale`` argument of
   the updates multiplies the per-class sums (exactly, after summation), so a loss can pass unnormalized
   per-element gradients and its 1/B normalizer separately.
7. Empty steps: a step in which no rank counted a sample (empty or all-ignored batches) adds nothing and
   does not advance ``steps``. Every rank still calls the update (zero sums): the step's sample count
   travels in the same all-reduce, so all ranks agree without an extra collective or a device sync.

Multi-process scale convention (shared with GALA): a rank-local loss is a mean over the rank's batch and
DDP averages parameter gradients over ranks, so the gradient of the objective actually optimized, at a
rank's logits, is the local gradient divided by the world size. Closed-form callers include that factor
in ``scale``; the autograd hook applies it itself. With equal per-rank batches the summed statistics
then equal those of one process running the whole global batch (tested).

Two ways to feed the statistics: closed form (the loss computes |dL/dz| itself and calls
:meth:`GradientStatistics.update_from_softmax_grad` / :meth:`update_from_elementwise_grad`), or an
autograd hook (:meth:`GradientStatistics.attach_hook`). A hook that was attached but never fired is an
error at the next attach (and at :meth:`GradientStatistics.check_hook_fired`), so statistics cannot
silently stay at zero.

Update rules that run several forward/backward passes per optimizer step (SAM's ascent pass, per-group
gradients) wrap the passes that must not count in :func:`frozen_statistics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gradtail.distributed import all_reduce_sum_, world_size
from gradtail.errors import InputError, TrainingError

RATIO_EPS = 1e-10

_frozen_depth = 0  # process-wide (not thread-local): CUDA backward runs hooks on autograd worker threads


@contextmanager
def frozen_statistics() -> Iterator[None]:
    """Inside this context no :class:`GradientStatistics` accepts updates (closed form or hook).

    For update rules whose extra passes must not be accumulated (docs/methods/eql.md §1 rule 1: what is
    accumulated is the gradient of the final training loss), e.g. SAM's first (ascent) pass. It is
    process-wide, so every rank must enter it at the same points (then no rank calls the all-reduce,
    consistently). Hooks attached inside still count as fired if a backward reaches them.
    """
    global _frozen_depth
    _frozen_depth += 1
    try:
        yield
    finally:
        _frozen_depth -= 1


def statistics_frozen() -> bool:
    """True inside :func:`frozen_statistics`; losses skip their closed-form gradient computation then."""
    return _frozen_depth > 0


def flatten_class_dim(x: torch.Tensor) -> torch.Tensor:
    """(N, C, d1, ..., dk) -> (N * d1 * ... * dk, C): every position is one sample (segmentation,
    docs/methods/eql.md §4).

    2-D input is returned unchanged.
    """
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


class GradientStatistics(nn.Module):
    """Accumulators of per-class positive / negative |dL/dz| (float64 buffers, synced, checkpointed).

    Args:
        num_classes: C, the number of classifier channels tracked.
        track_matrix: also keep the C x C matrix M[j, c] (rows: classifier j, columns: sample class c).

    Example:
        Closed form: a loss passes |dL/dz| of its samples and their labels.

        >>> import torch
        >>> from gradtail.gradstats import GradientStatistics
        >>> stats = GradientStatistics(num_classes=3)
        >>> grad = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125]])  # |dL/dz|, labels 0 and 1
        >>> stats.update_from_softmax_grad(grad, torch.tensor([0, 1]))
        >>> stats.pos.tolist(), stats.neg.tolist()
        ([0.5, 0.75, 0.0], [0.125, 0.25, 0.375])
        >>> stats.ratio().round(decimals=3).tolist(), int(stats.steps)
        ([4.0, 3.0, 0.0], 1)
        >>> sorted(stats.state_dict())  # float64 buffers, checkpointed
        ['neg', 'pos', 'steps']

        Autograd hook: the statistics of any loss, filled by the coming backward.

        >>> _ = torch.manual_seed(0)
        >>> hooked = GradientStatistics(num_classes=3)
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> targets = torch.tensor([0, 1, 2, 0])
        >>> hooked.attach_hook(logits, targets)
        >>> torch.nn.functional.cross_entropy(logits, targets).backward()
        >>> int(hooked.steps), hooked.hook_pending
        (1, False)
        >>> torch.isclose(hooked.pos.sum(), hooked.neg.sum()).item()  # softmax CE: sum P == sum N
        True
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
        """g_j = P_j / (N_j + eps) (docs/methods/eql.md §1), float64, shape (C,)."""
        return self.pos / (self.neg + eps)

    def negative_produced(self) -> torch.Tensor:
        """phi_c = sum_{j != c} M[j, c]: negative gradient produced by samples of class c
        (docs/methods/gala.md §1)."""
        if not self.track_matrix:
            raise TrainingError("negative_produced() needs GradientStatistics(track_matrix=True)")
        return self.matrix.sum(dim=0) - torch.diagonal(self.matrix)

    @property
    def is_empty(self) -> bool:
        """True before the first update (every weight derived from the statistics is at its initial value).

        This reads a buffer on the host (a device sync on accelerators); per-step code should use
        ``torch.where(self.steps > 0, ...)`` instead.
        """
        return int(self.steps) == 0

    @property
    def hook_pending(self) -> bool:
        """True while a hook attached by :meth:`attach_hook` has not fired yet."""
        return self._pending_hook

    # ------------------------------------------------------------------ updating
    @torch.no_grad()
    def update_from_softmax_grad(
        self,
        grad_abs: torch.Tensor,
        targets: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        scale: float | torch.Tensor = 1.0,
    ) -> None:
        """Add one step of single-label gradients.

        Args:
            grad_abs: (n, C) |dL/dz| for each sample and class channel.
            targets: (n,) class index per sample; channel ``targets[i]`` is the positive of sample i.
                Entries where ``valid`` is False may hold anything (an ignore index).
            valid: optional (n,) bool mask of samples to count (ignored labels excluded). Masking is
                arithmetic (no boolean indexing), so it never forces a device sync.
            scale: multiplies this step's per-class sums (e.g. 1 / (B * world_size)), a float or a
                0-dim tensor.
        """
        if statistics_frozen():
            return
        grad_abs, targets = self._check(grad_abs, targets)
        g = grad_abs.detach().to(torch.float64)
        if valid is not None:
            keep = valid.detach().to(device=g.device, dtype=torch.bool).view(-1, 1)
            g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
            targets = torch.where(keep.view(-1), targets, torch.zeros_like(targets))
            onehot = torch.zeros_like(g).scatter_(1, targets.view(-1, 1), keep.to(g.dtype))
            count: int | torch.Tensor = keep.sum()
        else:
            onehot = torch.zeros_like(g).scatter_(1, targets.view(-1, 1), 1.0)
            count = g.shape[0]
        self._accumulate(g, onehot, single_label=True, scale=scale, count=count)

    @torch.no_grad()
    def update_from_elementwise_grad(
        self,
        grad_abs: torch.Tensor,
        target_matrix: torch.Tensor,
        *,
        scale: float | torch.Tensor = 1.0,
        count: int | torch.Tensor | None = None,
    ) -> None:
        """Add one step of element-wise (sigmoid, multi-label) gradients.

        Args:
            grad_abs: (n, C) |dL/dz|; rows of samples that do not count must be zero.
            target_matrix: (n, C) in {0, 1}; 1 marks a positive element. A background sample is a row
                of zeros (it only adds negatives).
            scale: multiplies this step's per-class sums (float or 0-dim tensor).
            count: samples counted this step (rule 7); default n, every row. A loss that zeroes ignored
                rows passes the number of the others.
        """
        if statistics_frozen():
            return
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
        t = target_matrix.detach().to(device=g.device, dtype=torch.float64)
        self._accumulate(g, t, single_label=False, scale=scale, count=g.shape[0] if count is None else count)

    def attach_hook(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        loss_scale: Callable[[], float | torch.Tensor] | None = None,
    ) -> None:
        """Collect |dL/dz| of ``logits`` by an autograd hook during the coming backward pass.

        Args:
            logits: (n, C) or (N, C, d1, ...) (every position a sample), requiring grad.
            targets: (n,) or (N, d1, ...) class indices; invalid entries must be masked by ``valid``.
            valid: optional mask shaped like ``targets``.
            loss_scale: for fp16 training with a gradient scaler, a callable returning the current loss
                scale (float or tensor); the hook divides by it (docs/methods/eql.md §1 rule 5: unscale before
                accumulating; overflowed steps are skipped on every rank by the update).

        The hook divides by the world size (see the module docstring). Gradients computed with
        ``create_graph=True`` (``torch.is_grad_enabled()`` inside the hook) are intermediate ones, e.g. a
        regularizer's ``autograd.grad`` at the logits (BGP): they mark the hook as fired but are not
        accumulated, so only the training backward counts.

        Raises :class:`TrainingError` if the hook attached at the previous call never fired (the
        backward pass did not reach these logits), instead of letting statistics stay silently at zero.
        """
        self.check_hook_fired()
        if not logits.requires_grad:
            raise TrainingError("cannot collect gradient statistics: logits do not require grad")
        if logits.dim() < 2 or logits.shape[1] != self.num_classes:
            raise InputError(f"logits must be (n, {self.num_classes}, ...), got {tuple(logits.shape)}")
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(targets.shape) != expected:
            raise InputError(
                f"targets must have shape {expected} to match logits, got {tuple(targets.shape)}"
            )
        flat_targets = targets.detach().reshape(-1)
        flat_valid = None if valid is None else valid.detach().reshape(-1)

        def hook(grad: torch.Tensor) -> None:
            self._pending_hook = False
            if torch.is_grad_enabled():  # create_graph=True: an intermediate gradient, not the step's
                return
            scale: float | torch.Tensor = 1.0 / world_size()
            if loss_scale is not None:
                scale = scale / torch.as_tensor(loss_scale(), dtype=torch.float64, device=grad.device)
            g = flatten_class_dim(grad.detach()).abs()
            self.update_from_softmax_grad(g, flat_targets, flat_valid, scale=scale)

        self._pending_hook = True
        logits.register_hook(hook)

    def check_hook_fired(self) -> None:
        """Raise :class:`TrainingError` if the last hook attached by :meth:`attach_hook` never fired."""
        if self._pending_hook:
            self._pending_hook = False  # report once; the next attach starts clean
            raise TrainingError(
                "gradient statistics hook attached at the previous step never fired: the backward pass "
                "did not reach the logits, so statistics would silently stay stale"
            )

    def _check(self, grad_abs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if grad_abs.dim() != 2 or grad_abs.shape[1] != self.num_classes:
            raise InputError(f"grad_abs must be (n, {self.num_classes}), got {tuple(grad_abs.shape)}")
        if targets.dim() != 1 or targets.shape[0] != grad_abs.shape[0]:
            raise InputError(
                f"targets must be ({grad_abs.shape[0]},) to match grad_abs, got {tuple(targets.shape)}"
            )
        return grad_abs, targets.to(device=grad_abs.device, dtype=torch.long)

    def _accumulate(
        self,
        g: torch.Tensor,
        pos_mask: torch.Tensor,
        single_label: bool,
        scale: float | torch.Tensor,
        count: int | torch.Tensor,
    ) -> None:
        """Per-class sums of this step, one all-reduce, then add (rules 1, 3, 5, 6, 7)."""
        with torch.autocast(device_type=g.device.type, enabled=False):
            pos_step = (g * pos_mask).sum(dim=0)
            neg_step = (g * (1.0 - pos_mask)).sum(dim=0)
            parts = [pos_step, neg_step]
            if self.track_matrix:
                if not single_label:
                    raise TrainingError("the C x C matrix is defined for single-label targets only")
                # M[j, c] += sum_{i: y_i = c} |dL/dz_ij|  ==  G^T @ onehot(y)   (docs/methods/gala.md §1)
                parts.append((g.t() @ pos_mask).reshape(-1))
            self._reduce_and_add(parts, scale, count)

    @torch.no_grad()
    def update_from_class_sums(
        self,
        pos_step: torch.Tensor,
        neg_step: torch.Tensor,
        *,
        scale: float | torch.Tensor = 1.0,
        count: int | torch.Tensor,
    ) -> None:
        """Add one step given its per-class sums of |dL/dz| over positives (``pos_step``) and negatives
        (``neg_step``), (C,) each, computed by the loss in closed form (Softmax-EQL per pixel: sums of
        probabilities instead of an (n, C) gradient matrix). Same scaling, sample count, all-reduce and
        skip rules as :meth:`update_from_softmax_grad`; not with ``track_matrix``."""
        if statistics_frozen():
            return
        if self.track_matrix:
            raise TrainingError("update_from_class_sums cannot fill the C x C matrix (track_matrix)")
        with torch.autocast(device_type=pos_step.device.type, enabled=False):
            self._reduce_and_add([pos_step.to(torch.float64), neg_step.to(torch.float64)], scale, count)

    def _reduce_and_add(
        self, parts: list[torch.Tensor], scale: float | torch.Tensor, count: int | torch.Tensor
    ) -> None:
        """Scale the step's sums, all-reduce them with the sample count and the skip flag, add them."""
        flat = torch.cat(parts).to(self.pos.device)
        if not (isinstance(scale, float | int) and scale == 1):
            flat = flat * torch.as_tensor(scale, dtype=torch.float64, device=flat.device)
        bad = (~torch.isfinite(flat)).any().to(torch.float64).view(1)
        samples = torch.as_tensor(count, dtype=torch.float64, device=flat.device).view(1)
        flat = torch.cat([flat, samples, bad])  # count and skip flag ride in the same collective (5, 7)
        all_reduce_sum_(flat)
        ok = (flat[-1] == 0) & (flat[-2] > 0)
        zero = torch.zeros((), dtype=torch.float64, device=flat.device)
        c = self.num_classes
        self.pos.add_(torch.where(ok, flat[:c], zero))
        self.neg.add_(torch.where(ok, flat[c : 2 * c], zero))
        if self.track_matrix:
            self.matrix.add_(torch.where(ok, flat[2 * c : -2], zero).view(c, c))
        self.steps.add_(ok.to(torch.int64))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, track_matrix={self.track_matrix}"

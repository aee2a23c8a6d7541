"""Per-class gradient statistics: the one home of P (positive) and N (negative) logit gradients.

Definitions (docs/methods/eql.md §1): for every class j, from step 0 and never reset,

- ``pos[j]`` = P_j = sum over steps and samples whose target for class j is 1 of |dL/dz_ij|
- ``neg[j]`` = N_j = the same over samples whose target for class j is 0
- ``ratio()`` = g_j = P_j / (N_j + 1e-10)

Optionally ``produced[c]`` = phi_c = sum over samples i of class c of sum_{j != c} |dL/dz_ij|, the
negative gradient *produced* by the samples of class c (GALA, docs/methods/gala.md §1). GALA reads the
C x C matrix M[j, c] (classifier j, sample class c) only through its diagonal, which is ``pos``
(theta_j = M[j, j] = P_j), and its off-diagonal column sums, which is ``produced`` (phi_c); both are
kept as vectors of C, so no statistics here take more than O(C) memory (issue #29).

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
   gradient scaler) is skipped on every rank: a non-finite sum stays non-finite through the
   all-reduce, which every rank reads, so the skip needs no extra collective and no device sync.
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

Three more rules, for using the statistics in anyone's loop (docs/losses.md, "Drop-in"):

8. Global normalisation: a loss whose gradient carries a normaliser (1/B of a mean, 1/#pos of EFL) passes
   its per-sample gradients *without* it and the normaliser's count as ``norm``; the count travels in
   the same all-reduce and the summed sums are divided by max(summed count, 1). W processes with any
   split of a batch (20 + 12 samples as well as 16 + 16) thus add exactly what one process with the
   whole batch adds.
9. Accumulation: inside :meth:`GradientStatistics.accumulate` (what ``LongTailLoss.accumulate`` enters)
   updates are kept aside; at its exit their sums are added at once, as one step, with one all-reduce,
   normalised by the total given (the normaliser of the union of the micro-batches). Until then every
   reader sees the statistics from before the context.
10. Precision and compile: the statistics keep float64 through ``module.to(dtype)``, ``.half()``,
   ``.bfloat16()`` (a device move still applies; :func:`keep_buffer_dtypes`), and a loss reads them
   through :func:`read_statistics`, which under ``torch.compile`` is an opaque copy: inductor's
   partitioner may otherwise recompute a read of a buffer in the backward, after the same graph updated
   it in place (wrong gradients, pytorch/pytorch#197039).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


@torch.library.custom_op("gradtail::snapshot", mutates_args=())
def _snapshot(statistics: torch.Tensor) -> torch.Tensor:
    """A copy of a statistics buffer, opaque to the compiler (custom ops are never recomputed)."""
    return statistics.clone()


@_snapshot.register_fake
def _snapshot_fake(statistics: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(statistics)


def read_statistics(buffer: torch.Tensor) -> torch.Tensor:
    """The value of a statistics buffer as this step's loss reads it (rule 10 of this module).

    Eager: the buffer itself (no copy). Under ``torch.compile``: a copy made by an opaque custom op.
    Inductor's min-cut partitioner may recompute, in the backward graph, a value the forward read from
    a buffer; when the same graph then updates that buffer in place (every stateful loss does), the
    backward reads the *updated* statistics and the gradients are silently wrong (pytorch/pytorch#197039:
    up to 60 where 0.03 is right for Softmax-EQL). A custom op is never recomputed (the partitioner bans
    non-builtin ops), so the backward uses the saved pre-update copy. Every read of a statistics buffer
    that feeds a loss value goes through this function.
    """
    if torch.compiler.is_compiling():
        return _snapshot(buffer)
    return buffer


def keep_buffer_dtypes(
    module: nn.Module, apply: Callable[[], nn.Module], names: tuple[str, ...] | None = None
) -> nn.Module:
    """Run ``apply`` (a module's ``_apply``) and give the buffers ``names`` (default: every buffer of
    ``module`` itself, not of its children) their previous dtype back (rule 10).

    ``module.to(torch.bfloat16)``, ``.half()``, ``.double()`` convert every floating buffer (and
    ``module.type(dtype)`` every buffer, integer step counters included); statistics
    summed over thousands of steps in bfloat16 lose most of their value (64-68% after 2,000 steps). The
    conversion is undone from the *original* tensor, so no precision is lost, and a device move that came
    with it is kept (as torchmetrics keeps its metric states).
    """
    if names is None:
        names = tuple(k for k, b in module._buffers.items() if b is not None)
    before = {k: module._buffers[k] for k in names if module._buffers.get(k) is not None}
    out = apply()
    for k, old in before.items():
        new = module._buffers[k]
        if new is not None and new.dtype != old.dtype:
            module._buffers[k] = old.to(device=new.device)
    return out


@dataclass
class _Deferred:
    """Updates kept aside inside :meth:`GradientStatistics.accumulate` (rule 9)."""

    total: torch.Tensor | None  # the normaliser of the union (float64, 0-dim), None: sums not normalised
    summed: torch.Tensor | None = None  # the updates' [sums..., samples], added as they come
    normalized: bool | None = None  # whether the updates carried a normaliser (all or none)


_SUM_CHUNK = 1 << 19  # elements converted to float64 at a time by class_sums (4 MiB)


def _float64_blocks(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``x`` (CPU, not float64) as float64 blocks of whole samples, (first sample, block): one block when
    it is small, else blocks of about ``_SUM_CHUNK`` elements, each converted when the caller asks for it
    (so that it is summed while in cache, and one block is alive at a time)."""
    per_sample = max(x[:1].numel(), 1)
    rows = max(1, _SUM_CHUNK // per_sample)
    for start in range(0, max(x.shape[0], 1), rows):
        yield start, x[start : start + rows].double()


def _exact_sums_here(x: torch.Tensor) -> bool:
    """Whether a plain ``sum(dtype=torch.float64)`` is the fast way (float64 input, accelerators,
    compiled code); on CPU it converts element by element, 3-5x slower than blocks (issue #29)."""
    return x.dtype == torch.float64 or x.device.type != "cpu" or torch.compiler.is_compiling()


def class_sums(x: torch.Tensor) -> torch.Tensor:
    """The per-class sums of one step: ``x`` (N, C) or (N, C, d1, ...) summed over every dimension but
    the class dimension 1, in float64 (rule 5), shape (C,).

    On CPU a float32 input is converted in blocks of samples of about 4 MiB of float64, each summed
    while it is in cache: ``x.sum(0, dtype=torch.float64)`` converts element by element and
    ``x.double().sum(0)`` writes the whole float64 copy first, both slower at 256 x 8,142 and
    4,096 x 1,204 (issue #29). Elsewhere (accelerators, compiled code, float64 input) the plain sum.
    Every block adds the float64 values of the same float32 entries, so the result is the float64 sum.
    """
    dims = [0, *range(2, x.dim())]
    if _exact_sums_here(x):
        return x.sum(dim=dims, dtype=torch.float64)
    out: torch.Tensor | None = None
    for _, block in _float64_blocks(x):
        part = block.sum(dim=dims)
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def class_and_sample_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class sums (C,), per-sample sums (N,)) of a 2-D ``x`` (N, C), both in float64 (rule 5), from
    one conversion of each block (:func:`class_sums`). GALA's phi needs both from the same entries."""
    if x.dim() != 2:
        raise InputError(f"class_and_sample_sums expects (N, C), got shape {tuple(x.shape)}")
    if _exact_sums_here(x):
        return x.sum(dim=0, dtype=torch.float64), x.sum(dim=1, dtype=torch.float64)
    per_class: torch.Tensor | None = None
    per_sample = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for start, block in _float64_blocks(x):
        part = block.sum(dim=0)
        per_class = part if per_class is None else per_class.add_(part)
        torch.sum(block, dim=1, out=per_sample[start : start + block.shape[0]])
    assert per_class is not None
    return per_class, per_sample


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
        track_produced: also keep ``produced`` (phi_c, the negative gradient produced by the samples of
            class c: the off-diagonal column sums of GALA's matrix, docs/methods/gala.md §1), a vector of
            C like ``pos`` and ``neg``. Single-label updates only.

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
    produced: torch.Tensor
    steps: torch.Tensor

    def __init__(self, num_classes: int, track_produced: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.track_produced = bool(track_produced)
        self.register_buffer("pos", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg", torch.zeros(num_classes, dtype=torch.float64))
        if self.track_produced:
            self.register_buffer("produced", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._pending_hook = False
        self._deferred: _Deferred | None = None

    @property
    def num_parts(self) -> int:
        """Vectors of C per update: P and N, and phi with ``track_produced``."""
        return 3 if self.track_produced else 2

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Module conversions: devices apply, dtypes do not (the sums stay float64, rule 10)."""
        return keep_buffer_dtypes(self, lambda: super(GradientStatistics, self)._apply(fn, recurse))

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Checkpoints written before issue #29 hold GALA's C x C ``matrix``: its off-diagonal column
        sums are ``produced`` (phi_c = sum_{j != c} M[j, c], docs/methods/gala.md §1), its diagonal is
        ``pos`` already; the matrix itself is not kept."""
        matrix = state_dict.pop(prefix + "matrix", None)
        if matrix is not None and self.track_produced and prefix + "produced" not in state_dict:
            m = matrix.to(torch.float64)
            state_dict[prefix + "produced"] = m.sum(dim=0) - torch.diagonal(m)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ reading
    def ratio(self, eps: float = RATIO_EPS) -> torch.Tensor:
        """g_j = P_j / (N_j + eps) (docs/methods/eql.md §1), float64, shape (C,)."""
        return read_statistics(self.pos) / (read_statistics(self.neg) + eps)

    def negative_produced(self) -> torch.Tensor:
        """phi_c = sum_{j != c} M[j, c]: negative gradient produced by samples of class c
        (docs/methods/gala.md §1), float64 (C,)."""
        if not self.track_produced:
            raise TrainingError("negative_produced() needs GradientStatistics(track_produced=True)")
        return read_statistics(self.produced)

    def started(self) -> torch.Tensor:
        """0-dim bool tensor: at least one step accumulated (no device sync; ``steps > 0``)."""
        return read_statistics(self.steps) > 0

    @property
    def accumulating(self) -> bool:
        """True inside :meth:`accumulate` (updates are kept aside until its exit)."""
        return self._deferred is not None

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
        norm: int | torch.Tensor | None = None,
    ) -> None:
        """Add one step of single-label gradients.

        Args:
            grad_abs: (n, C) |dL/dz| for each sample and class channel.
            targets: (n,) class index per sample; channel ``targets[i]`` is the positive of sample i.
                Entries where ``valid`` is False may hold anything (an ignore index).
            valid: optional (n,) bool mask of samples to count (ignored labels excluded). Masking is
                arithmetic (no boolean indexing), so it never forces a device sync.
            scale: multiplies this step's per-class sums (e.g. 1 / world_size), a float or a 0-dim
                tensor.
            norm: the count of the loss's normaliser in this batch (e.g. B for a mean over samples):
                the sums are divided by max(count summed over ranks, 1) (rule 8); ``None``: not
                normalised.
        """
        if statistics_frozen():
            return
        grad_abs, targets = self._check(grad_abs, targets)
        with torch.autocast(device_type=grad_abs.device.type, enabled=False):
            g = grad_abs.detach().to(torch.float64, copy=True)  # a float64 copy this update owns
            rows = torch.arange(g.shape[0], device=g.device)
            count: int | torch.Tensor = g.shape[0]
            if valid is not None:
                keep = valid.detach().to(device=g.device, dtype=torch.bool)
                g = torch.where(keep.view(-1, 1), g, torch.zeros((), dtype=g.dtype, device=g.device))
                targets = torch.where(keep, targets, torch.zeros_like(targets))
                count = keep.sum()
            # P_c: the label column of each sample; N_c and phi: the other columns (the label entries are
            # zeroed in the copy, so the sums add exactly the same terms as a one-hot mask would)
            on_label = g[rows, targets]
            g[rows, targets] = 0.0
            zeros = torch.zeros(self.num_classes, dtype=torch.float64, device=g.device)
            parts = [zeros.index_add(0, targets, on_label), g.sum(dim=0)]
            if self.track_produced:  # phi_c += sum_{i: y_i = c} sum_{j != c} |dL/dz_ij|
                parts.append(zeros.index_add(0, targets, g.sum(dim=1)))
            self._reduce_and_add(parts, scale, count, norm)

    @torch.no_grad()
    def update_from_elementwise_grad(
        self,
        grad_abs: torch.Tensor,
        target_matrix: torch.Tensor,
        *,
        scale: float | torch.Tensor = 1.0,
        count: int | torch.Tensor | None = None,
        norm: int | torch.Tensor | None = None,
    ) -> None:
        """Add one step of element-wise (sigmoid, multi-label) gradients.

        Args:
            grad_abs: (n, C) |dL/dz|; rows of samples that do not count must be zero.
            target_matrix: (n, C) in {0, 1}; 1 marks a positive element. A background sample is a row
                of zeros (it only adds negatives).
            scale: multiplies this step's per-class sums (float or 0-dim tensor).
            count: samples counted this step (rule 7); default n, every row. A loss that zeroes ignored
                rows passes the number of the others.
            norm: the count of the loss's normaliser (rule 8, as in :meth:`update_from_softmax_grad`).
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
        if self.track_produced:
            raise TrainingError("phi (track_produced) is defined for single-label targets only")
        with torch.autocast(device_type=grad_abs.device.type, enabled=False):
            g = grad_abs.detach().to(torch.float64)
            t = target_matrix.detach().to(device=g.device, dtype=torch.float64)
            count = g.shape[0] if count is None else count
            self._reduce_and_add([(g * t).sum(dim=0), (g * (1.0 - t)).sum(dim=0)], scale, count, norm)

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

    @torch.no_grad()
    def update_from_class_sums(
        self,
        pos_step: torch.Tensor,
        neg_step: torch.Tensor,
        *,
        produced: torch.Tensor | None = None,
        scale: float | torch.Tensor = 1.0,
        count: int | torch.Tensor,
        norm: int | torch.Tensor | None = None,
    ) -> None:
        """Add one step given its per-class sums of |dL/dz| over positives (``pos_step``) and negatives
        (``neg_step``), (C,) each, computed by the loss in closed form (sums of probabilities instead of
        an (n, C) gradient matrix); with ``track_produced`` also ``produced``, phi's per-class sums
        (docs/methods/gala.md §1). Same scaling, sample count, normaliser, all-reduce and skip rules as
        :meth:`update_from_softmax_grad`."""
        if statistics_frozen():
            return
        if (produced is not None) != self.track_produced:
            raise TrainingError(
                "update_from_class_sums: produced= is given exactly when the statistics track phi "
                f"(track_produced={self.track_produced})"
            )
        parts = [pos_step, neg_step] if produced is None else [pos_step, neg_step, produced]
        self._reduce_and_add(parts, scale, count, norm)  # float64 on the buffers' device (cat)

    def _reduce_and_add(
        self,
        parts: list[torch.Tensor],
        scale: float | torch.Tensor,
        count: int | torch.Tensor,
        norm: int | torch.Tensor | None = None,
    ) -> None:
        """Scale the step's sums; inside :meth:`accumulate` keep them aside (rule 9), otherwise
        all-reduce them with the sample count and the normaliser count and add them. One vector
        [sums, samples, (normaliser count)] is built once (a step costs few small operations: issue #29)."""
        device = self.pos.device
        counts = [count] if norm is None else [count, norm]
        if all(type(v) in (int, float) for v in counts):
            tail = torch.tensor(counts, dtype=torch.float64, device=device)
        else:
            tail = torch.stack(
                [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in counts]
            )
        f64 = torch.float64  # cat, sum, where, add: no autocast op; float64 whatever the parts are
        parts = [p if p.dtype == f64 and p.device == device else p.to(device, f64) for p in parts]
        vec = torch.cat([*parts, tail])
        k = vec.numel() - tail.numel()
        if not (isinstance(scale, float | int) and scale == 1):
            vec[:k] *= torch.as_tensor(scale, dtype=torch.float64, device=device)
        deferred = self._deferred
        if deferred is not None:
            if deferred.normalized is not None and deferred.normalized != (norm is not None):
                raise InputError(
                    "inside accumulate(), every update must carry a normaliser or none does (a loss "
                    "called with and without normalizer= in one accumulated step)"
                )
            deferred.normalized = norm is not None
            part = vec[: k + 1]  # sums and samples; the union's normaliser is given at the end
            deferred.summed = part if deferred.summed is None else deferred.summed + part
            return
        self._commit(vec, k, norm is not None)

    def _commit(self, vec: torch.Tensor, k: int, normalized: bool) -> None:
        """One all-reduce of ``vec`` = [sums (k), samples, (normaliser count)], then add (rules 3, 5, 7, 8).

        Rule 5 needs no flag of its own: a sum that is not finite on some rank is not finite in the
        all-reduced vector, which every rank holds, so every rank skips the step (a finite sum of finite
        sums is finite unless it overflows float64, which would poison the statistics as well).
        """
        all_reduce_sum_(vec)
        sums = vec[:k]
        ok = torch.isfinite(sums.sum()).logical_and_(vec[k] > 0)
        if normalized:  # rule 8: the union's normaliser, at least 1
            sums = sums / vec[k + 1].clamp(min=1.0)
        sums = torch.where(ok, sums, 0.0)
        buffers = [self.pos, self.neg] + ([self.produced] if self.track_produced else [])
        torch._foreach_add_(buffers, list(sums.split(self.num_classes)))
        self.steps.add_(ok)  # int64 += bool

    # ------------------------------------------------------------------ accumulation (rule 9)
    def begin_accumulation(self, total: int | float | torch.Tensor | None = None) -> None:
        """Keep updates aside until :meth:`end_accumulation`; ``total``: the normaliser count of the
        union on this process (for updates that carry ``norm``). Prefer :meth:`accumulate`."""
        if self._deferred is not None:
            raise TrainingError("GradientStatistics.accumulate() is already active (contexts do not nest)")
        t = None if total is None else torch.as_tensor(total, dtype=torch.float64, device=self.pos.device)
        self._deferred = _Deferred(total=t)

    def end_accumulation(self, commit: bool = True) -> None:
        """Add the updates kept aside as one step (one all-reduce; ``commit=False`` drops them).

        Every rank must commit at the same point (a collective); a context with no update on this rank
        still runs it (zero sums), as an empty batch does (rule 7).
        """
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            raise TrainingError("end_accumulation() without begin_accumulation()")
        if not commit or statistics_frozen():
            return
        size = self.num_parts * self.num_classes
        summed = deferred.summed
        if summed is None:
            summed = torch.zeros(size + 1, dtype=torch.float64, device=self.pos.device)
        if deferred.normalized:
            if deferred.total is None:
                raise TrainingError("accumulated updates carry a normaliser: accumulate(total) needs total")
            summed = torch.cat([summed, deferred.total.to(summed.device).reshape(1)])
        self._commit(summed, size, bool(deferred.normalized))

    @contextmanager
    def accumulate(self, total: int | float | torch.Tensor | None = None) -> Iterator[None]:
        """Inside: updates are kept aside and readers see the statistics from before; at the exit they
        are added as one step with one all-reduce (rule 9); an exception inside drops them.

        ``total``: the normaliser count of the union of the updates on this process (needed when they
        carry ``norm``, e.g. the samples of the k micro-batches of a mean loss); the added sums are
        divided by max(total summed over ranks, 1). Updates without ``norm`` (the autograd hook, whose
        gradients already carry the loss's normalisation) are summed as they are.

        Example:
            >>> import torch
            >>> stats = GradientStatistics(num_classes=2)
            >>> with stats.accumulate(total=4):  # two micro-batches of 2 samples, normalised by 4
            ...     stats.update_from_softmax_grad(torch.ones(2, 2), torch.tensor([0, 1]), norm=2)
            ...     stats.update_from_softmax_grad(torch.ones(2, 2), torch.tensor([0, 0]), norm=2)
            ...     int(stats.steps)  # nothing added yet
            0
            >>> stats.pos.tolist(), stats.neg.tolist(), int(stats.steps)
            ([0.75, 0.25], [0.25, 0.75], 1)
        """
        self.begin_accumulation(total)
        try:
            yield
        except BaseException:
            self.end_accumulation(commit=False)
            raise
        self.end_accumulation()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, track_produced={self.track_produced}"

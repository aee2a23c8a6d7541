"""Softmax cross-entropy at adjusted logits with its closed-form gradient (issue #29, docs/losses.md "Cost").

Softmax-EQL, GALA, seesaw, LDAM, balanced softmax and logit adjustment are all cross-entropy at
*adjusted* logits t = s z + b, where s is a fixed scale (LDAM's, 1 elsewhere) and b a constant of the
step (detached statistics, priors, margins, factors of the detached softmax): docs/methods/eql.md §4,
docs/methods/gala.md §2, docs/methods/baselines.md. Their gradient is therefore the cross-entropy
gradient at t times s,

    dL/dz = s dL/dt = s (softmax(t) - onehot(y)) g            (g: the incoming per-sample gradient)

and the statistics of Softmax-EQL and GALA are sums of its absolute values. What autograd would record
instead (a graph through b, a one-hot or margin matrix, the adjusted logits and the log-probabilities
kept alive until the backward) costs several passes over the (N, C) logits more than the stock loss;
here the loss, at the same t, costs what ``F.cross_entropy`` costs plus the passes that build t:

- t is built from ``z.detach()`` (no graph), and the log-softmax is written over it
  (:func:`log_softmax_`);
- the gradient is produced by the kernels of cross-entropy's own backward (``nll_loss``'s scatter of
  -g at the labels into zeros, then ``torch._log_softmax_backward_data``), so values and gradients are
  bit for bit those of ``F.cross_entropy`` at the same t (and, for LDAM, of autograd's ``* s``);
- the mean losses that keep statistics (Softmax-EQL, GALA: :func:`cross_entropy_step`,
  :class:`SoftmaxCrossEntropy`) compute that gradient in the forward, where the statistics read it
  (label entries and float64 sums of the rest, no one-hot matrix, no C x C matrix), and the backward
  only scales it by the incoming gradient, in place (not at all when that is exactly 1); the
  per-sample losses (:class:`PerSampleCrossEntropy`) keep the log-probabilities and compute it in the
  backward, with the incoming gradient folded into the scatter, as ``F.cross_entropy`` does.

On CPU the work is done in blocks of whole samples of about 2 MiB (:func:`row_blocks`): each block's t,
log-probabilities, gradient and float64 sums are computed while it is in cache, so the (N, C) arrays
cross the memory bus about as often as for the stock loss (at 256 x 8,142 one pass over an (N, C)
array costs about as much as a kernel on cached data).

No host synchronisation. Under ``create_graph`` (double backward: BGP differentiates the loss's logit
gradient, docs/methods/bgp.md §2) the backward recomputes the same gradient with differentiable
operations. The in-place and blocked paths are for eager CPU runs; under ``torch.compile`` and on
accelerators the same operations run on whole tensors, out of place (inductor fuses them itself).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from gradtail.gradstats import class_and_sample_sums, class_sums

_BLOCK = 1 << 19  # elements of logits per block of samples on CPU (2 MiB of float32, :func:`row_blocks`)


_VARIANT = 0


def _in_place() -> bool:
    return not torch.compiler.is_compiling()


def _blocked(z: torch.Tensor) -> bool:
    """Whether the blocked in-place path runs: eager, CPU, a non-empty input."""
    return z.device.type == "cpu" and _in_place() and z.numel() > 0 and _BLOCK > 0


def row_blocks(z: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of consecutive blocks of whole samples (dim 0) of about ``_BLOCK`` elements each,
    covering ``z``: the unit of work of the blocked CPU path (module docstring)."""
    n = z.shape[0]
    rows = max(1, _BLOCK // max(z[:1].numel(), 1))
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def _reuse(t: torch.Tensor) -> bool:
    """Whether ``t`` (a temporary the caller owns) may be overwritten by a kernel that reads it element
    by element before writing (checked on CPU, where the benchmarks of issue #29 run)."""
    return t.device.type == "cpu" and not t.requires_grad and _in_place()


def log_softmax_(t: torch.Tensor) -> torch.Tensor:
    """log_softmax(t) along dim 1, written over ``t`` (a fresh temporary of the caller) where that is
    safe (:func:`_reuse`), a new tensor elsewhere; the same kernel, the same values, either way."""
    if _reuse(t):
        return torch._log_softmax(t, 1, False, out=t)
    return F.log_softmax(t, dim=1)


def cross_entropy_gradient(log_p: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(softmax(t) - onehot(y)) * (-step) from ``log_p`` = log_softmax(t), as cross-entropy's backward
    computes it: ``step`` (broadcastable to y's shape with a class dimension: (N, 1, ...)) is scattered
    at the labels into zeros (``nll_loss``'s backward puts -g there) and
    ``torch._log_softmax_backward_data`` turns that into the gradient. A new tensor (on CPU eager the
    scatter's own buffer is overwritten by the kernel, which reads each entry before writing it)."""
    idx = y.unsqueeze(1)
    seed = torch.zeros_like(log_p).scatter_(1, idx, step.to(log_p.dtype).expand(idx.shape))
    if _reuse(seed):
        return torch._log_softmax_backward_data(seed, log_p, 1, log_p.dtype, out=seed)
    return torch._log_softmax_backward_data(seed, log_p, 1, log_p.dtype)


def adjusted_logits(
    z: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, target_offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """t = z + b: ``offsets`` (C,) added along dim 1; with ``target_offsets`` (N,) the label's logit is
    z_y + target_offsets instead. A new tensor, differentiable in z when grad is enabled."""
    shape = [1, z.shape[1]] + [1] * (z.dim() - 2)
    t = z + offsets.to(z.dtype).view(shape)
    if target_offsets is not None and target_offsets.numel():
        idx = y.unsqueeze(1)
        at_label = z.gather(1, idx) + target_offsets.to(z.dtype).unsqueeze(1)
        if torch.is_grad_enabled() and t.requires_grad:
            return t.scatter(1, idx, at_label)
        t.scatter_(1, idx, at_label)
    return t


def _onehot(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """onehot(y) along dim 1 in the shape of ``like`` (only the double backward builds it)."""
    return torch.zeros_like(like).scatter_(1, y.unsqueeze(1), 1.0)


# ---------------------------------------------------------------------------------------------- mean


@torch.no_grad()
def softmax_cross_entropy(
    t: torch.Tensor,
    y: torch.Tensor,
    divisor: torch.Tensor,
    with_grad: bool,
    ignore_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(sum of CE(t_i, y_i) over the counted samples, dL/dz or None, labels, mask) at adjusted logits
    ``t`` (N, C, ...), for the loss sum / ``divisor``. ``t`` is consumed (it may hold log_softmax(t)
    afterwards: :func:`log_softmax_`).

    The sum is ``F.nll_loss(log_softmax(t), y, reduction="sum")`` and the gradient is cross-entropy's
    backward at -1/divisor on each counted label (:func:`cross_entropy_gradient`), so both equal what
    ``F.cross_entropy(t, y, reduction="sum") / divisor`` and its autograd give, bit for bit. Samples
    labelled ``ignore_index`` are out of both (zero rows of the gradient); the labels returned hold
    class 0 there and the mask (``None`` without ``ignore_index``) is False there.
    """
    log_p = log_softmax_(t)
    ignore = -100 if ignore_index is None else ignore_index  # -100 never matches a checked label
    total = F.nll_loss(log_p, y, ignore_index=ignore, reduction="sum")
    valid = None if ignore_index is None else y != ignore_index
    y_safe = y if valid is None else torch.where(valid, y, torch.zeros_like(y))
    if not with_grad:
        return total, None, y_safe, valid
    step = (-1.0 / divisor).to(t.dtype)  # what nll_loss's backward puts at the label: -grad_out / d
    if valid is not None:
        step = torch.where(valid, step, torch.zeros((), dtype=t.dtype, device=t.device))
        step = step.unsqueeze(1)
    return total, cross_entropy_gradient(log_p, y_safe, step), y_safe, valid


@torch.no_grad()
def gradient_class_sums(
    grad: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    scale: torch.Tensor,
    *,
    label_from_rest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, other), float64 (C,) each, from a softmax cross-entropy gradient ``grad`` (N, C, ...)
    with labels ``y`` (N, ...), both times ``scale``:

    - label[c] = sum over the samples i of class c of |grad_iy|;
    - other[j] = sum over the samples i with y_i != j of grad_ij (>= 0 there: softmax times a positive
      factor).

    These are P and N of docs/methods/eql.md §1 (GALA: theta, phi and N of docs/methods/gala.md §1)
    without a one-hot or C x C matrix: the label entries are gathered, zeroed for the float64 column sums
    (:func:`gradtail.gradstats.class_sums`) and written back, so ``grad`` is unchanged on return (it
    serves the backward). With ``label_from_rest`` (2-D ``grad``) |grad_iy| is read as the sum of the
    sample's other entries, sum_{j != y} p_j = 1 - p_y times the same factor (docs/methods/gala.md §1):
    equal for softmax cross-entropy, and accurate to the precision of the entries when p_y is close to 1,
    where the label entry itself, a difference close to 0, has lost it in float32.
    """
    idx = y.unsqueeze(1)
    at_label = grad.gather(1, idx)
    grad.scatter_(1, idx, 0.0)
    if label_from_rest:
        other, per_sample = class_and_sample_sums(grad)
    else:
        other, per_sample = class_sums(grad), at_label.reshape(-1).abs().to(torch.float64)
    grad.scatter_(1, idx, at_label)
    label = torch.zeros(num_classes, dtype=torch.float64, device=grad.device)
    label = label.index_add(0, y.reshape(-1), per_sample)
    scale = scale.to(device=grad.device, dtype=torch.float64)
    return label * scale, other * scale


class CrossEntropyStep(NamedTuple):
    """What :func:`cross_entropy_step` returns (float64 sums, or ``None`` where not asked for)."""

    total: torch.Tensor  # sum of CE(t_i, y_i) over the counted samples, 0-dim, z's dtype
    grad: torch.Tensor | None  # dL/dz = (softmax(t) - onehot(y)) / divisor, zero rows where not counted
    label: torch.Tensor | None  # (C,): per class c, sum over its samples of |grad_iy|, times divisor
    other: torch.Tensor | None  # (C,): per class j, sum over samples i with y_i != j of grad_ij, x divisor


def _label_step(divisor: torch.Tensor, valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """-1/divisor, what ``nll_loss``'s backward puts at each counted label (0-dim), or per sample with
    0 where ``valid`` is False, shaped (N, 1, ...)."""
    step = -1.0 / divisor
    step = step if step.dtype == dtype else step.to(dtype)
    if valid is None:
        return step
    return torch.where(valid, step, torch.zeros((), dtype=dtype, device=step.device)).unsqueeze(1)


@torch.no_grad()
def cross_entropy_step(
    z: torch.Tensor,
    y: torch.Tensor,
    offsets: torch.Tensor,
    divisor: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    target_offsets: torch.Tensor | None = None,
    with_grad: bool = True,
    sums: Literal["label", "rest"] | None = None,
) -> CrossEntropyStep:
    """One step of a mean cross-entropy loss at t = z + b that keeps statistics: its summed value, its
    gradient and the statistics' per-class sums, all from ``z.detach()`` (module docstring).

    Args:
        z: logits (N, C, ...), detached, in the work precision.
        y: labels (N, ...), with any class in place of the samples that do not count.
        offsets: b as a per-class row (C,).
        divisor: the loss's normaliser (0-dim): L = sum / divisor.
        valid: which samples count (y's shape, bool); ``None``: all.
        target_offsets: (N,) or ``None``: the label's adjusted logit is z_y + target_offsets instead of
            z_y + offsets_y (:func:`adjusted_logits`, GALA's ``paper`` variant).
        with_grad: return dL/dz.
        sums: ``None``, or the per-class sums of the statistics (:class:`CrossEntropyStep`), unnormalised
            (times ``divisor``): ``"label"`` reads |grad_iy| from the label entry, ``"rest"`` (2-D ``z``)
            as the sum of the sample's other entries, sum_{j != y} p_j = 1 - p_y times the same factor,
            which keeps its precision when p_y is close to 1 (the label entry, a difference close to 0,
            has lost it in float32). The other entries are summed in float64 with the label entries
            zeroed, so no entry of another sample's label enters a class's sum.

    The value is ``F.nll_loss`` of the log-probabilities at the labels and the gradient cross-entropy's
    backward at -1/divisor on each counted label: bit for bit ``F.cross_entropy(t, y, reduction="sum")``
    and its autograd gradient divided by the divisor. On eager CPU in blocks of samples (each block's
    t, log-probabilities, gradient and float64 sums while it is in cache), elsewhere on whole tensors;
    the values are the same.
    """
    need_grad = with_grad or sums is not None
    idx = y.unsqueeze(1)
    step = _label_step(divisor, valid, z.dtype)
    if not _blocked(z):
        log_p = log_softmax_(adjusted_logits(z, y, offsets, target_offsets))
        target = y if valid is None else torch.where(valid, y, -100)  # -100: nll_loss's ignore_index
        total = F.nll_loss(log_p, target, reduction="sum")
        if not need_grad:
            return CrossEntropyStep(total, None, None, None)
        grad = cross_entropy_gradient(log_p, y, step)
        if sums is None:
            return CrossEntropyStep(total, grad, None, None)
        label, other = gradient_class_sums(grad, y, z.shape[1], divisor, label_from_rest=sums == "rest")
        return CrossEntropyStep(total, grad, label, other)
    n, c = z.shape[0], z.shape[1]
    row = (offsets if offsets.dtype == z.dtype else offsets.to(z.dtype)).view([1, c] + [1] * (z.dim() - 2))
    at_label = None
    if target_offsets is not None:
        at_label = z.gather(1, idx).add_(target_offsets.to(z.dtype).unsqueeze(1))
    rows = row_blocks(z)[0][1]
    count = -(-n // rows)  # blocks; every one but the last holds ``rows`` samples

    def blocks(x: torch.Tensor | None) -> list:
        return [None] * count if x is None else [x] if count == 1 else list(torch.split(x, rows))

    block = torch.empty((min(rows, n), *z.shape[1:]), dtype=z.dtype, device=z.device)
    log_p_y = torch.empty(idx.shape, dtype=z.dtype, device=z.device)
    grad = torch.empty(z.shape, dtype=z.dtype, device=z.device) if need_grad else None
    steps = blocks(step.expand(idx.shape) if step.dim() == 0 else step)
    wide = parts = per_sample = label_entries = None
    if sums is not None:
        dims = [0, *range(2, z.dim())]
        wide = torch.empty(block.shape, dtype=torch.float64, device=z.device)  # a block in float64
        parts = torch.empty(count, c, dtype=torch.float64, device=z.device)
        if sums == "rest":
            per_sample = torch.empty(n, dtype=torch.float64, device=z.device)
        else:
            label_entries = torch.empty(idx.shape, dtype=z.dtype, device=z.device)
    for zb, ib, lb, sb, gb, ab, pb, eb, kb in zip(
        blocks(z), blocks(idx), blocks(log_p_y), steps, blocks(grad), blocks(at_label), blocks(per_sample),
        blocks(label_entries), [None] * count if parts is None else list(parts.unbind(0)), strict=True,
    ):  # fmt: skip
        t = block if zb.shape[0] == block.shape[0] else block[: zb.shape[0]]
        torch.add(zb, row, out=t)
        if ab is not None:
            t.scatter_(1, ib, ab)
        torch._log_softmax(t, 1, False, out=t)
        torch.gather(t, 1, ib, out=lb)
        if gb is None:
            continue
        gb.zero_().scatter_(1, ib, sb)
        torch._log_softmax_backward_data(gb, t, 1, z.dtype, out=gb)
        if wide is None:
            continue
        g64 = (wide if zb.shape[0] == wide.shape[0] else wide[: zb.shape[0]]).copy_(gb)
        if eb is not None:
            torch.gather(gb, 1, ib, out=eb)
        g64.scatter_(1, ib, 0.0)  # the other entries only (in the copy: ``grad`` keeps its labels)
        torch.sum(g64, dims, out=kb)
        if pb is not None:
            torch.sum(g64, 1, out=pb)
    # the same cascade over the same values as nll_loss over (N, C): column 0 holds each label's entry
    first = torch.zeros_like(y) if valid is None else torch.where(valid, 0, -100)
    total = F.nll_loss(log_p_y, first, reduction="sum")
    if parts is None:
        return CrossEntropyStep(total, grad, None, None)
    scale = divisor.to(torch.float64)
    if per_sample is None:
        per_sample = label_entries.reshape(-1).abs().to(torch.float64)  # type: ignore[union-attr]
    label = torch.zeros(c, dtype=torch.float64, device=z.device).index_add_(0, y.reshape(-1), per_sample)
    return CrossEntropyStep(total, grad, label * scale, parts.sum(0) * scale)


class SoftmaxCrossEntropy(torch.autograd.Function):
    """``total / divisor`` with the gradient ``grad`` = dL/dz computed in the forward (module docstring).

    Inputs: z (N, C, ...) the logits (work precision), ``total`` the summed cross-entropy at t (0-dim),
    ``grad`` (softmax(t) - onehot(y)) / divisor (z's shape; zero rows for ignored samples), ``y`` the
    labels with ignored entries replaced by any class, ``valid`` (y's shape, bool; ``None``: every
    sample counts), ``divisor`` (0-dim), ``offsets`` the constant b as a per-class row (C,) and
    ``target_offsets`` (N,) or ``None``: the adjusted logit of the label is z_y + target_offsets instead
    of z_y + offsets_y (GALA's ``paper`` variant). The last five also let the backward recompute
    ``grad``.

    The first plain backward (eager) scales ``grad`` by the incoming gradient in place and hands it
    over as dL/dz (``z.grad`` takes it without a copy); a later backward of the same graph
    (``retain_graph``) recomputes it exactly as the forward did, and a ``create_graph`` backward
    differentiably. Under ``torch.compile`` ``grad`` is saved and multiplied out of place.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        total: torch.Tensor,
        grad: torch.Tensor,
        y: torch.Tensor,
        valid: torch.Tensor | None,
        divisor: torch.Tensor,
        offsets: torch.Tensor,
        target_offsets: torch.Tensor | None,
    ) -> torch.Tensor:
        if _in_place():  # not a saved tensor: the backward changes it in place (class docstring)
            ctx.save_for_backward(z, y, valid, divisor, offsets, target_offsets)
            ctx.grad = grad  # type: ignore[attr-defined]
        else:
            ctx.save_for_backward(z, y, valid, divisor, offsets, target_offsets, grad)
            ctx.grad = None  # type: ignore[attr-defined]
        return total / divisor

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        z, y, valid, divisor, offsets, target_offsets, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph: the same gradient from differentiable operations
            t = adjusted_logits(z, y, offsets, target_offsets)
            scale = 1.0 / divisor if valid is None else valid.unsqueeze(1).to(z.dtype) / divisor
            dz = (torch.softmax(t, dim=1) - _onehot(y, t)) * scale * grad_out
        elif saved:  # compiled: the saved gradient, out of place
            dz = saved[0] * grad_out
        elif ctx.grad is not None:  # type: ignore[attr-defined]
            dz, ctx.grad = ctx.grad, None  # type: ignore[attr-defined]
            if not (dz.device.type == "cpu" and grad_out.item() == 1.0):  # x * 1.0 == x: skip the pass
                dz.mul_(grad_out)
        else:  # a second backward of a retained graph: the forward's gradient again
            with torch.no_grad():
                t = adjusted_logits(z.detach(), y, offsets, target_offsets)
                step = (-1.0 / divisor).to(z.dtype)
                if valid is not None:
                    zero = torch.zeros((), dtype=z.dtype, device=z.device)
                    step = torch.where(valid, step, zero).unsqueeze(1)
                dz = cross_entropy_gradient(log_softmax_(t), y, step).mul_(grad_out)
        return dz, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- per sample


class PerSampleCrossEntropy(torch.autograd.Function):
    """Per-sample CE(t_i, y_i) at adjusted logits t = s z + b (s a fixed scale, b a constant of the step),
    as (N,), for the per-sample losses (seesaw, LDAM, balanced softmax, logit adjustment).

    Inputs: z (N, C) the logits, ``log_p`` = log_softmax(t) (N, C), computed by the caller from t built
    out of ``z.detach()`` (:func:`per_sample_cross_entropy`), y (N,), ``scale`` s (a number). No graph is
    recorded for b. The backward is cross-entropy's own (the incoming per-sample gradients scattered at
    the labels, ``torch._log_softmax_backward_data``) times s: what autograd gives for
    ``F.cross_entropy(s * z + b, y, reduction="none")``, bit for bit.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        log_p: torch.Tensor,
        y: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(z, log_p, y)
        ctx.scale = scale  # type: ignore[attr-defined]
        return F.nll_loss(log_p, y, reduction="none")

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        z, log_p, y = ctx.saved_tensors  # type: ignore[attr-defined]
        scale: float = ctx.scale  # type: ignore[attr-defined]
        g = grad_out.unsqueeze(1)
        if torch.is_grad_enabled():  # create_graph: softmax(t) is softmax(log_p), differentiably in z
            t = z * scale + (log_p - z.detach() * scale)
            dz = (torch.softmax(t, dim=1) - _onehot(y, t)) * g
            return (dz * scale if scale != 1.0 else dz), None, None, None
        dz = cross_entropy_gradient(log_p, y, -g)  # nll_loss's backward: -g_i at the label
        if scale != 1.0:  # autograd's MulBackward of s * z, on the fresh gradient
            dz.mul_(scale)
        return dz, None, None, None


class ProbabilityCrossEntropy(torch.autograd.Function):
    """Per-sample CE(t_i, y_i), as (N,), given softmax(t) = W / S row by row (W (N, C) >= 0, S (N, 1)
    its row sums) and the per-sample values, where t = z + b (b a constant of the step) was never
    formed: seesaw computes W from softmax(z) times its factors
    (:func:`gradtail.losses.seesaw.seesaw_probabilities`). The backward is the closed form
    dl_i/dz = (W_i / S_i - onehot(y_i)) g_i, one pass over W with the normalisation folded into the
    per-sample factor g_i / S_i (no log-softmax kernel, no zero fill); under ``create_graph`` it is
    recomputed differentiably (softmax(t) is softmax(log W))."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        weights: torch.Tensor,
        totals: torch.Tensor,
        losses: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(z, weights, totals, y)
        return losses

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        z, weights, totals, y = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grad_out.unsqueeze(1)
        if torch.is_grad_enabled():  # create_graph: softmax(t) = softmax(log W), differentiably in z
            t = z + (weights.log() - z.detach())
            return (torch.softmax(t, dim=1) - _onehot(y, t)) * g, None, None, None, None
        dz = weights * (g / totals)
        return dz.scatter_add_(1, y.unsqueeze(1), -g), None, None, None, None


@torch.no_grad()
def adjusted_log_softmax(
    z: torch.Tensor,
    *,
    scale: float = 1.0,
    offsets: torch.Tensor | None = None,
    label_logits: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """log_softmax(t) along dim 1, a new (N, C) tensor, for t = ``scale`` z + ``offsets`` (a row (C,)),
    with the label's entry replaced by ``label_logits`` (N, 1) when given (labels ``y``): LDAM's
    s (z - m_y e_y), balanced softmax's and logit adjustment's z + a. ``z`` is detached. The same
    operations as on whole tensors, in blocks of samples on eager CPU (t written and normalised in
    place while in cache, module docstring), so the values are the same either way."""
    row = None if offsets is None else offsets.to(z.dtype).view(1, -1)
    idx = None if label_logits is None else y.unsqueeze(1)  # type: ignore[union-attr]

    def fill(t: torch.Tensor, zb: torch.Tensor, lb: torch.Tensor | None, ib: torch.Tensor | None) -> None:
        if scale != 1.0:
            torch.mul(zb, scale, out=t)
            if row is not None:
                t.add_(row)
        elif row is not None:
            torch.add(zb, row, out=t)
        else:
            t.copy_(zb)
        if lb is not None:
            t.scatter_(1, ib, lb)  # type: ignore[arg-type]

    if not _blocked(z):
        t = torch.empty(z.shape, dtype=z.dtype, device=z.device) if _in_place() else None
        if t is None:  # compiled: out of place
            t = z * scale if scale != 1.0 else z
            t = t + row if row is not None else t
            t = t if idx is None else t.scatter(1, idx, label_logits)  # type: ignore[arg-type]
            return F.log_softmax(t, dim=1)
        fill(t, z, label_logits, idx)
        return log_softmax_(t)
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    rows = row_blocks(z)[0][1]
    labels = [None] * len(out.split(rows)) if label_logits is None else label_logits.split(rows)
    indices = labels if idx is None else idx.split(rows)
    for t, zb, lb, ib in zip(out.split(rows), z.split(rows), labels, indices, strict=True):
        fill(t, zb, lb, ib)
        torch._log_softmax(t, 1, False, out=t)
    return out


def per_sample_cross_entropy(
    z: torch.Tensor, log_p: torch.Tensor, y: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """CE(t_i, y_i) per sample, (N,), from ``log_p`` = log_softmax(t) computed from ``z.detach()``
    (:func:`adjusted_log_softmax`, or a loss's own builder), differentiable in ``z`` as
    t = ``scale`` z + b (b a constant of the step): :class:`PerSampleCrossEntropy`. Without a
    gradient to compute, the plain value."""
    if not (torch.is_grad_enabled() and z.requires_grad):
        return F.nll_loss(log_p, y, reduction="none")
    return PerSampleCrossEntropy.apply(z, log_p, y, scale)


__all__ = [
    "CrossEntropyStep",
    "PerSampleCrossEntropy",
    "ProbabilityCrossEntropy",
    "SoftmaxCrossEntropy",
    "adjusted_log_softmax",
    "adjusted_logits",
    "cross_entropy_gradient",
    "cross_entropy_step",
    "gradient_class_sums",
    "log_softmax_",
    "per_sample_cross_entropy",
    "row_blocks",
    "softmax_cross_entropy",
]

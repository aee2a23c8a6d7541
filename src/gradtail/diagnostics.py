"""Gradient-ratio diagnostics for any loss (docs/methods/eql.md §6, docs/methods/protocol.md §4).

:class:`GradientRatioObserver` is a :class:`gradtail.contracts.StepObserver`: the trainer hands
it the logits of every training step, still attached, and it records per-class P_j, N_j and
g_j = P_j / N_j (docs/methods/eql.md §1) of whatever loss is being trained, through an autograd hook on the
logits (:meth:`gradtail.gradstats.GradientStatistics.attach_hook`). Overhead per step: one hook, a few (n, C)
element-wise ops and one all-reduce of 2C + 1 numbers. Snapshots per epoch (:meth:`end_epoch`) make the
"seesaw" visible: :func:`plot_gradient_ratios` draws g_j over epochs, one line per class, coloured by training
count; :func:`classes_below_ratio` lists the under-compensated classes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtail.errors import InputError
from gradtail.gradstats import GradientStatistics, statistics_frozen

Snapshot = dict[str, Any]
History = Sequence[Mapping[str, Any]] | Mapping[str, Any]


def _scale_getter(scaler: torch.amp.GradScaler | None) -> Callable[[], float | torch.Tensor] | None:
    """The current fp16 loss scale, read without a device sync where torch allows it
    (docs/methods/eql.md §1 rule 5)."""
    if scaler is None or not scaler.is_enabled():
        return None

    def current() -> float | torch.Tensor:
        get_async = getattr(scaler, "_get_scale_async", None)
        scale = get_async() if get_async is not None else None
        return scale if scale is not None else scaler.get_scale()

    return current


class GradientRatioObserver(nn.Module):
    """Per-class positive / negative gradient at the logits of any loss, snapshotted per epoch
    (docs/methods/eql.md §6).

    Args:
        num_classes: C (logit channels).
        grad_scaler: the fp16 ``GradScaler`` of the run, if any (also settable later with
            :meth:`set_grad_scaler`): hooked gradients are divided by its current scale and overflowed
            steps are skipped (docs/methods/eql.md §1 rule 5). bf16 and fp32 need none.

    ``observe(logits, targets)`` accepts (n, C) logits with (n,) labels, or (N, C, d1, ...) with
    (N, d1, ...) (every position a sample). Labels outside [0, C) (ignore indices, a detection background
    label) are left out. It does nothing in eval mode, under ``no_grad`` / inference mode, inside
    :func:`gradtail.gradstats.frozen_statistics`, or when the logits do not require grad. A hook that
    never fires (the backward did not reach the logits) raises :class:`gradtail.errors.TrainingError`
    at the next ``observe`` or at :meth:`end_epoch`.

    Statistics are those of the loss being trained (the gradient at the raw logits) under the scale
    convention of :mod:`gradtail.gradstats` (divided by the world size). The buffers (``stats.*``) and
    the snapshot history are both in ``state_dict()``, so a resumed run loses nothing.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from gradtail.diagnostics import GradientRatioObserver, classes_below_ratio
        >>> _ = torch.manual_seed(0)
        >>> observer = GradientRatioObserver(num_classes=3)
        >>> logits = torch.randn(8, 3, requires_grad=True)
        >>> targets = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])  # class 0 is the head
        >>> observer.observe(logits, targets)  # hooks the gradient of the coming backward
        >>> F.cross_entropy(logits, targets).backward()
        >>> snap = observer.end_epoch(1)
        >>> snap["epoch"], snap["steps"], [round(g, 2) for g in snap["g"]]
        (1, 1, [2.81, 0.67, 0.34])
        >>> classes_below_ratio(observer.to_json(), threshold=0.5)
        [2]
    """

    def __init__(self, num_classes: int, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.stats = GradientStatistics(self.num_classes)
        self.history: list[Snapshot] = []
        self._loss_scale = _scale_getter(grad_scaler)

    def set_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Use ``scaler``'s current scale to unscale hooked gradients (fp16 training)."""
        self._loss_scale = _scale_getter(scaler)

    # ------------------------------------------------------------------ per step
    def observe(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Hook the gradient that the coming backward sends to ``logits`` (StepObserver protocol)."""
        if not (self.training and torch.is_grad_enabled() and logits.requires_grad) or statistics_frozen():
            return
        if self.stats.pos.device != logits.device:
            self.stats.to(logits.device)
        y = targets.detach().to(device=logits.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise InputError(f"GradientRatioObserver: targets must be integer class indices, got {y.dtype}")
        y = y.long()
        valid = (y >= 0) & (y < self.num_classes)
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        self.stats.attach_hook(logits, y_safe, valid, loss_scale=self._loss_scale)

    # ------------------------------------------------------------------ per epoch
    def snapshot(self) -> Snapshot:
        """Current cumulative P, N, g per class (lists) and the number of accumulated steps."""
        return {
            "steps": int(self.stats.steps),
            "P": self.stats.pos.tolist(),
            "N": self.stats.neg.tolist(),
            "g": self.stats.ratio().tolist(),
        }

    def end_epoch(self, epoch: int) -> Snapshot:
        """Append and return the snapshot for ``epoch`` (statistics are cumulative from step 0, §1)."""
        self.stats.check_hook_fired()
        snap = {"epoch": int(epoch), **self.snapshot()}
        if self.history and snap["steps"] == self.history[-1]["steps"]:
            warnings.warn(
                f"GradientRatioObserver: no training step was recorded since the snapshot of epoch "
                f"{self.history[-1]['epoch']} (is observe() called with attached logits?)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.history.append(snap)
        return snap

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable record: ``{"num_classes": C, "history": [snapshot, ...]}``."""
        return {"num_classes": self.num_classes, "history": [dict(s) for s in self.history]}

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    # ------------------------------------------------------------------ checkpointing
    def get_extra_state(self) -> dict[str, Any]:
        """The snapshot history travels in ``state_dict()`` next to the buffers
        (docs/methods/eql.md §1 rule 4)."""
        return {"history": [dict(s) for s in self.history]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.history = [dict(s) for s in state.get("history", [])]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, snapshots={len(self.history)}"


# ---------------------------------------------------------------------------------------------- report
def _snapshots(history: History) -> list[Mapping[str, Any]]:
    """Accept a list of snapshots or a :meth:`GradientRatioObserver.to_json` record."""
    if isinstance(history, Mapping):
        history = history.get("history", [])
    snaps = list(history)
    if not snaps:
        raise InputError("the gradient-ratio history is empty (no epoch snapshot recorded)")
    return snaps


def classes_below_ratio(history: History, threshold: float = 0.5) -> list[int]:
    """Classes whose final g_j is below ``threshold`` (0.5: under-compensated / starved,
    docs/methods/eql.md §1)."""
    final = _snapshots(history)[-1]["g"]
    return [j for j, g in enumerate(final) if g < threshold]


def plot_gradient_ratios(
    history: History,
    class_counts: Sequence[int] | torch.Tensor,
    path: str | Path,
    title: str | None = None,
    cmap: str = "viridis",
) -> Path:
    """Plot g_j against epoch, one line per class coloured by training count (docs/methods/eql.md §6);
    save a PNG.

    Colours follow a log-scaled colormap of ``class_counts`` with a colorbar; dashed lines mark
    g = 0.5 and g = 1. Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    snaps = _snapshots(history)
    counts = [max(float(c), 1.0) for c in torch.as_tensor(class_counts).flatten().tolist()]
    num_classes = len(snaps[-1]["g"])
    if len(counts) != num_classes:
        raise InputError(f"class_counts has {len(counts)} entries, the history has {num_classes} classes")
    epochs = [s["epoch"] for s in snaps]
    ratios = torch.tensor([s["g"] for s in snaps], dtype=torch.float64)  # (epochs, C)

    lo, hi = min(counts), max(counts)
    norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 1.01)
    colors = colormaps[cmap]
    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    marker = "." if num_classes <= 50 and len(epochs) <= 50 else None
    for j in sorted(range(num_classes), key=lambda k: -counts[k]):  # tail classes drawn last, on top
        ax.plot(epochs, ratios[:, j].tolist(), color=colors(norm(counts[j])), linewidth=1.2, marker=marker)
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=1.0, label="g = 0.5")
    ax.axhline(1.0, color="0.1", linestyle="--", linewidth=1.0, label="g = 1")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$g_j = P_j \, / \, N_j$")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0.0)
    ax.set_title(title or "accumulated positive / negative gradient per class")
    ax.legend(loc="upper left", fontsize="small")
    fig.colorbar(ScalarMappable(norm=norm, cmap=colors), ax=ax, label="training images per class (log scale)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path

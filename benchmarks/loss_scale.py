"""Every registered loss against the stock loss it modifies, at 10, 1,000 and 8,142 classes (issue #29).

For each loss and class count C, one run measures, on the same logits and labels:

- the loss's forward + backward time (a training call: statistics updates included) divided by the
  stock loss's forward + backward time, timed alternately (stock, loss, stock, loss, ...) so that slow
  drifts of the machine hit both, median over repetitions;
- the bytes of the loss's buffers (statistics and constants) after the timed calls.

Stock losses (what each loss modifies): the softmax family against ``F.cross_entropy`` (mean over the
batch); the sigmoid family against one-hot BCE with logits (``F.binary_cross_entropy_with_logits`` on
``F.one_hot(y)``, summed and divided by the samples; the one-hot target is part of the stock loss, as
in mmdetection's sigmoid cross-entropy); ``efl``, ``eqfl``, ``sigmoid_focal`` and ``cb`` with base
``sigmoid_focal`` against torchvision's ``sigmoid_focal_loss`` (summed, divided by the positives). Two
settings:

- ``classification``: n = 256 samples at C = 10, 1,000, 8,142 (a long tail of labels), every loss;
- ``lvis``: the sigmoid family's detection losses at LVIS size, 1,203 classes (+ the background channel
  of the two-stage head for ``sigmoid_eql``), 4,096 RoIs of which 25% are positives and the rest background.

The acceptance of issue #29: every ratio <= 2.0 at C = 8,142 (softmax family) and at LVIS size (sigmoid
family), and at most 1 MiB of loss buffers at 8,142 classes.

    flock /tmp/gradtail_cpu.lock .venv/bin/python benchmarks/loss_scale.py --output runs/bench/loss_scale.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from bench_output import write_result

from gradtail.environment import configure_cpu_allocator, environment_info
from gradtail.losses import create_loss, loss_names

CLASS_COUNTS = (10, 1000, 8142)
BATCH = 256
LVIS_CLASSES = 1203
LVIS_ROIS = 4096
LVIS_POSITIVES = 0.25
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One loss configuration: ``name`` (registry), ``params``, its ``family`` (which stock loss)."""

    label: str
    name: str
    family: str  # "softmax" | "sigmoid" | "focal"
    params: dict[str, Any] = field(default_factory=dict)
    needs_counts: bool = False
    detection: bool = False  # takes the background label at LVIS size (and the objectness channel)
    cosine: bool = False  # logits are cosines in [-1, 1] (LDAM's normalised classifier)


CASES: tuple[Case, ...] = (
    Case("ce", "ce", "softmax"),
    Case("focal", "focal", "softmax"),
    Case("cb", "cb", "softmax", needs_counts=True),
    Case("cb (softmax_focal)", "cb", "softmax", {"base": "softmax_focal"}, needs_counts=True),
    Case("balanced_softmax", "balanced_softmax", "softmax", needs_counts=True),
    Case("logit_adjust", "logit_adjust", "softmax", needs_counts=True),
    Case("ldam", "ldam", "softmax", needs_counts=True, cosine=True),
    Case("drw (ce, after the switch)", "drw", "softmax", {"drw_epoch": 0}, needs_counts=True),
    Case("drw (ldam, after the switch)", "drw", "softmax", {"base": "ldam", "drw_epoch": 0},
         needs_counts=True, cosine=True),
    Case("seesaw", "seesaw", "softmax"),
    Case("gala", "gala", "softmax"),
    Case("gala (code, double)", "gala", "softmax", {"variant": "code", "accumulation": "double"}),
    Case("softmax_eql", "softmax_eql", "softmax"),
    Case("cb (sigmoid)", "cb", "sigmoid", {"base": "sigmoid"}, needs_counts=True),
    Case("cb (sigmoid_focal)", "cb", "focal", {"base": "sigmoid_focal"}, needs_counts=True),
    Case("sigmoid_eql", "sigmoid_eql", "sigmoid", detection=True),
    Case("sigmoid_eql (exact)", "sigmoid_eql", "sigmoid", {"accumulation": "exact"}, detection=True),
    Case("federated", "federated", "sigmoid", needs_counts=True, detection=True),
    Case("sigmoid_focal", "sigmoid_focal", "focal", detection=True),
    Case("efl", "efl", "focal", detection=True),
    Case("eqfl", "eqfl", "focal", detection=True),
)


def long_tail_counts(num_classes: int) -> list[int]:
    """Training counts n_i = int(1000 * 100^(-i / (C - 1))), at least 1 (an IF-100 long tail)."""
    return [max(1, int(1000 * 100 ** (-i / max(num_classes - 1, 1)))) for i in range(num_classes)]


def labels(num_classes: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n labels drawn from the long tail of :func:`long_tail_counts`."""
    counts = torch.tensor(long_tail_counts(num_classes), dtype=torch.float64)
    return torch.multinomial(counts, n, replacement=True, generator=gen)


def stock_loss(family: str, channels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The stock loss a family modifies, as ``(logits, labels) -> scalar``."""
    if family == "softmax":
        return lambda z, y: F.cross_entropy(z, y)
    if family == "sigmoid":  # one-hot BCE with logits (a background label C is a row of zeros)

        def bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            t = F.one_hot(y, max(channels, int(y.max()) + 1))[:, :channels].to(z.dtype)
            return F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]

        return bce
    from torchvision.ops import sigmoid_focal_loss

    def focal(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = F.one_hot(y, channels + 1)[:, :channels].to(z.dtype)
        return sigmoid_focal_loss(z, t, reduction="sum") / (y < channels).sum().clamp(min=1)

    return focal


def build(case: Case, num_classes: int, lvis: bool) -> torch.nn.Module:
    params = dict(case.params)
    if lvis and case.detection:
        params["background_label"] = True
        if case.name == "sigmoid_eql":
            params["objectness"] = True
    counts = long_tail_counts(num_classes) if case.needs_counts else None
    loss = create_loss(case.name, num_classes, class_counts=counts, **params)
    return loss.train()


def buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def time_pair(
    stock: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    y: torch.Tensor,
    reps: int,
    warmup: int,
) -> tuple[float, float]:
    """Median seconds of forward + backward of ``stock`` and of ``loss``, timed alternately."""
    times: dict[str, list[float]] = {"stock": [], "loss": []}
    for rep in range(warmup + reps):
        order = (("stock", stock), ("loss", loss)) if rep % 2 == 0 else (("loss", loss), ("stock", stock))
        for key, fn in order:
            z.grad = None
            start = time.perf_counter()
            fn(z, y).backward()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[key].append(elapsed)
    return statistics.median(times["stock"]), statistics.median(times["loss"])


def measure(case: Case, num_classes: int, n: int, lvis: bool, reps: int, warmup: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(num_classes + n)
    loss = build(case, num_classes, lvis)
    channels = getattr(loss, "num_channels", num_classes)
    if lvis:
        y = labels(num_classes, n, gen)
        y[torch.rand(n, generator=gen) >= LVIS_POSITIVES] = num_classes  # background RoIs
        if case.name == "federated":
            channels = num_classes
    else:
        y = labels(num_classes, n, gen)
    if case.cosine:
        z = (2.0 * torch.rand(n, channels, generator=gen) - 1.0).requires_grad_()
    else:
        z = (2.0 * torch.randn(n, channels, generator=gen)).requires_grad_()
    stock = stock_loss(case.family, num_classes if case.family == "focal" else channels)
    t_stock, t_loss = time_pair(stock, loss, z, y, reps, warmup)
    return {
        "classes": num_classes,
        "channels": channels,
        "samples": n,
        "stock_ms": 1000 * t_stock,
        "loss_ms": 1000 * t_loss,
        "ratio": t_loss / t_stock,
        "buffer_bytes": buffer_bytes(loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default=",".join(map(str, CLASS_COUNTS)))
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per loss and class count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", help="comma-separated case labels or loss names (default: every case)")
    p.add_argument("--no-lvis", action="store_true", help="skip the LVIS-size setting")
    p.add_argument("--cpu-allocator", default="auto", choices=["auto", "system"],
                   help="as train.cpu_allocator: auto keeps freed memory (no page faults)")  # fmt: skip
    p.add_argument("--output", default="runs/bench/loss_scale.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator = configure_cpu_allocator(args.cpu_allocator, torch.device("cpu"))
    classes = [int(c) for c in args.classes.split(",")]
    cases = CASES
    if args.only:
        wanted = set(args.only.split(","))
        cases = tuple(c for c in CASES if c.label in wanted or c.name in wanted)
    missing = sorted(set(loss_names()) - {c.name for c in CASES})
    if missing:
        raise SystemExit(f"registered losses without a benchmark case: {missing}")
    rows: list[dict[str, Any]] = []
    for case in cases:
        for c in classes:
            row = {"loss": case.label, "name": case.name, "family": case.family, "setting": "classification"}
            row.update(measure(case, c, args.batch, False, args.reps, args.warmup))
            rows.append(row)
            print(f"{case.label:32s} C={c:5d}  ratio {row['ratio']:.2f}  buffers {row['buffer_bytes']} B",
                  flush=True)  # fmt: skip
        if case.detection and not args.no_lvis:
            row = {"loss": case.label, "name": case.name, "family": case.family, "setting": "lvis"}
            row.update(measure(case, LVIS_CLASSES, LVIS_ROIS, True, args.reps, args.warmup))
            rows.append(row)
            print(f"{case.label:32s} LVIS     ratio {row['ratio']:.2f}", flush=True)
    largest = max(classes)
    accept = [
        r
        for r in rows
        if (r["setting"] == "classification" and r["family"] == "softmax" and r["classes"] == largest)
        or r["setting"] == "lvis"
    ]
    result = {
        "benchmark": "loss_scale",
        "threads": args.threads,
        "cpu_allocator": allocator,
        "batch": args.batch,
        "lvis": {"classes": LVIS_CLASSES, "rois": LVIS_ROIS, "positives": LVIS_POSITIVES},
        "rows": rows,
        "max_ratio_acceptance": max((r["ratio"] for r in accept), default=None),
        "max_buffer_mib_at_largest": max(
            (r["buffer_bytes"] / MIB for r in rows if r["classes"] == largest), default=None
        ),
        "environment": environment_info(torch.device("cpu")),
    }
    write_result(result, args.output, echo=False)
    print(f"max ratio (acceptance settings) {result['max_ratio_acceptance']}")
    print(f"max buffers at C = {largest}: {result['max_buffer_mib_at_largest']} MiB")


if __name__ == "__main__":
    main()

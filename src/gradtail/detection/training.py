"""Training and evaluating a detector on COCO / LVIS-format data (docs/detection.md §Training).

:func:`run_detection` is one run: data (a COCO/LVIS annotation file + image folder per split, or the
Fashion-MNIST detection benchmark built on the fly), :func:`~gradtail.detection.build_detector`, SGD with
momentum, linear warm-up and step decay (the LVIS recipes' schedule), uniform or repeat-factor image
sampling, evaluation through :mod:`gradtail.metrics.detection`, and a run record ``final.json`` (metrics,
per-class AP with the training image counts and groups, the data hash, wall time, per-step time, the
loss's final gradient statistics) plus ``detections.png`` (a few test images with their top boxes).

Multi-process: under ``torchrun`` (a process group initialised from the environment) the model is wrapped
in ``DistributedDataParallel``, each rank takes its strided part of the epoch's global image order (the
samplers of :mod:`gradtail.data.samplers`), and rank 0 evaluates and writes the record.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.data.fm_detection import FMDetectionSpec, build_fm_detection
from gradtail.data.lvis import (
    DetectionAnnotations,
    DetectionDataset,
    collate_detection,
    detection_transforms,
    read_detection_json,
)
from gradtail.data.samplers import RepeatFactorSampler, sampler_seed
from gradtail.detection.models import Detector, DetectorSpec, build_detector
from gradtail.distributed import is_distributed, is_main_process, rank, world_size
from gradtail.errors import ConfigError
from gradtail.gradstats import GradientStatistics
from gradtail.metrics.detection import DetectionMetrics, detection_records, evaluate_detections


@dataclass
class DetectionTrainSpec:
    """Optimisation and sampling of a detection run."""

    seed: int = 0
    epochs: int = 6
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    warmup_ratio: float = 0.001
    lr_steps: tuple[float, ...] = (0.67, 0.92)  # fractions of the run (the 1x schedule's 8 / 12, 11 / 12)
    sampler: str = "uniform"  # or "repeat_factor"
    rfs_threshold: float = 0.001
    flip: bool = True
    min_size: tuple[int, ...] | None = None  # multi-scale training sizes (None: the canvas as it is)
    max_size: int | None = None
    threads: int | None = None
    grad_clip: float | None = 10.0


@dataclass
class DetectionDataSpec:
    """Where the data are: ``fm_benchmark`` (built under ``root`` from the spec fields given in ``fm``), or
    ``train`` / ``val`` / ``test`` annotation files with ``image_root`` (LVIS or COCO format)."""

    kind: str = "fm_benchmark"
    root: str = "data/fm_detection"
    fm: dict[str, Any] = field(default_factory=dict)
    train: str | None = None
    val: str | None = None
    test: str | None = None
    image_root: str | None = None
    eval_split: str = "test"
    protocol: str = "auto"
    max_dets: int | None = None


def _from_dict(cls: Any, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid: {sorted(known)}")
    for f in fields(cls):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


@dataclass
class DetectionRunConfig:
    """A detection run: ``data``, ``detector``, ``train`` (the three specs above)."""

    data: DetectionDataSpec
    detector: DetectorSpec
    train: DetectionTrainSpec
    name: str = "detection"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DetectionRunConfig:
        extra = sorted(set(raw) - {"data", "detector", "train", "name", "task"})
        if extra:
            raise ConfigError(
                f"detection config: unknown sections {extra}; valid: data, detector, train, name"
            )
        return cls(
            data=_from_dict(DetectionDataSpec, raw.get("data"), "data"),
            detector=_from_dict(DetectorSpec, raw.get("detector"), "detector"),
            train=_from_dict(DetectionTrainSpec, raw.get("train"), "train"),
            name=str(raw.get("name", "detection")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data": asdict(self.data),
            "detector": asdict(self.detector),
            "train": asdict(self.train),
        }


@dataclass
class DetectionSplits:
    """Parsed annotations of each split, the image folder and the data hash."""

    train: DetectionAnnotations
    eval: DetectionAnnotations
    image_root: Path
    sha256: str | None


def load_splits(spec: DetectionDataSpec) -> DetectionSplits:
    if spec.kind == "fm_benchmark":
        fm = build_fm_detection(spec.root, _from_dict(FMDetectionSpec, spec.fm, "data.fm"))
        train = read_detection_json(fm.annotation_file("train"))
        ev = read_detection_json(fm.annotation_file(spec.eval_split))
        return DetectionSplits(train, ev, fm.image_root, fm.sha256)
    if spec.kind != "files":
        raise ConfigError(f"data.kind must be fm_benchmark or files, got {spec.kind!r}")
    path = {"train": spec.train, "val": spec.val, "test": spec.test}
    if spec.train is None or path.get(spec.eval_split) is None or spec.image_root is None:
        raise ConfigError(f"data.kind files needs data.train, data.{spec.eval_split} and data.image_root")
    train = read_detection_json(spec.train)
    ev = read_detection_json(path[spec.eval_split])  # type: ignore[arg-type]
    if ev.category_ids != train.category_ids:
        raise ConfigError(f"{ev.path}: its categories differ from those of {train.path}")
    return DetectionSplits(train, ev, Path(spec.image_root), None)


def _epoch_order(
    n: int, spec: DetectionTrainSpec, epoch: int, rfs: RepeatFactorSampler | None
) -> torch.Tensor:
    """This rank's images of ``epoch``: a seeded permutation (uniform) or repeat-factor order, strided."""
    if rfs is not None:
        return rfs.indices(epoch, rank(), world_size())
    g = torch.Generator().manual_seed(sampler_seed(spec.seed, epoch))
    order = torch.randperm(n, generator=g)
    w = world_size()
    return order[: n // w * w][rank() :: w]


def _lr_at(it: int, total: int, spec: DetectionTrainSpec) -> float:
    lr = spec.lr
    for frac in spec.lr_steps:
        if it >= int(frac * total):
            lr *= 0.1
    if it < spec.warmup_iters:
        k = it / max(spec.warmup_iters, 1)
        lr *= spec.warmup_ratio + (1 - spec.warmup_ratio) * k
    return lr


@torch.no_grad()
def predict_records(
    detector: Detector, dataset: DetectionDataset, batch_size: int = 16
) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """COCO/LVIS result records of every image of ``dataset`` (and the raw outputs, for drawing)."""
    detector.eval()
    ann = dataset.annotations
    records: list[dict[str, Any]] = []
    outputs: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outs = detector([im for im, _ in items])
        for (_, target), out in zip(items, outs, strict=True):
            records += detection_records(
                target["image_id"], out["boxes"], out["scores"], out["labels"], ann.category_ids
            )
            outputs.append({k: v.detach().cpu() for k, v in out.items()})
    return records, outputs


def evaluate_detector(
    detector: Detector,
    dataset: DetectionDataset,
    protocol: str = "auto",
    max_dets: int | None = None,
    frequencies: Sequence[str] | None = None,
) -> tuple[DetectionMetrics, list[dict[str, torch.Tensor]]]:
    records, outputs = predict_records(detector, dataset)
    metrics = evaluate_detections(dataset.annotations, records, protocol, max_dets, frequencies)
    return metrics, outputs


def draw_detections(
    dataset: DetectionDataset,
    outputs: list[dict[str, torch.Tensor]],
    path: Path,
    count: int = 6,
    top: int = 4,
    min_score: float = 0.1,
) -> None:
    """A row of ``count`` test images with ground truth (green) and the top predictions (red, labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = [c.name for c in dataset.annotations.categories]
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.9))
    for k, ax in enumerate(np.atleast_1d(axes)):
        image, target = dataset[k]
        ax.imshow(image.permute(1, 2, 0).numpy().clip(0, 1))
        for x1, y1, x2, y2 in target["boxes"].tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        out = outputs[k]
        keep = (out["scores"] >= min_score).nonzero().flatten()[:top]
        for i in keep.tolist():
            x1, y1, x2, y2 = out["boxes"][i].tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=1))
            ax.text(
                x1,
                y1,
                f"{names[int(out['labels'][i])]} {float(out['scores'][i]):.2f}",
                color="yellow",
                fontsize=5,
                va="bottom",
            )
        ax.set_axis_off()
    fig.suptitle(
        f"test images: ground truth (green), predictions (red, score >= {min_score:.1f})", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_detection(cfg: DetectionRunConfig, out_dir: str | Path, verbose: bool = True) -> dict[str, Any]:
    """Train and evaluate one detector (module docstring); returns the run record written to final.json."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    ts = cfg.train
    if ts.threads:
        torch.set_num_threads(ts.threads)
    if ts.sampler not in ("uniform", "repeat_factor"):
        raise ConfigError(f"train.sampler must be uniform or repeat_factor, got {ts.sampler!r}")
    torch.manual_seed(ts.seed)
    np.random.seed(ts.seed)
    splits = load_splits(cfg.data)
    spec = DetectorSpec(**{**asdict(cfg.detector), "num_classes": splits.train.num_classes})
    detector = build_detector(spec)
    model: torch.nn.Module = detector
    if is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(detector)
    train_tf = detection_transforms(True, ts.min_size, ts.max_size, 0.5 if ts.flip else 0.0)
    train_set = DetectionDataset(splits.train, splits.image_root, train_tf)
    eval_set = DetectionDataset(splits.eval, splits.image_root, detection_transforms(False))
    rfs = (
        RepeatFactorSampler(splits.train.image_categories(), ts.rfs_threshold, ts.seed)
        if ts.sampler == "repeat_factor"
        else None
    )
    params = [p for p in detector.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=ts.lr, momentum=ts.momentum, weight_decay=ts.weight_decay)
    per_epoch = math.ceil(len(_epoch_order(len(train_set), ts, 0, rfs)) / ts.batch_size)
    total = per_epoch * ts.epochs
    it, step_times, history = 0, [], []
    for epoch in range(ts.epochs):
        detector.train()
        order = _epoch_order(len(train_set), ts, epoch, rfs).tolist()
        sums: dict[str, float] = {}
        for b in range(0, len(order), ts.batch_size):
            t0 = time.perf_counter()
            images, targets = collate_detection([train_set[i] for i in order[b : b + ts.batch_size]])
            for group in opt.param_groups:
                group["lr"] = _lr_at(it, total, ts)
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                parts = {k: float(v) for k, v in losses.items()}
                raise ConfigError(f"non-finite detection loss at iteration {it}: {parts}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ts.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, ts.grad_clip)
            opt.step()
            step_times.append(time.perf_counter() - t0)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            it += 1
        n_b = max(1, math.ceil(len(order) / ts.batch_size))
        history.append({"epoch": epoch + 1, **{k: v / n_b for k, v in sums.items()}})
        if verbose and is_main_process():
            print(
                f"[{cfg.name}] epoch {epoch + 1}/{ts.epochs} "
                + " ".join(f"{k} {v / n_b:.3f}" for k, v in sums.items()),
                flush=True,
            )
    train_time = time.perf_counter() - t_start
    record: dict[str, Any] = {}
    if is_main_process():
        freqs = splits.train.frequencies()
        metrics, outputs = evaluate_detector(detector, eval_set, cfg.data.protocol, cfg.data.max_dets, freqs)
        out.mkdir(parents=True, exist_ok=True)
        stats = None
        st = getattr(detector.loss_module, "stats", None)
        if isinstance(st, GradientStatistics):
            stats = {
                "pos": st.pos.tolist(),
                "neg": st.neg.tolist(),
                "ratio": st.ratio().tolist(),
                "steps": int(st.steps),
            }
        record = {
            "config": cfg.to_dict(),
            "task": "detection",
            "protocol": metrics.protocol,
            "metrics": metrics.summary,
            "per_class": [
                {"class": c.name, "category_id": c.id, "frequency": f, "train_images": int(n), "ap": ap}
                for c, f, n, ap in zip(
                    splits.train.categories,
                    freqs,
                    splits.train.image_counts(),
                    metrics.per_class_ap.tolist(),
                    strict=True,
                )
            ],
            "num_detections": metrics.num_detections,
            "data_sha256": splits.sha256,
            "train_images": len(train_set),
            "eval_split": cfg.data.eval_split,
            "iterations": it,
            "wall_time_s": time.perf_counter() - t_start,
            "train_time_s": train_time,
            "mean_step_s": float(np.mean(step_times)) if step_times else None,
            "history": history,
            "gradient_statistics": stats,
            "world_size": world_size(),
        }
        (out / "final.json").write_text(json.dumps(record, indent=1, default=float))
        try:
            draw_detections(eval_set, outputs, out / "detections.png")
        except Exception as e:  # pragma: no cover - drawing is a convenience
            print(f"[{cfg.name}] could not draw detections: {e}")
        if verbose:
            m = metrics.summary
            print(
                f"[{cfg.name}] AP {m['AP']:.3f} APr {m['APr']:.3f} APc {m['APc']:.3f} APf {m['APf']:.3f} "
                f"({record['wall_time_s']:.0f} s)",
                flush=True,
            )
    return record


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_detection_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DetectionRunConfig:
    """A detection YAML config; ``base: other.yaml`` (relative to the file) is merged under it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping")
    base = raw.pop("base", None)
    if base is not None:
        raw = _merge(load_detection_config(path.parent / base).to_dict(), raw)
    return DetectionRunConfig.from_dict(_merge(raw, overrides or {}))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradtail.detection.training CONFIG OUT_DIR [--seed N] [--epochs N]``."""
    import argparse

    from gradtail.errors import GradtailError

    p = argparse.ArgumentParser(prog="python -m gradtail.detection.training", description=main.__doc__)
    p.add_argument("config")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    args = p.parse_args(argv)
    over: dict[str, Any] = {"train": {}}
    if args.seed is not None:
        over["train"]["seed"] = args.seed
    if args.epochs is not None:
        over["train"]["epochs"] = args.epochs
    try:
        from gradtail.distributed import init_from_environment

        init_from_environment()
        run_detection(load_detection_config(args.config, over), args.out_dir)
    except GradtailError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training and evaluating a detector on COCO / LVIS-format data (docs/detection.md, "Runs").

:class:`DetectionRun` is one run, driven by ``gradtail train`` / ``eval`` / ``bench``: data (a COCO/LVIS
annotation file + image folder per split, or the Fashion-MNIST detection benchmark built on the fly),
:func:`~gradtail.detection.build_detector`, SGD with momentum, linear warm-up and step decay (the LVIS
recipes' schedule), uniform or repeat-factor image sampling, evaluation through
:mod:`gradtail.metrics.detection`. It lives in a :class:`~gradtail.rundir.RunDirectory` (the refuse /
resume / overwrite rules of every run, a checkpoint per epoch) and ends with ``final.json`` (metrics,
per-class AP with the training image counts and groups, the data and config hashes, per-step time, the
loss's final gradient statistics) and ``detections.png`` (a few test images with their top boxes).

Multi-process: under ``torchrun`` (a process group initialised from the environment) the model is wrapped
in ``DistributedDataParallel``, each rank takes its strided part of the epoch's global image order (the
samplers of :mod:`gradtail.data.samplers`), and rank 0 evaluates and writes the record.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gradtail.data.detection.fm_benchmark import FMDetectionSpec, build_fm_detection
from gradtail.data.detection.lvis import (
    DetectionAnnotations,
    DetectionDataset,
    collate_detection,
    detection_transforms,
    read_detection_json,
)
from gradtail.data.samplers import RepeatFactorSampler, sampler_seed
from gradtail.distributed import barrier, is_distributed, is_main_process, rank, world_size
from gradtail.engine.checkpoint import capture_rng_state, restore_rng_state
from gradtail.environment import environment_info, resolve_device
from gradtail.errors import ConfigError, TrainingError
from gradtail.gradstats import GradientStatistics
from gradtail.metrics.detection import DetectionMetrics, detection_records, evaluate_detections
from gradtail.models.detection.detectors import Detector, DetectorSpec, build_detector
from gradtail.rundir import (
    CONFIG,
    ENVIRONMENT,
    FINAL,
    RunDirectory,
    config_changes,
    describe_changes,
    load_checkpoint,
)


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
    device: str = "auto"  # auto: the local GPU under torchrun, else cuda if present, else cpu | cpu | cuda:N
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
    device = next(detector.parameters()).device
    ann = dataset.annotations
    records: list[dict[str, Any]] = []
    outputs: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outs = detector([im.to(device) for im, _ in items])
        for (_, target), out in zip(items, outs, strict=True):
            out = {k: v.detach().cpu() for k, v in out.items()}
            records += detection_records(
                target["image_id"], out["boxes"], out["scores"], out["labels"], ann.category_ids
            )
            outputs.append(out)
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
    count = min(count, len(dataset), len(outputs))
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.9), squeeze=False)
    for k, ax in enumerate(axes[0]):
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


# Keys of a detection config a resumed run may change (where and how it runs, never what it trains).
DETECTION_RESUME_SAFE_KEYS = frozenset({"train.threads", "train.device", "name"})
CHECKPOINT_VERSION = 1


def config_hash(cfg: DetectionRunConfig) -> str:
    """SHA-256 (16 hex digits) of the config without its resume-safe keys: a suite's run is *done* when its
    ``final.json`` carries the hash of the run it would be now."""
    d = cfg.to_dict()
    d.pop("name", None)
    d["train"].pop("threads", None)
    d["train"].pop("device", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DetectionRun:
    """One detection run in its :class:`~gradtail.rundir.RunDirectory` (the same layout and the same
    refuse / resume / overwrite rules as a classification run, docs/runs.md): ``config.yaml``,
    ``environment.json``, ``metrics.jsonl`` (one record per epoch: the mean of each loss term),
    ``checkpoints/last.pt`` after every epoch (model, optimizer, iteration, history, RNG; the loss's
    gradient statistics are buffers of the model), ``final.json`` and ``detections.png`` at the end.

    Each epoch's image order is a function of (seed, epoch) and the flips draw from the checkpointed RNG,
    so a run resumed from any epoch continues as if it had not stopped.
    """

    def __init__(self, cfg: DetectionRunConfig, out_dir: str | Path, verbose: bool = True) -> None:
        self.cfg = cfg
        self.verbose = verbose
        ts = cfg.train
        if ts.sampler not in ("uniform", "repeat_factor"):
            raise ConfigError(f"train.sampler must be uniform or repeat_factor, got {ts.sampler!r}")
        if ts.epochs < 1 or ts.batch_size < 1 or ts.lr <= 0:
            raise ConfigError("train.epochs, train.batch_size and train.lr must be positive")
        if ts.threads:
            torch.set_num_threads(ts.threads)
        self.run_dir = RunDirectory(out_dir, writer=is_main_process())
        torch.manual_seed(ts.seed)
        np.random.seed(ts.seed)
        # under torchrun rank 0 builds (or checks) the benchmark's files first, the others then read them
        if is_distributed() and not is_main_process():
            barrier()
        self.splits = load_splits(cfg.data)
        if is_distributed() and is_main_process():
            barrier()
        self.run_dir.ensure_writable()
        spec = DetectorSpec(**{**asdict(cfg.detector), "num_classes": self.splits.train.num_classes})
        self.device = resolve_device(ts.device)
        self.detector = build_detector(spec).to(self.device)
        self.model: torch.nn.Module = self.detector
        if is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.detector, device_ids=ids)
        train_tf = detection_transforms(True, ts.min_size, ts.max_size, 0.5 if ts.flip else 0.0)
        self.train_set = DetectionDataset(self.splits.train, self.splits.image_root, train_tf)
        self.eval_set = DetectionDataset(
            self.splits.eval, self.splits.image_root, detection_transforms(False)
        )
        self.rfs = (
            RepeatFactorSampler(self.splits.train.image_categories(), ts.rfs_threshold, ts.seed)
            if ts.sampler == "repeat_factor"
            else None
        )
        self.params = [p for p in self.detector.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            self.params, lr=ts.lr, momentum=ts.momentum, weight_decay=ts.weight_decay
        )
        self.per_epoch = math.ceil(len(_epoch_order(len(self.train_set), ts, 0, self.rfs)) / ts.batch_size)
        self.total = self.per_epoch * ts.epochs
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.resumes: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "task": "detection",
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "model": self.detector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "step_times": self.step_times,
            "resumes": self.resumes,
            "rng": capture_rng_state(),
            "data_sha256": self.splits.sha256,
            "category_ids": self.splits.train.category_ids,
        }

    def load_state(self, state: dict[str, Any], where: Path) -> None:
        if state.get("task") != "detection":
            raise ConfigError(f"{where} is not a detection checkpoint")
        if state.get("data_sha256") != self.splits.sha256:
            raise ConfigError(f"{where} was trained on other data (data hash mismatch)")
        changes = config_changes(state["config"], self.cfg.to_dict())
        unsafe = {k: v for k, v in changes.items() if k not in DETECTION_RESUME_SAFE_KEYS}
        if unsafe:
            raise ConfigError(
                f"cannot resume {where}: the config differs from the checkpoint's in "
                f"{describe_changes(unsafe)}; train under another --output or start again with --overwrite"
            )
        self.detector.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.step_times = list(state["step_times"])
        self.resumes = [*state.get("resumes", []), {"at_epoch": self.epoch, "changed": changes}]
        restore_rng_state(state["rng"])
        self.run_dir.rewrite_metrics(self.history)

    # ------------------------------------------------------------------ training
    def train_epoch(self) -> dict[str, Any]:
        ts = self.cfg.train
        self.detector.train()
        order = _epoch_order(len(self.train_set), ts, self.epoch, self.rfs).tolist()
        sums: dict[str, float] = {}
        start = time.perf_counter()
        for b in range(0, len(order), ts.batch_size):
            t0 = time.perf_counter()
            images, targets = collate_detection([self.train_set[i] for i in order[b : b + ts.batch_size]])
            if self.device.type != "cpu":
                images = [im.to(self.device, non_blocking=True) for im in images]
                targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
            for group in self.optimizer.param_groups:
                group["lr"] = _lr_at(self.iteration, self.total, ts)
            losses = self.model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                parts = {k: round(float(v), 4) for k, v in losses.items()}
                raise TrainingError(
                    f"non-finite detection loss at iteration {self.iteration} (epoch {self.epoch + 1}): "
                    f"{parts}; lower train.lr or check the boxes"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if ts.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, ts.grad_clip)
            self.optimizer.step()
            self.step_times.append(time.perf_counter() - t0)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            self.iteration += 1
        n_b = max(1, math.ceil(len(order) / ts.batch_size))
        record: dict[str, Any] = {"epoch": self.epoch + 1, **{k: v / n_b for k, v in sums.items()}}
        record["train_loss"] = sum(v / n_b for v in sums.values())
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["train_seconds"] = time.perf_counter() - start
        return record

    def fit(
        self, resume: bool | str | Path = False, overwrite: bool = False, stop_after: int | None = None
    ) -> dict[str, Any]:
        """Train to ``train.epochs`` (or stop after ``stop_after`` epochs of this call), then evaluate and
        write ``final.json``; the rules of ``resume`` / ``overwrite`` are :meth:`Trainer.fit`'s."""
        state = self.run_dir.begin(resume, overwrite)
        if state is not None:
            self.load_state(state, self.run_dir.path if resume is True else Path(str(resume)))
        self.run_dir.write_text(CONFIG, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        env = environment_info(self.device) | {"world_size": world_size()}
        self.run_dir.write_json(ENVIRONMENT, env)
        ts = self.cfg.train
        ran = 0
        while self.epoch < ts.epochs:
            if stop_after is not None and ran >= stop_after:
                return self.history[-1] if self.history else {}
            record = self.train_epoch()
            self.history.append(record)
            self.epoch += 1
            ran += 1
            self.run_dir.append_metrics(record)
            self.run_dir.save_checkpoint(self.state_dict(), self.epoch, keep=0)
            if self.verbose and is_main_process():
                skip = ("epoch", "lr", "train_seconds")
                parts = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k not in skip)
                print(
                    f"[{self.cfg.name}] epoch {self.epoch}/{ts.epochs} {parts} "
                    f"({record['train_seconds']:.0f} s)",
                    flush=True,
                )
        return self.finish()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> tuple[DetectionMetrics, list[dict[str, torch.Tensor]]]:
        d = self.cfg.data
        freqs = self.splits.train.frequencies()
        return evaluate_detector(self.detector, self.eval_set, d.protocol, d.max_dets, freqs)

    def finish(self, draw: bool = True) -> dict[str, Any]:
        """Evaluate the eval split and write ``final.json`` (and ``detections.png``): rank 0 does, the
        other ranks wait for it (a rank that left early and tore its process group down while rank 0 was
        still evaluating aborted now and then), and get ``{}``."""
        record: dict[str, Any] = {}
        if is_main_process():
            record = self._evaluate_and_write(draw)
        if is_distributed():
            barrier()
        return record

    def _evaluate_and_write(self, draw: bool) -> dict[str, Any]:
        metrics, outputs = self.evaluate()
        splits = self.splits
        stats = None
        st = self.detector.loss_module.stats if self.detector.loss_module is not None else None
        if isinstance(st, GradientStatistics):
            stats = {
                "pos": st.pos.tolist(),
                "neg": st.neg.tolist(),
                "ratio": st.ratio().tolist(),
                "steps": int(st.steps),
            }
        train_seconds = sum(r.get("train_seconds", 0.0) for r in self.history)
        record: dict[str, Any] = {
            "task": "detection",
            "name": self.cfg.name,
            "config": self.cfg.to_dict(),
            "config_hash": config_hash(self.cfg),
            "protocol": metrics.protocol,
            "metrics": metrics.summary,
            "per_class": [
                {"class": c.name, "category_id": c.id, "frequency": f, "train_images": int(n), "ap": ap}
                for c, f, n, ap in zip(
                    splits.train.categories,
                    splits.train.frequencies(),
                    splits.train.image_counts(),
                    metrics.per_class_ap.tolist(),
                    strict=True,
                )
            ],
            "num_detections": metrics.num_detections,
            "data_sha256": splits.sha256,
            "train_images": len(self.train_set),
            "eval_split": self.cfg.data.eval_split,
            "epochs": self.epoch,
            "iterations": self.iteration,
            "train_seconds": train_seconds,
            "wall_time_s": train_seconds,  # the training time summed over this run's invocations
            "mean_step_s": float(np.mean(self.step_times)) if self.step_times else None,
            "history": self.history,
            "gradient_statistics": stats,
            "world_size": world_size(),
            "resumes": self.resumes,
        }
        self.run_dir.write_json(FINAL, record, indent=1)
        if draw:
            try:
                draw_detections(self.eval_set, outputs, self.run_dir.file(DETECTIONS_FIGURE))
            except Exception as e:  # pragma: no cover - drawing is a convenience
                print(f"[{self.cfg.name}] could not draw detections: {e}")
        if self.verbose:
            m = {k: f"{100 * v:.1f}" for k, v in metrics.summary.items()}
            print(
                f"[{self.cfg.name}] {self.cfg.data.eval_split}: AP {m['AP']} APr {m['APr']} APc {m['APc']} "
                f"APf {m['APf']} (training {train_seconds:.0f} s)",
                flush=True,
            )
        return record


DETECTIONS_FIGURE = "detections.png"


def run_detection(
    cfg: DetectionRunConfig,
    out_dir: str | Path,
    verbose: bool = True,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate one detector (:class:`DetectionRun`); returns the record written to final.json."""
    return DetectionRun(cfg, out_dir, verbose).fit(resume=resume, overwrite=overwrite, stop_after=stop_after)


def is_detection_checkpoint(state: dict[str, Any]) -> bool:
    return state.get("task") == "detection"


def evaluate_checkpoint(
    path: str | Path, output: str | Path, data_overrides: dict[str, Any] | None = None, verbose: bool = True
) -> dict[str, Any]:
    """``gradtail eval`` of a detection checkpoint: rebuild the run from the checkpoint's config (data
    settings may be overridden: another ``eval_split``, the images under another ``image_root``; the
    data must hash as at training), load the weights and write ``final.json`` into ``output``."""
    state = load_checkpoint(Path(path))
    if not is_detection_checkpoint(state):
        raise ConfigError(f"{path} is not a detection checkpoint")
    raw = _merge(state["config"], {"data": data_overrides or {}})
    run = DetectionRun(DetectionRunConfig.from_dict(raw), output, verbose)
    if state.get("data_sha256") != run.splits.sha256:
        raise ConfigError(f"{path} was trained on other data (data hash mismatch)")
    run.detector.load_state_dict(state["model"])
    run.epoch, run.iteration = int(state["epoch"]), int(state["iteration"])
    run.history, run.step_times = list(state["history"]), list(state["step_times"])
    run.run_dir.ensure_writable()
    return run.finish()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_detection_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a detection config file; ``extends: other.yaml`` (or ``base:``, its older
    spelling; relative to the file) is merged under it, section by section."""
    from gradtail.config import read_yaml_mapping

    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(
            f"detection configs extend each other in a cycle: {' -> '.join(map(str, (*_seen, path)))}"
        )
    raw = read_yaml_mapping(path, "config file", f" (extended by {_seen[-1]})" if _seen else "")
    parent = raw.pop("extends", None) or raw.pop("base", None)
    raw.pop("base", None)
    if parent is not None:
        base = load_detection_dict(path.parent / str(parent), (*_seen, path))
        base.pop("name", None)
        raw = _merge(base, raw)
    return raw


def load_detection_config(
    path: str | Path, overrides: dict[str, Any] | None = None, sets: Sequence[str] | None = None
) -> DetectionRunConfig:
    """A detection YAML config (:func:`load_detection_dict`), then ``overrides`` (a nested mapping) and
    ``sets`` (``a.b=value`` strings, as ``gradtail train --set``) on top."""
    from gradtail.config import apply_overrides

    raw = _merge(load_detection_dict(path), overrides or {})
    raw.setdefault("name", Path(path).stem)
    return DetectionRunConfig.from_dict(apply_overrides(raw, list(sets or [])))

"""Object detection (docs/detection.md): torchvision's Faster R-CNN, RetinaNet and FCOS with the
registry's loss as their classification term, per sampled RoI (two-stage) or per anchor (one-stage),
evaluated with the official LVIS / COCO APIs; validation AP selects the epoch and the trial.

The task's section (``detection:``) is :class:`~gradtail.data.detection.builder.DetectionOptions`: the
annotation files or the Fashion-MNIST benchmark, the training transforms, the evaluation protocol.
``model.name`` is the architecture (``faster_rcnn``, ``retinanet``, ``fcos``) and ``model.params`` the
detector's settings (:class:`~gradtail.models.detection.DetectorSpec`: backbone, width, anchors, RPN and
RoI sampling, test-time thresholds); ``loss`` the classification term: ``ce``, ``sigmoid_eql`` (EQLv2),
``softmax_eql``, ``seesaw`` in the two-stage head; ``efl``, ``eqfl`` in the one-stage heads, or
``sigmoid_focal``, the one-stage baseline exactly as torchvision ships it (its own head and loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from gradtail.contracts import (
    TASKS,
    Accepts,
    EvalReport,
    EvalView,
    ExportRequest,
    LossContract,
    PredictRequest,
    RunData,
    StepContext,
    StepLoss,
    TaskContract,
)
from gradtail.data.detection.builder import DETECTION_DATASETS, DetectionData, DetectionOptions
from gradtail.data.samplers import SAMPLERS
from gradtail.distributed import all_gather_objects, broadcast_object, is_main_process, shard
from gradtail.errors import ConfigError
from gradtail.export import detection as detection_export
from gradtail.losses import create_loss
from gradtail.metrics.detection import detection_records, evaluate_detections
from gradtail.models.detection import ARCHS, Detector, DetectorSpec, build_detector
from gradtail.models.detection.heads import ONE_STAGE_LOSSES, TWO_STAGE_LOSSES, one_stage_loss, two_stage_loss
from gradtail.predict import detection as detection_predict
from gradtail.registry import Registry, check_call_params
from gradtail.report import detection as detection_report
from gradtail.report.table import DETECTION_COLUMNS, DETECTION_KEYS, format_percent, run_rows
from gradtail.tasks.spaces import method_search_space

# DetectorSpec fields the run config sets elsewhere
SPEC_SET_ELSEWHERE = {
    "arch": "model.name",
    "num_classes": "the dataset",
    "loss": "loss.name",
    "loss_params": "loss.params",
}


@TASKS.register("detection")
class DetectionTask(TaskContract):
    """Object detection (module docstring)."""

    name: ClassVar[str] = "detection"
    options: ClassVar[type | None] = DetectionOptions
    defaults: ClassVar[Mapping[str, Any]] = {
        "data": {"dataset": "fm_detection"},
        "model": {"name": "faster_rcnn"},
        "loss": {"name": "ce"},
        "optim": {
            "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 8, "epochs": 12,
            "schedule": "multistep", "warmup_epochs": 0, "warmup_iters": 50, "grad_clip": 10.0,
        },
        "train": {"amp": "none"},
        "eval": {"batch_size": 16},
    }  # fmt: skip
    data_keys: ClassVar[frozenset[str] | None] = frozenset(
        {"dataset", "data_dir", "download", "sampler", "sampler_params"}
    )
    resume_safe: ClassVar[frozenset[str]] = frozenset(
        {"detection.image_root", "detection.benchmark_root", "detection.draw"}
    )
    selection_metric: ClassVar[str] = "AP"
    objectives: ClassVar[tuple[str, ...]] = ("AP", "APr", "AP50", "APc", "APf")
    # what the instance segmentation task (a subclass) replaces: its datasets and architectures, and how
    # its one-line errors name the task's heads, the task and the terms of its loss
    datasets: ClassVar[Registry[Any]] = DETECTION_DATASETS
    archs: ClassVar[tuple[str, ...]] = ARCHS
    heads_text: ClassVar[str] = "a detector's heads are its architecture's"
    task_text: ClassVar[str] = "detection"
    terms_text: ClassVar[str] = "RPN and box terms"

    @classmethod
    def catalog(cls) -> dict[str, list[str]]:
        return {
            "datasets": DETECTION_DATASETS.names(),
            "models": [
                f"faster_rcnn (losses {', '.join(TWO_STAGE_LOSSES)})",
                f"retinanet, fcos (losses {', '.join(ONE_STAGE_LOSSES)})",
            ],
        }

    # ------------------------------------------------------------------ configuration
    @property
    def two_stage(self) -> bool:
        return self.cfg.model.name == "faster_rcnn"

    def accepts(self) -> Accepts:
        losses = TWO_STAGE_LOSSES if self.two_stage else ONE_STAGE_LOSSES
        return Accepts(
            losses=tuple(losses), regularizers=(), update_rules=("plain",), posthoc=(),
            samplers=tuple(SAMPLERS.names()),
        )  # fmt: skip

    def check(self) -> None:
        cfg = self.cfg
        self.datasets.get(cfg.data.dataset)
        if cfg.model.name not in self.archs:
            raise ConfigError(
                f"model.name for task '{self.name}' must be one of {', '.join(self.archs)}, "
                f"got {cfg.model.name!r}"
            )
        check_call_params(
            DetectorSpec,
            cfg.model.params,
            "model.params",
            f"detector {cfg.model.name!r}",
            reserved=SPEC_SET_ELSEWHERE,
        )
        # architecture, backbone, box loss, anchors (the loss: Accepts; the classes: the data)
        DetectorSpec(arch=cfg.model.name, num_classes=1, **cfg.model.params).check()
        self.check_loss()
        t, default = cfg.train, type(cfg.train)()
        for key in (
            "channels_last",
            "compile",
            "init_from",
            "freeze_backbone",
            "reset_classifier",
            "sync_batchnorm",
        ):
            if getattr(t, key) != getattr(default, key):
                raise ConfigError(f"train.{key} is not supported by task '{self.name}'")
        if cfg.model.head != "linear":
            raise ConfigError(f"model.head is a classification setting; {self.heads_text}")
        if cfg.eval.many_threshold is not None:
            raise ConfigError("eval.many_threshold / few_threshold are classification groups; "
                              f"{self.task_text} groups classes by LVIS frequency")  # fmt: skip
        if cfg.optim.accumulation_steps != 1:
            raise ConfigError(f"optim.accumulation_steps is not supported by task '{self.name}' (the "
                              f"detector's {self.terms_text} normalise per batch)")  # fmt: skip

    def check_loss(self) -> None:
        """What the loss settings may not be beside what :meth:`accepts` rules out: ``sigmoid_focal``,
        torchvision's own one-stage head and loss, takes no parameters."""
        if self.cfg.loss.name == "sigmoid_focal" and self.cfg.loss.params:
            raise ConfigError(
                "loss.params: sigmoid_focal in a one-stage detector is torchvision's own head and loss "
                "(alpha 0.25, gamma 2); it takes no parameters"
            )

    def spec(self, num_classes: int) -> DetectorSpec:
        """The detector settings of the run (``model.name``, ``model.params``, ``loss``)."""
        cfg = self.cfg
        loss, params = cfg.loss.name, dict(cfg.loss.params)
        return DetectorSpec(
            arch=cfg.model.name, num_classes=num_classes, loss=loss, loss_params=params, **cfg.model.params
        )

    # ------------------------------------------------------------------ building
    def build_data(self) -> RunData:
        data: RunData = self.datasets.get(self.cfg.data.dataset)(self.cfg.data, self.cfg.options)
        return data

    def build_loss(self, data: RunData) -> LossContract:
        """The registry's loss as the head applies it: over C + 1 channels (background last) in the
        two-stage head, C sigmoid channels with background / ignore labels in the one-stage heads."""
        loss = self.cfg.loss
        c = data.num_classes
        if self.two_stage:
            # class_counts: the federated loss's sampling weights (training images per class)
            return two_stage_loss(loss.name, c, loss.params, class_counts=data.class_counts)
        if (
            loss.name == "sigmoid_focal"
        ):  # torchvision's head computes it; the module documents what is trained
            return create_loss("sigmoid_focal", c, background_label=True, ignore_index=-1)
        return one_stage_loss(loss.name, c, loss.params)

    def build_model(self, data: RunData, loss: LossContract) -> nn.Module:
        return build_detector(self.spec(data.num_classes), loss)  # type: ignore[arg-type]

    def observed_classes(self, data: RunData, loss: LossContract) -> int:
        """The channels of the classification term: C + 1 for the two-stage softmax losses and EQLv2
        (background / objectness last), C for the one-stage sigmoids."""
        if not self.two_stage:
            return int(data.num_classes)
        return int(data.num_classes) + 1

    def attach_observers(self, model: nn.Module, observers: Any) -> bool:
        """The classification term's (logits, labels); torchvision's own one-stage head (``sigmoid_focal``)
        has no term to observe."""
        assert isinstance(model, Detector)
        return model.set_observers(list(observers))

    # ------------------------------------------------------------------ the step
    def train_loss(self, ctx: StepContext, inputs: Any, targets: Any) -> StepLoss:
        """The detector's loss terms (RPN / box / classification, or the one-stage heads'), summed."""
        with ctx.autocast():
            parts = ctx.model(inputs, targets)
        loss = sum(parts.values())
        return StepLoss(loss, None, {k: v.detach() for k, v in parts.items()})

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_split(self, view: EvalView, split: str) -> tuple[list[dict[str, Any]], Any]:
        """COCO / LVIS result records of every image of a split, and the split: each process predicts its
        shard of the images (:func:`gradtail.distributed.shard`); every process gets all the records, in
        image order."""
        detector = view.model
        detector.eval()
        ev = view.data.eval_loader(split, view.cfg, view.device)
        per_image: list[list[dict[str, Any]]] = []  # this shard's images, in order
        bs = view.cfg.eval.batch_size
        n = len(ev.dataset)
        mine = list(shard(n))
        for start in range(0, len(mine), bs):
            items = [ev.dataset[i] for i in mine[start : start + bs]]
            with view.autocast():
                outs = detector([im.to(view.device) for im, _ in items])
            for (_, target), out in zip(items, outs, strict=True):
                per_image.append(self.image_records(view, target, out))
        shards = all_gather_objects(per_image)  # image g is rank g % W's (g // W)-th
        w = len(shards)
        return [r for g in range(n) for r in shards[g % w][g // w]], ev

    def image_records(
        self, view: EvalView, target: dict[str, Any], out: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The result records of one image from the detector's output for it (boxes, scores, labels)."""
        out = {k: v.detach().float().cpu() for k, v in out.items()}
        ids = view.data.category_ids
        return detection_records(target["image_id"], out["boxes"], out["scores"], out["labels"], ids)

    def score(self, view: EvalView, annotations: Any, records: list[dict[str, Any]]) -> EvalReport:
        """The metrics of a split's records (rank 0 alone calls it): AP / AP50 / AP75 / APs/m/l /
        APr/c/f through the configured protocol and evaluator."""
        o = view.cfg.options
        freqs = view.data.frequencies()
        return evaluate_detections(annotations, records, o.protocol, o.max_dets, freqs, o.evaluator)

    def evaluate(self, view: EvalView, split: str) -> EvalReport:
        """The split's metrics (:meth:`score`): the processes predict their shards, rank 0 scores the
        gathered results and hands the metrics to the others."""
        records, ev = self.predict_split(view, split)
        metrics = self.score(view, ev.annotations, records) if is_main_process() else None
        result: EvalReport = broadcast_object(metrics)
        return result

    def groups(self, view: EvalView) -> dict[str, Any]:
        data: DetectionData = view.data
        freqs = data.frequencies()
        classes = {g: [k for k, f in enumerate(freqs) if f == g] for g in ("r", "c", "f")}
        return {
            "rule": "lvis_frequency",
            "thresholds": {"rare": "1-10 training images", "common": "11-100", "frequent": "> 100"},
            "sizes": {g: len(v) for g, v in classes.items()},
            "classes": classes,
        }

    def draw_predictions(self, view: EvalView, path: Any) -> bool:
        if not view.cfg.options.draw or not view.data.has_split("test"):
            return False
        detector = view.model
        detector.eval()
        ev = view.data.eval_loader("test", view.cfg, view.device)
        count = min(6, len(ev.dataset))
        items = [ev.dataset[i] for i in range(count)]
        with torch.no_grad(), view.autocast():
            outs = detector([im.to(view.device) for im, _ in items])
        outs = [{k: v.detach().float().cpu() for k, v in o.items()} for o in outs]
        self.draw(view, items, outs, Path(path))
        return True

    def draw(
        self,
        view: EvalView,
        items: list[tuple[Any, dict[str, Any]]],
        outputs: list[dict[str, Any]],
        path: Path,
    ) -> None:
        """The first test images (``items``) with the detector's ``outputs`` for them, written to ``path``."""
        detection_report.draw_detections(items, outputs, view.data.class_names, path)

    def search_space(self) -> list[Any]:
        return method_search_space(self.cfg)

    def objective(self, val: Mapping[str, Any], name: str, weight: float = 0.5) -> float:
        if name not in self.objectives:
            return super().objective(val, name, weight)
        value = val.get(name)
        if value is None:
            raise ConfigError(f"tune objective {name!r}: undefined on the validation split (no such class)")
        return float(value)

    # ------------------------------------------------------------------ presentation
    def final_rows(self, final: Mapping[str, Any], label: str) -> tuple[list[str], list[list[str]]]:
        return list(DETECTION_COLUMNS), run_rows(final, label, DETECTION_KEYS)

    def headline(self, final: Mapping[str, Any]) -> str:
        last = final["last_epoch"]
        return ", ".join(f"{k} {format_percent(last.get(k))}" for k in ("AP", "APr", "APc", "APf"))

    def report(self) -> Any:
        return detection_report

    def predict(self, state: dict[str, Any], checkpoint: Path, request: PredictRequest) -> str:
        return detection_predict.run(self, state, checkpoint, request)

    def export(self, state: dict[str, Any], checkpoint: Path, request: ExportRequest) -> str:
        return detection_export.run(self, state, checkpoint, request)


__all__ = ["DetectionTask"]

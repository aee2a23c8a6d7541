"""Instance segmentation (docs/instance.md; the spec: ``instance.md``): torchvision's Mask R-CNN with the
registry's loss as its box classifier, LVIS / COCO mask AP with box AP alongside; validation mask AP
selects the epoch and the trial.

The task is detection's (:class:`~gradtail.tasks.detection.DetectionTask`: the same loop, schedule, data
loader, RFS and class-aware samplers, evaluation protocol, one-line errors) with what differs:

- its section ``instance_segmentation:`` (:class:`~gradtail.data.detection.instance.InstanceOptions`:
  the detection keys, the Fashion-MNIST instance benchmark, ``mask_threshold``);
- data with masks (``data.dataset``: ``fm_instance`` or ``coco_files``,
  :mod:`gradtail.data.detection.instance`);
- ``model.name: mask_rcnn`` (:class:`~gradtail.models.detection.DetectorSpec`: ``backbone`` ``tiny``,
  ``resnet50_fpn`` or ``resnet50_fpn_v2``, local ``checkpoint`` / ``backbone_checkpoint``);
- the box classifier's losses: ``ce``, ``sigmoid_eql`` (EQLv2), ``seesaw`` (mmdetection's LVIS head:
  normed-linear classifier, two objectness channels), ``federated``, ``softmax_eql``; the mask branch is
  torchvision's per-class BCE, untouched by them;
- evaluation: :func:`gradtail.metrics.instance.evaluate_instances` (mask AP, the run's primary metric,
  and ``box_*`` box AP), results with RLE masks (``gradtail predict``), masks drawn in ``predictions.png``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from gradtail.contracts import TASKS, EvalView, LossContract, PredictRequest, RunData, TaskContract
from gradtail.data.detection.instance import INSTANCE_DATASETS, InstanceData, InstanceOptions
from gradtail.errors import DataError
from gradtail.losses import create_loss
from gradtail.metrics.instance import InstanceMetrics, detector_records, evaluate_instances
from gradtail.models.detection import DetectorSpec
from gradtail.models.detection.detectors import INSTANCE_ARCHS
from gradtail.models.detection.heads import TWO_STAGE_LOSSES, two_stage_loss
from gradtail.predict import instance as instance_predict
from gradtail.registry import Registry
from gradtail.report import instance as instance_report
from gradtail.report.table import format_percent, run_rows
from gradtail.tasks.detection import DetectionTask

COLUMNS = ("method", "mask AP", "AP50", "APr", "APc", "APf", "box AP", "box APr")
KEYS = ("AP", "AP50", "APr", "APc", "APf", "box_AP", "box_APr")


@TASKS.register("instance_segmentation")
class InstanceSegmentationTask(DetectionTask):
    """Instance segmentation (module docstring)."""

    name: ClassVar[str] = "instance_segmentation"
    options: ClassVar[type | None] = InstanceOptions
    defaults: ClassVar[Mapping[str, Any]] = {
        **DetectionTask.defaults,
        "data": {"dataset": "fm_instance"},
        "model": {"name": "mask_rcnn"},
    }
    resume_safe: ClassVar[frozenset[str]] = frozenset(
        {
            "instance_segmentation.image_root",
            "instance_segmentation.benchmark_root",
            "instance_segmentation.draw",
        }
    )
    selection_metric: ClassVar[str] = "AP"  # mask AP
    objectives: ClassVar[tuple[str, ...]] = ("AP", "APr", "AP50", "APc", "APf", "box_AP")
    datasets: ClassVar[Registry[Any]] = INSTANCE_DATASETS
    archs: ClassVar[tuple[str, ...]] = INSTANCE_ARCHS
    heads_text: ClassVar[str] = "Mask R-CNN's heads are its own"
    task_text: ClassVar[str] = "instance segmentation"
    terms_text: ClassVar[str] = "RPN, box and mask terms"

    @classmethod
    def catalog(cls) -> dict[str, list[str]]:
        return {
            "datasets": INSTANCE_DATASETS.names(),
            "models": [f"mask_rcnn (losses {', '.join(TWO_STAGE_LOSSES)})"],
        }

    # ------------------------------------------------------------------ configuration
    @property
    def two_stage(self) -> bool:
        """Always (Mask R-CNN): :meth:`DetectionTask.accepts` takes the two-stage losses."""
        return True

    def check(self) -> None:
        """Detection's checks (:meth:`DetectionTask.check`, with this task's datasets, architectures and
        wording), then the section's own (``mask_threshold``)."""
        super().check()
        self.cfg.options.check()

    def check_loss(self) -> None:
        """Nothing beside :meth:`accepts`: Mask R-CNN has no stock one-stage head."""

    # ------------------------------------------------------------------ building
    def build_data(self) -> RunData:
        spec = DetectorSpec(arch=self.cfg.model.name, num_classes=1, **self.cfg.model.params)
        missing = spec.missing_weights()
        if missing:  # before the data (LVIS's files take minutes to read)
            raise DataError(f"model.params.{missing[0]}: weights file not found (nothing is downloaded)")
        return super().build_data()

    def build_loss(self, data: RunData) -> LossContract:
        """The registry's loss as Mask R-CNN's box classifier applies it: seesaw over the C categories of the
        normed-linear head (with ``seesaw_form`` objectness, the default here), the others as in Faster
        R-CNN (:func:`~gradtail.models.detection.heads.two_stage_loss`); the federated loss's class counts
        are the training file's ``image_count`` (counted from the data when a category lacks it)."""
        loss = self.cfg.loss
        c = int(data.num_classes)
        if self.spec(c).seesaw_objectness:
            return create_loss("seesaw", c, **loss.params)
        counts = data.federated_counts() if isinstance(data, InstanceData) else data.class_counts
        return two_stage_loss(loss.name, c, loss.params, class_counts=counts)

    def observed_classes(self, data: RunData, loss: LossContract) -> int:
        """C + 1 channels (background / objectness last), C for the seesaw head (its category channels of
        the foreground RoIs)."""
        c = int(data.num_classes)
        return c if self.spec(c).seesaw_objectness else c + 1

    # ------------------------------------------------------------------ evaluation
    def image_records(
        self, view: EvalView, target: dict[str, Any], out: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """One image's results records: box, score and RLE mask (binarised at ``mask_threshold``); the
        images are predicted in shards by :meth:`DetectionTask.predict_split`."""
        threshold = view.cfg.options.mask_threshold
        return detector_records(target["image_id"], out, view.data.category_ids, threshold)

    def score(self, view: EvalView, annotations: Any, records: list[dict[str, Any]]) -> InstanceMetrics:
        """Mask AP / AP50 / AP75 / APs/m/l / APr/c/f and the same of the boxes (rank 0; the evaluator of
        ``instance.evaluator``)."""
        o = view.cfg.options
        freqs = view.data.frequencies()
        return evaluate_instances(annotations, records, o.protocol, o.max_dets, freqs, o.evaluator)

    def draw(
        self,
        view: EvalView,
        items: list[tuple[Any, dict[str, Any]]],
        outputs: list[dict[str, Any]],
        path: Path,
    ) -> None:
        """The first test images with Mask R-CNN's predicted masks (binarised at ``mask_threshold``)."""
        threshold = view.cfg.options.mask_threshold
        instance_report.draw_instances(items, outputs, view.data.class_names, path, threshold=threshold)

    # ------------------------------------------------------------------ presentation
    def final_rows(self, final: Mapping[str, Any], label: str) -> tuple[list[str], list[list[str]]]:
        return list(COLUMNS), run_rows(final, label, KEYS)

    def headline(self, final: Mapping[str, Any]) -> str:
        last = final["last_epoch"]
        mask = ", ".join(f"{k} {format_percent(last.get(k))}" for k in ("AP", "APr", "APc", "APf"))
        return f"mask {mask}; box AP {format_percent(last.get('box_AP'))}"

    def report(self) -> Any:
        return instance_report

    def predict(self, state: dict[str, Any], checkpoint: Path, request: PredictRequest) -> str:
        return instance_predict.run(self, state, checkpoint, request)

    def export(self, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
        """Not wired for Mask R-CNN (its masks and RLE output have no exported form here): the contract's
        one-line refusal, not detection's box exporter."""
        return TaskContract.export(self, state, checkpoint, request)


__all__ = ["InstanceSegmentationTask"]

"""``gradtail predict`` for instance segmentation (docs/instance.md §4): a results file in the LVIS / COCO
results format, a JSON list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score",
"segmentation": {"size": [h, w], "counts": str}}`` (compressed RLE, the mask binarised at
``instance_segmentation.mask_threshold``), from a checkpoint alone; with ``--draw``, the images with their
top masks and boxes drawn beside it.

Inputs are image files (RGB as they are; image ids 1..N in the order given, listed with their files in
``<output>.images.json``) or ``--split val|test`` of the run's own data (rebuilt from its config, the
annotation files' image ids): scoring that file with the official API (``LVISEval(gt, dt, "segm")``) gives
the mask AP of ``gradtail eval`` (exactly, and APs / APm / APl too once each record's ``bbox`` is left out,
as detectron2's evaluator does: docs/instance.md §4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from gradtail.data.detection.masks import decode_segmentation
from gradtail.metrics.instance import detector_records
from gradtail.predict.detection import DetectionPredictor, Drawn, box_outputs, drawn_records


class InstancePredictor(DetectionPredictor):
    """Detection's predictor (:class:`~gradtail.predict.detection.DetectionPredictor`) whose records carry
    the masks, binarised at ``instance_segmentation.mask_threshold``, and whose drawings show them."""

    what: ClassVar[str] = "instance segmentation"

    def image_records(self, image_id: int, output: dict[str, Any], ids: list[int]) -> list[dict[str, Any]]:
        threshold = float(self.task.cfg.options.mask_threshold)
        return detector_records(image_id, output, ids, threshold)

    def blank_target(self, image: torch.Tensor, image_id: int) -> dict[str, Any]:
        return {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, *image.shape[1:]), "image_id": image_id}

    def draw(
        self, drawn: Drawn, records: list[dict[str, Any]], ids: list[int], names: list[str], path: Path
    ) -> None:
        from gradtail.report.instance import draw_instances

        draw_instances(drawn, _outputs_of(records, drawn, ids), names, path)


def run(task: Any, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """Predict and write the results (``request.output``, default standard output: the returned text)."""
    return InstancePredictor(task).run(state, checkpoint, request)


def _outputs_of(records: list[dict[str, Any]], drawn: Drawn, ids: list[int]) -> list[dict[str, torch.Tensor]]:
    """The records of the drawn images as detector outputs (boxes, scores, labels, masks), best first."""
    outputs = []
    for (image, _), recs in zip(drawn, drawn_records(records, drawn, 8), strict=True):
        h, w = image.shape[1:]
        masks = [decode_segmentation(r["segmentation"], h, w) for r in recs]
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
        outputs.append({**box_outputs(recs, ids), "masks": torch.from_numpy(stacked)[:, None]})
    return outputs


__all__ = ["InstancePredictor", "run"]

"""The report of an instance segmentation suite (docs/instance.md §5): mask AP / AP50 / APr / APc / APf and
box AP / APr (mean ± sample std over seeds, last epoch; validation-selected rows apart), mask AP per class
against the number of training images (LVIS rare / common / frequent groups marked), and each method's
test images with its predicted masks (the figure every run draws at its end, :func:`draw_instances`).

Files: ``results.json``, ``report.md`` with ``figure_<k>.png``, and a self-contained ``report.html``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gradtail.report.detection import (
    DetectionReport,
    draw_image_row,
    draw_prediction_box,
    top_predictions,
)

METRICS = ("AP", "AP50", "APr", "APc", "APf", "box_AP", "box_APr", "box_APc", "box_APf")
HEADERS = ("method", "mask AP", "AP50", "APr", "APc", "APf", "box AP", "box APr", "box APc", "box APf")


class InstanceReport(DetectionReport):
    """Detection's report (:class:`~gradtail.report.detection.DetectionReport`) with mask AP as its primary
    metric, box AP beside it, both per-class lists in the run records, and the masks' wording."""

    task: ClassVar[str] = "instance_segmentation"
    metrics: ClassVar[tuple[str, ...]] = METRICS
    headers: ClassVar[tuple[str, ...]] = HEADERS
    per_class_keys: ClassVar[tuple[str, ...]] = ("per_class_ap", "box_per_class_ap")
    ap_name: ClassVar[str] = "mask AP"
    evaluated: ClassVar[str] = "mask AP (segm; box AP alongside)"
    lead_metrics: ClassVar[str] = "mask AP and box AP"
    figure_title: ClassVar[str] = "Mask AP per class against training frequency"
    predictions_caption: ClassVar[str] = (
        "Ground-truth outlines in green; the top predicted masks tinted, with class and score."
    )

    def where(self, subset: dict[str, Any]) -> str:
        if subset.get("benchmark_root"):
            return f"the Fashion-MNIST instance benchmark ({subset.get('benchmark_root')})"
        return f"annotation files {subset.get('annotation_files')}"

    def schedule(self, optim: dict[str, Any]) -> str:
        return str(optim["schedule"])

    def sampler(self, data: dict[str, Any]) -> str:
        params = data.get("sampler_params")
        return f"{data['sampler']}{' ' + str(params) if params else ''}"


#: Instance segmentation's report: the task's report module is this module, its functions the methods below.
REPORT = InstanceReport()
build_results = REPORT.build_results
write_report = REPORT.write_report
table = REPORT.table


def draw_instances(
    items: list[tuple[Any, dict[str, Any]]],
    outputs: list[dict[str, Any]],
    names: list[str],
    path: Path,
    top: int = 4,
    min_score: float = 0.1,
    threshold: float = 0.5,
) -> None:
    """A row of test images with the ground-truth outlines (green) and the top predicted masks (tinted, with
    their box, class and score): what every instance segmentation run writes at its end
    (``predictions.png``)."""
    from matplotlib import colormaps

    colors = colormaps["tab10"]

    def draw(ax: Any, image: Any, target: dict[str, Any], out: dict[str, Any]) -> None:
        rgb = image.permute(1, 2, 0).float().numpy().clip(0, 1).copy()
        keep = top_predictions(out, top, min_score)
        for rank, i in enumerate(keep):
            mask = out["masks"][i, 0].numpy() >= threshold
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.asarray(colors(rank % 10)[:3])
        ax.imshow(rgb)
        for gt in np.asarray(target.get("masks", np.zeros((0, 1, 1)))):
            if gt.any():
                ax.contour(gt.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        for rank, i in enumerate(keep):
            draw_prediction_box(ax, out, i, names, colors(rank % 10), 0.8)

    title = f"test images: ground truth (green outlines), predicted masks (score >= {min_score:.1f})"
    draw_image_row(items, outputs, draw, title, path)


__all__ = [
    "HEADERS",
    "METRICS",
    "REPORT",
    "InstanceReport",
    "build_results",
    "draw_instances",
    "table",
    "write_report",
]

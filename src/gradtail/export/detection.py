"""``gradtail export`` for detection: the run's detector as ONNX, the format torchvision's detectors
export to (``torch.onnx.export`` through the TorchScript-based exporter, opset 17, as torchvision documents
for Faster R-CNN, RetinaNet and FCOS): one RGB image ``images`` (3, H, W) float32 in [0, 1], any size (the
detector resizes and normalises inside) -> ``boxes`` (K, 4) [x1, y1, x2, y2] in the image's pixels,
``labels`` (K,) int64 class indices 0..C-1 (the sidecar maps them to the dataset's category ids and names)
and ``scores`` (K,). TorchScript is refused: gradtail's detection heads are not scriptable, and
torchvision does not support tracing its detectors. The task takes no post-hoc adjuster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtail.errors import ConfigError
from gradtail.export.common import output_paths, run_exported, write_onnx, write_sidecar


class ExportedDetector(nn.Module):
    """One image -> (boxes, labels, scores) of the detector in eval mode."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["labels"], out["scores"]


def match(
    got: list[torch.Tensor], want: tuple[torch.Tensor, ...], min_score: float
) -> dict[str, Any]:
    """How the exported detections compare with PyTorch's on the same image, for the detections scoring
    at least ``min_score`` (below it the order of near-equal scores is arbitrary): their counts, whether
    the labels agree in order, and the largest box and score differences."""
    keep_a = got[2] >= min_score
    keep_b = want[2] >= min_score
    a = [t[keep_a] for t in got]
    b = [t[keep_b] for t in want]
    record: dict[str, Any] = {"min_score": min_score, "detections": [int(keep_a.sum()), int(keep_b.sum())]}
    if a[0].shape == b[0].shape:
        record["labels_equal"] = bool(torch.equal(a[1].long(), b[1].long()))
        record["max_box_difference"] = float((a[0] - b[0]).abs().max()) if a[0].numel() else 0.0
        record["max_score_difference"] = float((a[2] - b[2]).abs().max()) if a[2].numel() else 0.0
    return record


def run(task: Any, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """``gradtail export`` of a detection checkpoint (module docstring)."""
    from gradtail.predict import CheckpointData, load_weights

    if request.format != "onnx":
        raise ConfigError(
            "detection exports to ONNX, the format torchvision's detectors export to (--format onnx); "
            "TorchScript is refused: gradtail's detection heads are not scriptable"
        )
    if request.posthoc:
        raise ConfigError("--posthoc: detection takes no post-hoc adjuster (nothing to fold in)")
    model_path, sidecar = output_paths(request.format, request.output, checkpoint)
    data = CheckpointData.from_state(state, checkpoint)
    loss = task.build_loss(data)
    detector = task.build_model(data, loss)
    load_weights(detector, state["model"], checkpoint)
    exported = ExportedDetector(detector.cpu().eval()).eval()
    spec = task.spec(data.num_classes)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, spec.min_size, spec.max_size, generator=gen)
    write_onnx(exported, (image,), model_path, ["images"], ["boxes", "labels", "scores"],
               dynamic_axes={"images": [1, 2], "boxes": [0], "labels": [0], "scores": [0]}, legacy=True,
               what=f"the detector of {checkpoint}")  # fmt: skip
    with torch.no_grad():
        want = exported(image)
    got = run_exported("onnx", model_path, {"images": image})
    check: dict[str, Any] = {"runtime": None}
    if got is not None:
        check = {"runtime": "onnxruntime"} | match(got, want, 0.05)
    prep = data.preprocessing
    write_sidecar(sidecar, {
        "gradtail_export": 1,
        "task": task.name,
        "format": "onnx",
        "model": model_path.name,
        "checkpoint": str(checkpoint),
        "epoch": int(state["epoch"]),
        "inputs": [{"name": "images", "shape": [3, "height", "width"], "dtype": "float32",
                    "what": "one RGB image, pixel / 255 (the detector resizes and normalises inside)"}],
        "outputs": [
            {"name": "boxes", "shape": ["detections", 4], "dtype": "float32",
             "what": "x1, y1, x2, y2 in pixels"},
            {"name": "labels", "shape": ["detections"], "dtype": "int64", "what": "class index 0..C-1"},
            {"name": "scores", "shape": ["detections"], "dtype": "float32"},
        ],
        "input_size": [3, None, None],
        "normalisation": {"formula": "pixel / 255; the model normalises inside",
                          "mean": list(spec.image_mean), "std": list(spec.image_std)},
        "detector": {"arch": spec.arch, "min_size": spec.min_size, "max_size": spec.max_size,
                     "score_thresh": spec.score_thresh, "detections_per_img": spec.detections_per_img},
        "class_names": data.class_names,
        "category_ids": [int(v) for v in prep.get("category_ids", [])],
        "posthoc": {"name": None, "applied": "none"},
        "check": check,
    })  # fmt: skip
    return f"onnx detector -> {model_path} (sidecar {sidecar})"


__all__ = ["ExportedDetector", "match", "run"]

"""``gradtail export`` for semantic segmentation: the run's model as ONNX or TorchScript, for images of
any size: ``input`` (N, C, H, W) float32 normalised as the sidecar says -> ``logits`` (N, classes, H, W)
as the run's loss reads them at test time, and ``labels`` (N, H, W) int64, their per-pixel argmax (what
``gradtail predict`` writes as label maps). The task takes no post-hoc adjuster. A run that infers by
sliding window (``segmentation.inference: slide``) exports the network itself: the sidecar gives the
window and stride to average it over, as ``gradtail.tasks.segmentation.slide_inference`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtail.errors import ConfigError
from gradtail.export.common import (
    ClassAffine,
    affine_of,
    check_exported,
    output_paths,
    write_onnx,
    write_sidecar,
    write_torchscript,
)

TOLERANCE = 1e-4
EXAMPLE_SIZE = 64  # the traced example's height and width (the exported graph takes any size)


class ExportedSegmenter(nn.Module):
    """``input`` -> (``logits``, ``labels``): the model's dense logits through the loss's test-time
    transform (a per-class affine map; absent when it is the identity) and their argmax."""

    def __init__(self, model: nn.Module, affine: ClassAffine | None) -> None:
        super().__init__()
        self.model = model
        self.affine = affine

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x).float()
        if self.affine is not None:
            logits = self.affine(logits)
        return logits, logits.argmax(1)


def build(task: Any, state: dict[str, Any], checkpoint: Path) -> tuple[ExportedSegmenter, Any, bool]:
    """The module to export (the checkpoint's model and its loss's test-time transform), the
    checkpoint's data record (:class:`gradtail.predict.CheckpointData`) and whether that transform is the
    identity."""
    from gradtail.predict import CheckpointData, load_weights

    data = CheckpointData.from_state(state, checkpoint)
    loss = task.build_loss(data)
    model = task.build_model(data, loss)
    load_weights(model, state["model"], checkpoint)
    load_weights(loss, state["loss"], checkpoint, "loss")
    model, loss = model.cpu().eval(), loss.cpu().eval()
    model = model.to(memory_format=torch.contiguous_format)
    c = data.num_classes

    def dense(z: torch.Tensor) -> torch.Tensor:  # the loss's transform on (N, C) as 1x1 maps
        out: torch.Tensor = loss.inference_logits(z[:, :, None, None])
        return out[:, :, 0, 0]

    scale, offset = affine_of(dense, c, f"the test-time transform of loss {type(loss).__name__}")
    identity = bool((scale == 1).all()) and bool((offset == 0).all())
    exported = ExportedSegmenter(model, None if identity else ClassAffine(scale, offset, c)).eval()
    with torch.no_grad():  # the module reproduces the run's test-time logits
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, data.in_channels, EXAMPLE_SIZE, EXAMPLE_SIZE, generator=gen)
        if not float((exported(x)[0] - loss.inference_logits(model(x).float())).abs().max()) <= TOLERANCE:
            raise ConfigError("the exported module does not reproduce the model's test-time logits")
    return exported, data, identity


def run(task: Any, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """``gradtail export`` of a segmentation checkpoint (module docstring)."""
    if request.posthoc:
        raise ConfigError("--posthoc: segmentation takes no post-hoc adjuster (nothing to fold in)")
    model_path, sidecar = output_paths(request.format, request.output, checkpoint)
    exported, data, identity = build(task, state, checkpoint)
    c = data.num_classes
    size = task.window or (EXAMPLE_SIZE, EXAMPLE_SIZE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, data.in_channels, *size, generator=gen)
    with torch.no_grad():
        want = exported(x)
    if request.format == "onnx":
        dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
        write_onnx(exported, (x,), model_path, ["input"], ["logits", "labels"], dynamic_shapes=(dims,),
                   what=f"the model of {checkpoint}")  # fmt: skip
    else:
        write_torchscript(exported, (x,), model_path, what=f"the model of {checkpoint}")
    other = torch.randn(1, data.in_channels, size[0] + 8, size[1] + 24, generator=gen)  # another size
    check = check_exported(request.format, model_path, {"input": x}, want, TOLERANCE)
    if request.format == "onnx" and check.get("runtime"):
        with torch.no_grad():
            more = check_exported(request.format, model_path, {"input": other}, exported(other), TOLERANCE)
        check["other_size"] = more
    prep = data.preprocessing
    write_sidecar(sidecar, {
        "gradtail_export": 1,
        "task": task.name,
        "format": request.format,
        "model": model_path.name,
        "checkpoint": str(checkpoint),
        "epoch": int(state["epoch"]),
        "inputs": [{"name": "input", "shape": ["batch", data.in_channels, "height", "width"],
                    "dtype": "float32"}],
        "outputs": [
            {"name": "logits", "shape": ["batch", c, "height", "width"], "dtype": "float32"},
            {"name": "labels", "shape": ["batch", "height", "width"], "dtype": "int64",
             "what": "per-pixel argmax of logits: class ids"},
        ],
        "input_size": [data.in_channels, None, None],
        "normalisation": {"formula": "(pixel / 255 - mean) / std, per channel", "mean": prep["mean"],
                          "std": prep["std"],
                          "resize_shorter_side_to": prep.get("resize")},
        "preprocessing": prep,
        "inference": {"mode": task.inference, "window": task.window, "stride": task.stride},
        "class_names": data.class_names,
        "posthoc": {"name": None, "applied": "the loss's test-time transform only" + (
            "" if identity else ": a per-class affine layer after the logits")},
        "ignore_index": task.ignore_index,
        "check": check,
    })  # fmt: skip
    return f"{request.format} model -> {model_path} (sidecar {sidecar})"


__all__ = ["ExportedSegmenter", "build", "run"]

"""``gradtail predict`` for semantic segmentation: one label-map PNG per image (a palette PNG whose pixel
values are the class ids, 0..C-1; a 16-bit grey PNG above 256 classes), from a checkpoint alone.

Inputs are image files (read as the run read its test images: the checkpoint's mode, shorter side
resized when the run resized, normalised with its mean / std; the label map has the size the model saw)
or ``--split val|test`` of the run's own data (rebuilt from its config; the maps are scored at the label
maps' size, as ``gradtail eval`` does). Inference is the run's: whole image or sliding window.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradtail.data.preprocess import collect_image_paths, open_image
from gradtail.environment import resolve_amp, resolve_device
from gradtail.errors import ConfigError
from gradtail.rundir import RunDirectory, atomic_write


def palette(num_classes: int) -> list[int]:
    """A flat RGB palette (768 values) with a distinct colour per class id (class 0 dark)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colors = [(13, 13, 13)] + [tuple(int(255 * v) for v in cmap(k % 20)[:3]) for k in range(1, 256)]
    return [c for rgb in colors for c in rgb]


def write_label_map(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """``labels`` (H, W) class ids as a PNG: palette mode up to 256 classes, else 16-bit grey."""
    from PIL import Image

    if num_classes <= 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette(palette(num_classes))
    else:
        image = Image.fromarray(labels.astype(np.uint16))

    def save(f: Any) -> None:
        image.save(f, format="PNG")

    atomic_write(path, save, "label map")


def _read(path: Path, preprocessing: dict[str, Any]) -> torch.Tensor:
    """An image file as the run read its test images: uint8 (1, C, H, W), the shorter side resized to
    ``resize`` (bilinear, rounded, as :class:`gradtail.data.segmentation.SegFileDataset` does)."""
    array = np.asarray(open_image(path, preprocessing["mode"]), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
    resize = preprocessing.get("resize")
    if resize:
        h, w = x.shape[-2:]
        s = resize / min(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).round().to(torch.uint8)
    return x


def run(task: Any, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """Write the label maps into the folder ``request.output``; return a line saying what was written."""
    from gradtail.predict import CheckpointData, load_weights

    if request.posthoc or request.top_k is not None or request.draw:
        raise ConfigError("--posthoc, --top-k and --draw are not options of segmentation predictions")
    if request.output is None:
        raise ConfigError("--output DIR is required for segmentation (one label-map PNG per image)")
    out = Path(request.output)
    RunDirectory(out).ensure_writable()
    data = CheckpointData.from_state(state, checkpoint)
    device = resolve_device(request.device)
    loss = task.build_loss(data)
    model = task.build_model(data, loss)
    load_weights(model, state["model"], checkpoint)
    load_weights(loss, state["loss"], checkpoint, "loss")
    model.to(device).eval()
    loss.to(device).eval()
    c = data.num_classes
    setting = task.cfg.train.amp
    amp = resolve_amp("auto" if setting == "fp16" and device.type != "cuda" else setting, device)

    def predict(x: torch.Tensor) -> torch.Tensor:
        cast = torch.autocast(device.type, amp.dtype) if amp.dtype else contextlib.nullcontext()
        with torch.no_grad(), cast:
            z = task.logits(model, x, c)
        return loss.inference_logits(z.float())

    written = 0
    if request.split is not None:
        if request.inputs:
            raise ConfigError("give image files or --split, not both")
        run_data = task.build_data()
        if not run_data.has_split(request.split):
            raise ConfigError(f"the run's data has no {request.split} split")
        for x, y in run_data.eval_loader(request.split, task.cfg, device):
            z = predict(x)
            if z.shape[-2:] != y.shape[-2:]:
                z = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)
            for label_map in z.argmax(1).cpu().numpy():
                write_label_map(out / f"{request.split}_{written:05d}.png", label_map, c)
                written += 1
        return f"{written} label map(s) of the {request.split} split -> {out}"
    paths = collect_image_paths(request.inputs)
    prep = data.preprocessing
    mean = torch.tensor(prep["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(prep["std"], dtype=torch.float32).view(1, -1, 1, 1)
    for path in paths:
        x = (_read(path, prep).float() / 255.0 - mean) / std
        label_map = predict(x.to(device)).argmax(1)[0].cpu().numpy()
        write_label_map(out / f"{path.stem}.png", label_map, c)
        written += 1
    return f"{written} label map(s) -> {out}"


__all__ = ["palette", "run", "write_label_map"]

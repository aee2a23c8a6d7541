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

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.data.detection.masks import decode_segmentation
from gradtail.data.preprocess import collect_image_paths, open_image
from gradtail.environment import resolve_amp, resolve_device
from gradtail.errors import ConfigError
from gradtail.metrics.instance import detector_records
from gradtail.rundir import write_text


def run(task: Any, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """Predict and write the results (``request.output``, default standard output: the returned text)."""
    from gradtail.contracts import EvalView
    from gradtail.predict import CheckpointData, load_weights

    if request.posthoc or request.top_k is not None:
        raise ConfigError("--posthoc and --top-k are not options of instance segmentation predictions")
    out = Path(request.output) if request.output else None
    if request.draw and out is None:
        raise ConfigError("--draw writes images beside the results file: give --output results.json")
    data = CheckpointData.from_state(state, checkpoint)
    device = resolve_device(request.device)
    loss = task.build_loss(data)
    model = task.build_model(data, loss)
    load_weights(model, state["model"], checkpoint)
    model.to(device).eval()
    setting = task.cfg.train.amp
    amp = resolve_amp("auto" if setting == "fp16" and device.type != "cuda" else setting, device)

    def autocast() -> Any:
        return torch.autocast(device.type, amp.dtype) if amp.dtype else contextlib.nullcontext()

    ids = [int(v) for v in data.preprocessing["category_ids"]]
    threshold = float(task.cfg.options.mask_threshold)
    files: list[dict[str, Any]] = []
    drawn: list[tuple[torch.Tensor, dict[str, Any]]] = []
    if request.split is not None:
        if request.inputs:
            raise ConfigError("give image files or --split, not both")
        run_data = task.build_data()
        if not run_data.has_split(request.split):
            raise ConfigError(f"the run's data has no {request.split} split")
        view = EvalView(model, run_data, task.cfg, device, autocast, loss, lambda s: None, lambda a, b: None,
                        lambda: None)  # fmt: skip
        records, ev = task.predict_split(view, request.split)
        drawn = [ev.dataset[i] for i in range(min(6, len(ev.dataset)))] if request.draw else []
    else:
        from torchvision.transforms.v2.functional import pil_to_tensor

        paths = collect_image_paths(request.inputs)
        bs = request.batch_size or task.cfg.eval.batch_size
        records = []
        for start in range(0, len(paths), bs):
            chunk = paths[start : start + bs]
            images = [pil_to_tensor(open_image(p, "RGB")).float() / 255.0 for p in chunk]
            with torch.no_grad(), autocast():
                outs = model([im.to(device) for im in images])
            for k, (path, image, o) in enumerate(zip(chunk, images, outs, strict=True)):
                image_id = start + k + 1
                records += detector_records(image_id, o, ids, threshold)
                files.append({"id": image_id, "file_name": str(path)})
                if request.draw and len(drawn) < 6:
                    empty = {
                        "boxes": torch.zeros(0, 4),
                        "masks": torch.zeros(0, *image.shape[1:]),
                        "image_id": image_id,
                    }
                    drawn.append((image, empty))
    text = json.dumps(records) + "\n"
    if out is None:
        return text
    write_text(out, text, "instance segmentation results")
    if files:
        write_text(out.with_suffix(".images.json"), json.dumps(files, indent=1) + "\n", "image list")
    if request.draw and drawn:
        from gradtail.report.instance import draw_instances

        draw_instances(drawn, _outputs_of(records, drawn, ids), data.class_names, out.with_suffix(".png"))
    return ""


def _outputs_of(
    records: list[dict[str, Any]], drawn: list[tuple[torch.Tensor, dict[str, Any]]], ids: list[int]
) -> list[dict[str, torch.Tensor]]:
    """The records of the drawn images as detector outputs (boxes, scores, labels, masks), best first."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    index = {c: k for k, c in enumerate(ids)}
    outputs = []
    for image, target in drawn:
        recs = sorted(by_image.get(int(target["image_id"]), []), key=lambda r: -r["score"])[:8]
        h, w = image.shape[1:]
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (r["bbox"] for r in recs)], np.float32)
        masks = [decode_segmentation(r["segmentation"], h, w) for r in recs]
        outputs.append({
            "boxes": torch.from_numpy(boxes.reshape(-1, 4)),
            "scores": torch.tensor([r["score"] for r in recs], dtype=torch.float32),
            "labels": torch.tensor([index[r["category_id"]] for r in recs], dtype=torch.long),
            "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), np.uint8))[:, None],
        })  # fmt: skip
    return outputs


__all__ = ["run"]

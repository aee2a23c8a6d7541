"""``gradtail predict`` for detection: a results file in the COCO / LVIS results format (a JSON list of
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, the dataset's category ids), from a
checkpoint alone; with ``--draw``, the images with their top boxes drawn beside it.

Inputs are image files (RGB as they are: the detector resizes and normalises inside; image ids 1..N in
the order given, listed with their files in ``<output>.images.json``) or ``--split val|test`` of the run's
own data (rebuilt from its config, the annotation files' image ids): scoring that file with the official
API gives exactly the AP ``gradtail eval`` reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.data.preprocess import collect_image_paths, open_image
from gradtail.environment import resolve_amp, resolve_device
from gradtail.errors import ConfigError
from gradtail.metrics.detection import detection_records
from gradtail.rundir import write_text


def run(task: Any, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """Predict and write the results (``request.output``, default standard output: the returned text)."""
    from gradtail.contracts import EvalView
    from gradtail.predict import CheckpointData, load_weights

    if request.posthoc or request.top_k is not None:
        raise ConfigError("--posthoc and --top-k are not options of detection predictions")
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
        import contextlib

        return torch.autocast(device.type, amp.dtype) if amp.dtype else contextlib.nullcontext()

    ids = [int(v) for v in data.preprocessing["category_ids"]]
    files: list[dict[str, Any]] = []
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
        records, drawn = [], []
        for start in range(0, len(paths), bs):
            chunk = paths[start : start + bs]
            images = [pil_to_tensor(open_image(p, "RGB")).float() / 255.0 for p in chunk]
            with torch.no_grad(), autocast():
                outs = model([im.to(device) for im in images])
            for k, (path, image, o) in enumerate(zip(chunk, images, outs, strict=True)):
                image_id = start + k + 1
                o = {n: v.detach().float().cpu() for n, v in o.items()}
                records += detection_records(image_id, o["boxes"], o["scores"], o["labels"], ids)
                files.append({"id": image_id, "file_name": str(path)})
                if request.draw and len(drawn) < 6:
                    drawn.append((image, {"boxes": torch.zeros(0, 4), "image_id": image_id}))
    text = json.dumps(records) + "\n"
    if out is None:
        return text
    write_text(out, text, "detection results")
    if files:
        write_text(out.with_suffix(".images.json"), json.dumps(files, indent=1) + "\n", "image list")
    if request.draw and drawn:
        from gradtail.report.detection import draw_detections

        by_image: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            by_image.setdefault(int(r["image_id"]), []).append(r)
        outputs = []
        index = {c: k for k, c in enumerate(ids)}
        for _, target in drawn:
            recs = sorted(by_image.get(int(target["image_id"]), []), key=lambda r: -r["score"])
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in recs)], np.float32)
            outputs.append({
                "boxes": torch.from_numpy(boxes.reshape(-1, 4)),
                "scores": torch.tensor([r["score"] for r in recs], dtype=torch.float32),
                "labels": torch.tensor([index[r["category_id"]] for r in recs], dtype=torch.long),
            })  # fmt: skip
        draw_detections(drawn, outputs, data.class_names, out.with_suffix(".png"))
    return ""


__all__ = ["run"]

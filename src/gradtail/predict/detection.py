"""``gradtail predict`` for detection: a results file in the COCO / LVIS results format (a JSON list of
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, the dataset's category ids), from a
checkpoint alone; with ``--draw``, the images with their top boxes drawn beside it.

Inputs are image files (RGB as they are: the detector resizes and normalises inside; image ids 1..N in
the order given, listed with their files in ``<output>.images.json``) or ``--split val|test`` of the run's
own data (rebuilt from its config, the annotation files' image ids): scoring that file with the official
API gives exactly the AP ``gradtail eval`` reports.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from gradtail.data.preprocess import collect_image_paths, open_image
from gradtail.environment import resolve_amp, resolve_device
from gradtail.errors import ConfigError
from gradtail.metrics.detection import detection_records
from gradtail.rundir import write_text

Drawn = list[tuple[torch.Tensor, dict[str, Any]]]  # the images drawn, with their (ground-truth) targets


def drawn_records(
    records: list[dict[str, Any]], drawn: Drawn, top: int | None = None
) -> list[list[dict[str, Any]]]:
    """Each drawn image's result records, best first (its ``top`` best; all for None)."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    return [sorted(by_image.get(int(t["image_id"]), []), key=lambda r: -r["score"])[:top] for _, t in drawn]


def box_outputs(records: list[dict[str, Any]], ids: list[int]) -> dict[str, torch.Tensor]:
    """Result records as a detector's output: ``boxes`` (x1, y1, x2, y2), ``scores``, ``labels`` (the
    contiguous class indices of the category ids ``ids``)."""
    index = {c: k for k, c in enumerate(ids)}
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)], np.float32)
    return {
        "boxes": torch.from_numpy(boxes.reshape(-1, 4)),
        "scores": torch.tensor([r["score"] for r in records], dtype=torch.float32),
        "labels": torch.tensor([index[r["category_id"]] for r in records], dtype=torch.long),
    }


class DetectionPredictor:
    """``gradtail predict`` of a detector (module docstring): the model rebuilt from the checkpoint, the
    images (files or a split of the run's data) predicted, the results and drawings written. The instance
    task's (:class:`gradtail.predict.instance.InstancePredictor`) extends it: its records carry masks."""

    what: ClassVar[str] = "detection"  # how messages name the predictions

    def __init__(self, task: Any) -> None:
        self.task = task

    def image_records(self, image_id: int, output: dict[str, Any], ids: list[int]) -> list[dict[str, Any]]:
        """The result records of one image from the detector's output for it."""
        o = {n: v.detach().float().cpu() for n, v in output.items()}
        return detection_records(image_id, o["boxes"], o["scores"], o["labels"], ids)

    def blank_target(self, image: torch.Tensor, image_id: int) -> dict[str, Any]:
        """The target drawn with an image given as a file: no ground truth."""
        return {"boxes": torch.zeros(0, 4), "image_id": image_id}

    def draw(
        self, drawn: Drawn, records: list[dict[str, Any]], ids: list[int], names: list[str], path: Path
    ) -> None:
        """The drawn images with their predictions (the records), written to ``path``."""
        from gradtail.report.detection import draw_detections

        draw_detections(drawn, [box_outputs(r, ids) for r in drawn_records(records, drawn)], names, path)

    def run(self, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
        """Predict and write the results (``request.output``, default standard output: the returned text)."""
        from gradtail.contracts import EvalView
        from gradtail.predict import CheckpointData, load_weights

        task = self.task
        if request.posthoc or request.top_k is not None:
            raise ConfigError(f"--posthoc and --top-k are not options of {self.what} predictions")
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
        files: list[dict[str, Any]] = []  # the image files given, with their ids
        if request.split is not None:
            if request.inputs:
                raise ConfigError("give image files or --split, not both")
            run_data = task.build_data()
            if not run_data.has_split(request.split):
                raise ConfigError(f"the run's data has no {request.split} split")
            # predict / score / group_rule are the classification trainer's: unused by predict_split
            unused = (lambda s: None, lambda a, b: None, lambda: None)
            view = EvalView(model, run_data, task.cfg, device, autocast, loss, *unused)
            records, ev = task.predict_split(view, request.split)
            drawn = [ev.dataset[i] for i in range(min(6, len(ev.dataset)))] if request.draw else []
        else:
            records, files, drawn = self.predict_files(model, device, autocast, ids, request)
        text = json.dumps(records) + "\n"
        if out is None:
            return text
        write_text(out, text, f"{self.what} results")
        if files:
            write_text(out.with_suffix(".images.json"), json.dumps(files, indent=1) + "\n", "image list")
        if request.draw and drawn:
            self.draw(drawn, records, ids, data.class_names, out.with_suffix(".png"))
        return ""

    def predict_files(
        self,
        model: Any,
        device: torch.device,
        autocast: Callable[[], Any],
        ids: list[int],
        request: Any,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Drawn]:
        """The records of the image files ``request.inputs`` (image ids 1..N in that order), the files with
        their ids, and the first six images to draw (with ``--draw``)."""
        from torchvision.transforms.v2.functional import pil_to_tensor

        paths = collect_image_paths(request.inputs)
        bs = request.batch_size or self.task.cfg.eval.batch_size
        records: list[dict[str, Any]] = []
        files: list[dict[str, Any]] = []
        drawn: Drawn = []
        for start in range(0, len(paths), bs):
            chunk = paths[start : start + bs]
            images = [pil_to_tensor(open_image(p, "RGB")).float() / 255.0 for p in chunk]
            with torch.no_grad(), autocast():
                outs = model([im.to(device) for im in images])
            for k, (path, image, o) in enumerate(zip(chunk, images, outs, strict=True)):
                image_id = start + k + 1
                records += self.image_records(image_id, o, ids)
                files.append({"id": image_id, "file_name": str(path)})
                if request.draw and len(drawn) < 6:
                    drawn.append((image, self.blank_target(image, image_id)))
        return records, files, drawn


def run(task: Any, state: dict[str, Any], checkpoint: Path, request: Any) -> str:
    """Predict and write the results (``request.output``, default standard output: the returned text)."""
    return DetectionPredictor(task).run(state, checkpoint, request)


__all__ = ["DetectionPredictor", "box_outputs", "drawn_records", "run"]

"""Per-step cost of EQLv2 / EFL against the stock loss in the same process, same detector and batches.

For each pair (Faster R-CNN: ce vs sigmoid_eql; RetinaNet and FCOS: sigmoid_focal vs efl) both detectors are
built from the shipped configs' ``model`` and ``loss`` sections (configs/detection/fm_*.yaml: the detectors
the suite trains; FCOS: the RetinaNet configs with ``model.name: fcos``) and the same seed (identical
weights), then timed on the same fixed training batches of the Fashion-MNIST detection benchmark,
alternating stock / gradtail step by step (so slow drifts of the machine hit both), after warm-up steps.
Reported: median seconds per step (forward + backward + SGD step) and the ratio gradtail / stock.

    flock /tmp/gradtail_cpu.lock .venv/bin/python benchmarks/detection_step_cost.py --out step_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gradtail.config import load_config
from gradtail.contracts import create_task
from gradtail.data.detection.fm_benchmark import build_fm_detection
from gradtail.data.detection.lvis import (
    DetectionDataset,
    collate_detection,
    detection_transforms,
    read_detection_json,
)
from gradtail.models.detection import DetectorSpec, build_detector

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
# arch: (stock config, gradtail config, arch override)
PAIRS = {
    "faster_rcnn": ("fm_faster_rcnn_ce", "fm_faster_rcnn_eqlv2", None),
    "retinanet": ("fm_retinanet_focal", "fm_retinanet_efl", None),
    "fcos": ("fm_retinanet_focal", "fm_retinanet_efl", "fcos"),
}


def detector_spec(config: str, arch: str | None) -> DetectorSpec:
    """The detector of a shipped config (10 classes; the detection task's ``spec``), ``arch`` replaced
    when given."""
    cfg = load_config(CONFIGS / f"{config}.yaml", [f"model.name={arch}"] if arch else [])
    spec: DetectorSpec = create_task(cfg).spec(num_classes=10)  # type: ignore[attr-defined]
    return spec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/fm_detection")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--archs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="detection_step_cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fm = build_fm_detection(args.root)
    ds = DetectionDataset(
        read_detection_json(fm.annotation_file("train")), fm.image_root, detection_transforms(False)
    )
    batches = [
        collate_detection([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)])
        for k in range(8)
    ]
    result: dict[str, object] = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    for arch in args.archs:
        stock_cfg, ours_cfg, override = PAIRS[arch]
        specs = {"stock": detector_spec(stock_cfg, override), "gradtail": detector_spec(ours_cfg, override)}
        dets, opts, times = {}, {}, {}
        for key, spec in specs.items():
            torch.manual_seed(0)
            det = build_detector(spec)
            det.train()
            dets[key], opts[key], times[key] = det, torch.optim.SGD(det.parameters(), lr=0.005), []
        for step in range(args.warmup + args.steps):
            images, targets = batches[step % len(batches)]
            for key in ("stock", "gradtail") if step % 2 == 0 else ("gradtail", "stock"):
                t0 = time.perf_counter()
                loss = sum(dets[key](images, targets).values())
                opts[key].zero_grad()
                loss.backward()
                opts[key].step()
                if step >= args.warmup:
                    times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        names = {k: s.loss_name for k, s in specs.items()}
        result[arch] = {
            "stock": names["stock"],
            "gradtail": names["gradtail"],
            "configs": [stock_cfg, ours_cfg],
            "median_step_s": {names[k]: med[k] for k in ("stock", "gradtail")},
            "ratio": med["gradtail"] / med["stock"],
        }
        print(arch, result[arch], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

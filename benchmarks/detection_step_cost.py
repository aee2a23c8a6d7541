"""Per-step cost of EQLv2 / EFL against the stock loss in the same process, same detector and batches.

For each pair (Faster R-CNN: ce vs sigmoid_eql; RetinaNet: focal vs efl) both detectors are built from
the same seed (identical weights), then timed on the same fixed training batches of the Fashion-MNIST
detection benchmark, alternating stock / gradtail step by step (so slow drifts of the machine hit both),
after warm-up steps. Reported: median seconds per step (forward + backward + SGD step) and the ratio.

    flock /tmp/gradtail_cpu.lock .venv/bin/python benchmarks/detection_step_cost.py --out step_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gradtail.data.fm_detection import build_fm_detection
from gradtail.data.lvis import DetectionDataset, collate_detection, detection_transforms, read_detection_json
from gradtail.detection import DetectorSpec, build_detector

PAIRS = {"faster_rcnn": ("ce", "sigmoid_eql"), "retinanet": (None, "efl")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/fm_detection")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=32)
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
        "width": args.width,
    }
    for arch, (stock, ours) in PAIRS.items():
        dets, opts, times = {}, {}, {}
        for name in (stock, ours):
            torch.manual_seed(0)
            det = build_detector(DetectorSpec(arch=arch, loss=name, width=args.width, representation=128))
            det.train()
            dets[name], opts[name], times[name] = det, torch.optim.SGD(det.parameters(), lr=0.005), []
        for step in range(args.warmup + args.steps):
            images, targets = batches[step % len(batches)]
            for name in (stock, ours) if step % 2 == 0 else (ours, stock):
                t0 = time.perf_counter()
                loss = sum(dets[name](images, targets).values())
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {str(k): statistics.median(v) for k, v in times.items()}
        result[arch] = {
            "stock": stock or "focal",
            "gradtail": ours,
            "median_step_s": {str(stock or "focal"): med[str(stock)], ours: med[ours]},
            "ratio": med[ours] / med[str(stock)],
        }
        print(arch, result[arch], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

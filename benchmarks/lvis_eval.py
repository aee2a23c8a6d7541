"""LVIS evaluation: the official ``lvis`` API against faster-coco-eval's LVIS mode, time, peak memory and
equality, on an LVIS-sized synthetic case (``lvis_case.py``: 5,000 images, 1,203 categories, 300
detections an image by default), boxes and masks.

The case is generated once (seeded) and written as JSON; each evaluator then runs in a fresh process
that reads it, resets its peak-memory mark (``/proc/self/clear_refs``) and calls
:func:`gradtail.metrics.detection.run_lvis_eval`, the call gradtail makes: it reports the evaluation's
wall time, the process's peak resident memory during it (``VmHWM``) and the increase over its memory
before (the case itself). Equality: every summary field gradtail reports, the recall summary and the
per-class AP, the largest absolute difference between the two.

    python benchmarks/lvis_eval.py --output runs/bench/lvis_eval.json
    python benchmarks/lvis_eval.py --images 500 --iou-types bbox --output /tmp/lvis_eval_small.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_output import write_result
from lvis_case import lvis_case

from gradtail.environment import environment_info


def _memory_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _evaluate(folder: str, iou_type: str, evaluator: str, queue: Any) -> None:
    from gradtail.metrics.detection import _per_class, run_lvis_eval

    gt = json.loads((Path(folder) / "gt.json").read_text())
    dets = json.loads((Path(folder) / f"dets_{iou_type}.json").read_text())
    before = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark restarts here
    start = time.perf_counter()
    results, precision, name = run_lvis_eval(gt, dets, iou_type, 300, evaluator)
    seconds = time.perf_counter() - start
    peak = _memory_kib("VmHWM")
    per_class = [None if math.isnan(v) else float(v) for v in _per_class(precision)]
    queue.put({
        "evaluator": name, "seconds": round(seconds, 2), "peak_rss_mib": round(peak / 1024, 1),
        "increase_mib": round((peak - before) / 1024, 1), "results": results, "per_class_ap": per_class,
    })  # fmt: skip


def run_one(folder: str, iou_type: str, evaluator: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_evaluate, args=(folder, iou_type, evaluator, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def largest_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    diffs = [abs(a["results"][k] - b["results"][k]) for k in a["results"]]
    for x, y in zip(a["per_class_ap"], b["per_class_ap"], strict=True):
        if (x is None) != (y is None):
            return math.inf
        if x is not None:
            diffs.append(abs(x - y))
    return max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/bench/lvis_eval.json")
    args = parser.parse_args()

    result: dict[str, Any] = {
        "case": {
            "images": args.images,
            "classes": args.classes,
            "dets_per_image": args.dets,
            "seed": args.seed,
        },
        "environment": environment_info(torch.device("cpu")),
    }
    with tempfile.TemporaryDirectory() as folder:
        for iou_type in args.iou_types:
            start = time.perf_counter()
            masks = iou_type == "segm"
            gt, dets = lvis_case(args.images, args.classes, args.dets, masks=masks, seed=args.seed)
            (Path(folder) / "gt.json").write_text(json.dumps(gt))
            (Path(folder) / f"dets_{iou_type}.json").write_text(json.dumps(dets))
            case = {"annotations": len(gt["annotations"]), "detections": len(dets),
                    "generated_in_s": round(time.perf_counter() - start, 1)}  # fmt: skip
            del gt, dets
            official = run_one(folder, iou_type, "lvis")
            fast = run_one(folder, iou_type, "faster_coco_eval")
            result[iou_type] = {
                **case,
                "lvis": {k: v for k, v in official.items() if k != "per_class_ap"},
                "faster_coco_eval": {k: v for k, v in fast.items() if k != "per_class_ap"},
                "speedup": round(official["seconds"] / fast["seconds"], 2),
                "memory_ratio": round(official["increase_mib"] / max(fast["increase_mib"], 1e-9), 2),
                "largest_difference": largest_difference(official, fast),
                "equal_to_1e-6": largest_difference(official, fast) <= 1e-6,
            }
    write_result(result, args.output)


if __name__ == "__main__":
    main()

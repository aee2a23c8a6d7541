"""Run a detection suite (suites/detection_*.yaml): every method x seed in this process, one after the other,
then summary.json / summary.md (AP, APr, APc, APf mean ± std over seeds, wall time) and
per_class_ap.png (AP per class against its number of training images, one panel per method).

    flock /tmp/gradtail_cpu.lock .venv/bin/python benchmarks/detection_suite.py SUITE.yaml OUT
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gradtail.detection.training import load_detection_config, run_detection

KEYS = ("AP", "APr", "APc", "APf", "AP50", "APs", "APm", "APl")


def _fmt(values: list[float]) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "n/a"
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1 if len(v) > 1 else 0):.1f}"


def summarize(records: dict[str, list[dict[str, Any]]], out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    lines = [
        "| method | " + " | ".join(KEYS[:4]) + " | wall time / run (s) | step (s) |",
        "|---|" + "---|" * 6,
    ]
    for method, runs in records.items():
        row = {k: [float(r["metrics"][k]) for r in runs] for k in KEYS}
        wall = [r["wall_time_s"] for r in runs]
        step = [r["mean_step_s"] for r in runs]
        summary[method] = {
            **{
                k: {"mean": float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else None, "values": v}
                for k, v in row.items()
            },
            "wall_time_s": wall,
            "mean_step_s": step,
            "seeds": [r["config"]["train"]["seed"] for r in runs],
        }
        lines.append(
            f"| {method} | "
            + " | ".join(_fmt(row[k]) for k in KEYS[:4])
            + f" | {np.mean(wall):.0f} | {np.mean(step):.3f} |"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(records, out / "per_class_ap.png")
    return summary


def _plot(records: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(3.2 * len(records), 3), sharey=True)
    colors = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}
    for ax, (method, runs) in zip(np.atleast_1d(axes), records.items(), strict=True):
        per = runs[0]["per_class"]
        ap = np.nanmean([[p["ap"] for p in r["per_class"]] for r in runs], axis=0)
        for p, a in zip(per, ap, strict=True):
            ax.scatter(p["train_images"], 100 * a, color=colors[p["frequency"]], s=18)
        ax.set_xscale("log")
        ax.set_title(method, fontsize=8)
        ax.set_xlabel("training images of the class", fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("AP (mean over seeds)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite")
    p.add_argument("out")
    p.add_argument("--seeds", type=int, nargs="*")
    args = p.parse_args()
    suite_path = Path(args.suite)
    suite = yaml.safe_load(suite_path.read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds if args.seeds else suite["seeds"]
    records: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    for seed in seeds:  # seeds outer: a suite stopped early still has every method for the first seeds
        for method, cfg_path in suite["methods"].items():
            over = {**suite.get("overrides", {})}
            over["train"] = {**over.get("train", {}), "seed": seed}
            cfg = load_detection_config(suite_path.parent / cfg_path, over)
            run_dir = out / method / f"seed{seed}"
            records.setdefault(method, []).append(run_detection(cfg, run_dir))
            summarize(records, out)  # the summary so far, rewritten after every run
    summary = summarize(records, out)
    total = time.perf_counter() - t0
    (out / "suite_time.json").write_text(json.dumps({"wall_time_s": total}))
    print((out / "summary.md").read_text())
    print(f"suite wall time {total:.0f} s")
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())

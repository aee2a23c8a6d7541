"""Per-step cost of each box-classifier loss in Mask R-CNN against CE, in the same process, same detector
weights and batches (docs/instance.md §5; issue #28's target: every loss at most 1.05x CE's step).

Each method's detector is built as the suite trains it: the task's own ``build_loss`` / ``build_model``
from the shipped config (configs/instance/fm_mask_rcnn_*.yaml; the federated loss's weights from the
benchmark's training image counts), same seed, so every detector starts from the same backbone, RPN and
mask weights (the seesaw head's normed-linear classifier has its own initialisation). They are timed on
the same fixed training batches of the Fashion-MNIST instance benchmark (with their masks), one step of
every method per round, the order rotated each round (so slow drifts of the machine hit all), after
warm-up rounds. A step is forward + backward + SGD step. Reported: the median seconds per step of each
loss and its ratio to CE's median (RFS is a sampler: its step is CE's).

    flock /tmp/gradtail_cpu.lock .venv/bin/python benchmarks/instance_step_cost.py --out runs/step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from gradtail.config import load_config
from gradtail.contracts import create_task
from gradtail.data.detection.lvis import collate_detection

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "instance"
METHODS = {  # loss -> shipped config
    "ce": "fm_mask_rcnn_ce",
    "sigmoid_eql": "fm_mask_rcnn_eqlv2",
    "seesaw": "fm_mask_rcnn_seesaw",
    "federated": "fm_mask_rcnn_federated",
    "softmax_eql": "fm_mask_rcnn_softmax_eql",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/fm_instance", help="where the benchmark is (built if needed)")
    p.add_argument("--steps", type=int, default=100, help="timed rounds (one step of every method each)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="instance_step_cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = ["ce", *[m for m in args.methods if m != "ce"]]
    tasks, data = {}, None
    for loss in methods:
        cfg = load_config(
            CONFIGS / f"{METHODS[loss]}.yaml", [f"instance_segmentation.benchmark_root={args.root}"]
        )
        tasks[loss] = create_task(cfg)
        if data is None:
            data = tasks[loss].build_data()
    assert data is not None
    cfg = tasks["ce"].cfg
    loader = data.train_loader(cfg, torch.device("cpu"), 0, 1)
    batch = cfg.optim.batch_size
    batches = [
        collate_detection([loader.dataset[i] for i in range(k * batch, (k + 1) * batch)]) for k in range(8)
    ]
    models, opts, times = {}, {}, {}
    for loss in methods:
        torch.manual_seed(0)
        task = tasks[loss]
        model = task.build_model(data, task.build_loss(data))
        model.train()
        models[loss], times[loss] = model, []
        opts[loss] = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)
    for step in range(args.warmup + args.steps):
        images, targets = batches[step % len(batches)]
        shift = step % len(methods)
        for loss in methods[shift:] + methods[:shift]:
            t0 = time.perf_counter()
            total = sum(models[loss](images, targets).values())
            opts[loss].zero_grad()
            total.backward()
            opts[loss].step()
            if step >= args.warmup:
                times[loss].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": "Mask R-CNN (configs/instance/fm_mask_rcnn_*.yaml) training step per box-classifier loss, "
        "median over the timed rounds, ratio to CE in the same process",
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "median_step_s": med,
        "quartiles_s": {k: statistics.quantiles(v, n=4) for k, v in times.items()},
        "ratio_to_ce": {k: med[k] / med["ce"] for k in methods},
        "configs": {k: METHODS[k] for k in methods},
    }
    ratios = {k: round(v, 3) for k, v in result["ratio_to_ce"].items()}
    print(json.dumps({"median_ms": {k: round(1000 * v, 1) for k, v in med.items()}, "ratio_to_ce": ratios}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

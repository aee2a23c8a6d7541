"""Per-step training cost of every method in a suite, relative to cross-entropy, measured in one run.

Every method is built by the real trainer (same model, data, batch, optimizer) and timed on the same
fixed, already-augmented batches with ``Trainer.train_step``, the exact step of the training loop. The
methods are timed round-robin (a few steps of each in turn, several rounds) so that slow drifts of the
machine hit all methods alike; the figure reported is the median over rounds of the mean step time, and
the ratio to ``ce`` measured in the same rounds. GBG's one-off grouping is timed separately.

    python benchmarks/step_cost.py --suite suites/quick.yaml --output runs/bench/step_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_output import write_result

from gradtail.bench import load_suite
from gradtail.config import apply_overrides, config_from_dict
from gradtail.data.builder import build_data
from gradtail.engine.environment import environment_info
from gradtail.engine.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="suites/quick.yaml")
    p.add_argument("--methods", help="comma-separated subset of the suite's methods (ce is always included)")
    p.add_argument("--baseline", default="ce")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="steps per method per round")
    p.add_argument("--batches", type=int, default=4, help="distinct fixed batches cycled through")
    p.add_argument("--device", default=None, help="override train.device (e.g. cuda)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every method")
    p.add_argument("--output", default="runs/bench/step_cost.json")
    args = p.parse_args()

    suite = load_suite(args.suite)
    wanted = set(args.methods.split(",")) | {args.baseline} if args.methods else None
    methods = [m for m in suite.methods if m.after is None and (wanted is None or m.name in wanted)]
    tmp = Path(tempfile.mkdtemp(prefix="gradtail_step_cost_"))
    configs = {}
    for m in methods:
        cfg = suite.run_config(m, suite.seeds[0])
        cfg.train.progress = False
        if args.device:
            cfg.train.device = args.device
        configs[m.name] = config_from_dict(apply_overrides(cfg.to_dict(), args.set)) if args.set else cfg
    base_cfg = configs[args.baseline]
    data = build_data(base_cfg.data)
    trainers: dict[str, Trainer] = {}
    grouping_seconds: dict[str, float] = {}
    for name, cfg in configs.items():
        t = Trainer(cfg, data=data, output_dir=tmp / name, verbose=False)
        start = time.perf_counter()
        t.update_rule.on_epoch_start(0, t)  # GBG groups here; a no-op for the others
        grouping_seconds[name] = time.perf_counter() - start
        t.model.train()
        t.loss_fn.train()
        trainers[name] = t
    loader = trainers[args.baseline].train_loader
    loader.set_epoch(0)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == args.batches:
            break
    device = trainers[args.baseline].device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for t in trainers.values():  # warm-up (allocator, first-call costs, lazy init)
        for x, y in batches[:2]:
            t.train_step(x, y, epoch=0)
    per_round: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, t in trainers.items():
            sync()
            start = time.perf_counter()
            for i in range(args.steps):
                x, y = batches[i % len(batches)]
                t.train_step(x, y, epoch=0)
            sync()
            per_round[name].append((time.perf_counter() - start) / args.steps)
    base = per_round[args.baseline]
    rows = {}
    for name, times in per_round.items():
        ratios = [a / b for a, b in zip(times, base, strict=True)]
        rows[name] = {
            "ms_per_step": 1000 * statistics.median(times),
            "ratio_to_baseline": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "grouping_seconds": grouping_seconds[name] if grouping_seconds[name] > 0.01 else None,
        }
    result = {
        "benchmark": "step_cost",
        "suite": suite.name,
        "baseline": args.baseline,
        "batch_size": base_cfg.optim.batch_size,
        "model": base_cfg.model.name,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "methods": rows,
        "environment": environment_info(device),
    }
    write_result(result, args.output, echo=False)
    width = max(len(n) for n in rows)
    print(f"{'method'.ljust(width)}  ms/step  x {args.baseline}  (min-max over rounds)")
    for name, r in rows.items():
        extra = f"  grouping {r['grouping_seconds']:.1f}s" if r["grouping_seconds"] else ""
        print(
            f"{name.ljust(width)}  {r['ms_per_step']:7.1f}  {r['ratio_to_baseline']:5.2f}x "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}){extra}"
        )


if __name__ == "__main__":
    main()

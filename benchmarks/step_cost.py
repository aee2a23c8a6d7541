"""Per-step training cost of every method in a suite, relative to cross-entropy, measured in one run.

Every method is built by the real trainer (same model, data, batch, optimizer) and timed on the same
fixed, already-augmented batches with ``Trainer.train_step``, the exact step of the training loop. The
methods are timed round-robin (a few steps of each in turn, several rounds) so that slow drifts of the
machine hit all methods alike; the figure reported is the median over rounds of the mean step time, and
the ratio to ``ce`` measured in the same rounds. GBG's one-off grouping is timed separately.

Each method is timed in float32 and with ``train.amp: auto`` (bfloat16 autocast where the machine
computes it natively) side by side (``--precisions``); every ratio is against the baseline in float32.

    python benchmarks/step_cost.py --suite suites/quick.yaml --output runs/bench/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_output import write_result

from gradtail.bench import load_suite
from gradtail.config import apply_overrides, config_from_dict
from gradtail.contracts import create_task
from gradtail.engine.trainer import Trainer
from gradtail.environment import environment_info


def forward_backward_split(
    trainer: Trainer, batches: list, rounds: int, sync: Any, step_seconds: float
) -> dict[str, Any]:
    """The baseline step's forward and backward times, and the cost floor of exact per-group gradients.

    Whole-backbone GBG needs one backbone backward per group present after the one forward, so with B the
    backward time and T the whole baseline step (forward, backward, optimizer step) its step costs at
    least (T + (G - 1) B) / T baseline steps, whatever the implementation. Reported for G = 2, 4, 8.
    """
    fwd, bwd = [], []
    model, loss_fn = trainer.model, trainer.loss_fn
    for _ in range(rounds):
        for x, y, *_ in batches:
            trainer.optimizer.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            loss = loss_fn(model.classifier(model.features(x)), y)
            sync()
            mid = time.perf_counter()
            loss.backward()
            sync()
            fwd.append(mid - start)
            bwd.append(time.perf_counter() - mid)
    f, b = statistics.median(fwd), statistics.median(bwd)
    return {
        "forward_ms": 1000 * f,
        "backward_ms": 1000 * b,
        "step_ms": 1000 * step_seconds,
        "exact_backbone_floor": {str(g): 1 + (g - 1) * b / step_seconds for g in (2, 4, 8)},
    }


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
    p.add_argument(
        "--precisions", default="none,auto", help="train.amp settings, comma-separated (none = float32)"
    )
    p.add_argument("--output", default="runs/bench/step_cost.json")
    args = p.parse_args()

    suite = load_suite(args.suite)
    wanted = set(args.methods.split(",")) | {args.baseline} if args.methods else None
    methods = [m for m in suite.methods if m.after is None and (wanted is None or m.name in wanted)]
    tmp = Path(tempfile.mkdtemp(prefix="gradtail_step_cost_"))
    amps = args.precisions.split(",")
    configs = {}
    for amp in amps:
        for m in methods:
            cfg = suite.run_config(m, suite.seeds[0])
            cfg.train.progress = False
            if args.device:
                cfg.train.device = args.device
            overrides = [*args.set, f"train.amp={amp}"]
            label = m.name if amp == amps[0] else f"{m.name} [{amp}]"
            configs[label] = config_from_dict(apply_overrides(cfg.to_dict(), overrides))
    base_cfg = configs[args.baseline]
    bundles: dict[str, object] = {}  # one data bundle per distinct data config (augmentation included)
    trainers: dict[str, Trainer] = {}
    grouping_seconds: dict[str, float] = {}
    for name, cfg in configs.items():
        config = cfg.to_dict()  # the same bundle for every precision (the task's data settings)
        key = json.dumps([cfg.task, config["data"], config.get(cfg.task)], sort_keys=True)
        if key not in bundles:
            bundles[key] = create_task(cfg).build_data()
        t = Trainer(cfg, data=bundles[key], output_dir=tmp / name, verbose=False)  # type: ignore[arg-type]
        start = time.perf_counter()
        t.update_rule.on_epoch_start(0, t.training_view())  # GBG groups here; a no-op for the others
        grouping_seconds[name] = time.perf_counter() - start
        t.model.train()
        t.loss_fn.train()
        trainers[name] = t
    batches: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    for name, t in trainers.items():  # the same images and labels; runs with a contrastive term add views
        t.train_loader.set_epoch(0)
        batches[name] = []
        for batch in t.train_loader:
            batches[name].append(batch)
            if len(batches[name]) == args.batches:
                break
    device = trainers[args.baseline].device

    def step(name: str, i: int) -> dict[str, float]:
        x, y, *views = batches[name][i % len(batches[name])]
        return trainers[name].train_step(x, y, epoch=0, views=views[0] if views else None).extras

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in trainers:  # warm-up (allocator, first-call costs, lazy init)
        for i in range(2):
            step(name, i)
    per_round: dict[str, list[float]] = {name: [] for name in trainers}
    groups_present: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name in trainers:
            sync()
            start = time.perf_counter()
            for i in range(args.steps):
                extras = step(name, i)
                if "groups_present" in extras:
                    groups_present[name].append(float(extras["groups_present"]))
            sync()
            per_round[name].append((time.perf_counter() - start) / args.steps)
    base = per_round[args.baseline]
    split = forward_backward_split(
        trainers[args.baseline], batches[args.baseline], args.rounds, sync, statistics.median(base)
    )
    rows = {}
    for name, times in per_round.items():
        ratios = [a / b for a, b in zip(times, base, strict=True)]
        rows[name] = {
            "ms_per_step": 1000 * statistics.median(times),
            "ratio_to_baseline": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "grouping_seconds": grouping_seconds[name] if grouping_seconds[name] > 0.01 else None,
            "mean_groups_present": statistics.mean(groups_present[name]) if groups_present[name] else None,
            "precision": trainers[name].precision.to_dict(),
        }
    for name in list(rows):  # each method's cost in the other precisions relative to the first one
        for amp in amps[1:]:
            other = f"{name} [{amp}]"
            if other in rows:
                rows[other][f"vs_{amps[0]}"] = rows[other]["ms_per_step"] / rows[name]["ms_per_step"]
    result = {
        "benchmark": "step_cost",
        "suite": suite.name,
        "baseline": args.baseline,
        "batch_size": base_cfg.optim.batch_size,
        "model": base_cfg.model.name,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "methods": rows,
        "baseline_split": split,
        "environment": environment_info(device),
    }
    write_result(result, args.output, echo=False)
    width = max(len(n) for n in rows)
    floor = ", ".join(f"G={g}: {v:.2f}x" for g, v in split["exact_backbone_floor"].items())
    print(f"{args.baseline}: forward {split['forward_ms']:.1f} ms, backward {split['backward_ms']:.1f} ms; "
          f"floor of exact whole-backbone GBG 1 + (G - 1) B / step: {floor}")  # fmt: skip
    print(f"{'method'.ljust(width)}  ms/step  x {args.baseline}  (min-max over rounds)")
    for name, r in rows.items():
        extra = f"  grouping {r['grouping_seconds']:.1f}s" if r["grouping_seconds"] else ""
        if r["mean_groups_present"] is not None:
            extra += f"  groups/batch {r['mean_groups_present']:.2f}"
        print(
            f"{name.ljust(width)}  {r['ms_per_step']:7.1f}  {r['ratio_to_baseline']:5.2f}x "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}){extra}"
        )


if __name__ == "__main__":
    main()

"""Peak memory and time of one training step of the iNaturalist 2018 recipes, at 8,142 classes.

The methods are the configs of ``configs/inat2018/`` (Softmax-EQL, GALA, BGP, GBG) and, as the baseline,
plain cross-entropy on the same model (``softmax_eql.yaml`` with ``loss.name=ce``). Each one is built by the
real trainer, as ``gradtail train`` builds it: the recipe's ResNet-50 with its head over all 8,142 classes,
the optimizer, the loss with its per-class state, the regularizer or update rule, the data of a tiny copy
of iNaturalist 2018 written in its on-disk form (the community's list files, JPEG files at the listed
paths; docs/methods/protocol.md §2). GBG groups the classes first (frequency grouping, as the config says;
docs/methods/gbg.md §1). Then ``Trainer.train_step``, the step of the training loop, runs on fixed batches
of ``--batch`` images of ``--image-size`` pixels whose labels fall in all four GBG groups (GBG's costliest
case, and the usual one at batch 256: one backbone gradient per group; docs/methods/gbg.md §2).

Each method runs in a process of its own (spawned), so that the resident-memory high-water mark
(``ru_maxrss``) is that method's alone. Reported per method: the resident memory once the run is built
(model, optimizer, data, grouping; before any step), the peak after the steps, their difference (what the
steps add: activations, gradients, the optimizer's momentum buffers made at the first step, the method's
own work), and the median time of ``--steps`` steps after ``--warmup`` steps, with its ratio to the
baseline measured in the same run. Float32 (``train.amp=none``): the recipes' bfloat16 autocast is meant
for GPUs. ``--threads`` torch threads (default 2).

    python benchmarks/large_scale_step.py --output runs/bench/large_scale_step.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from queue import Empty
from typing import Any

import torch
from bench_output import write_result

from gradtail.environment import environment_info

REPO = Path(__file__).resolve().parent.parent
METHODS = ("ce", "softmax_eql", "gala", "bgp", "gbg")
NUM_GROUPS = 4  # configs/inat2018/gbg.yaml


def write_inat2018_copy(base: Path) -> tuple[Path, Path]:
    """A tiny iNaturalist 2018 in its on-disk form: ``(image_root, list_dir)``.

    Eight 32 x 32 JPEG files under ``train_val2018/<supercategory>/<category id>/`` for the classes 0, 1, 2
    and 8,141 (two each), listed in ``iNaturalist18/iNaturalist18_{train,val}.txt`` as ``path label``:
    the lists' highest label makes the reader see all 8,142 classes.
    """
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    root, list_dir = base / "images", base / "lists"
    lines = []
    for label in (0, 1, 2, 8141):
        for i in range(2):
            rel = f"train_val2018/Plantae/{label}/{label:05d}{i:027x}.jpg"
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=gen).numpy()
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / rel, format="JPEG")
            lines.append(f"{rel} {label}")
    (list_dir / "iNaturalist18").mkdir(parents=True)
    for split in ("train", "val"):
        (list_dir / "iNaturalist18" / f"iNaturalist18_{split}.txt").write_text("\n".join(lines) + "\n")
    return root, list_dir


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _labels(num_classes: int, batch: int) -> torch.Tensor:
    """``batch`` distinct labels, dealt round-robin over the four frequency groups of the tiny copy's
    counts (the classes with images first, then by index), so every GBG group is present."""
    from gradtail.optim.grouping import frequency_groups

    counts = [0] * num_classes
    for label in (0, 1, 2, num_classes - 1):
        counts[label] = 2
    groups = frequency_groups(counts, NUM_GROUPS)
    members = [torch.nonzero(groups == g).flatten() for g in range(NUM_GROUPS)]
    picks = [int(members[i % NUM_GROUPS][i // NUM_GROUPS * 97 % len(members[i % NUM_GROUPS])])
             for i in range(batch)]  # fmt: skip
    return torch.tensor(picks, dtype=torch.long)


def _child(args: dict[str, Any], queue: Any) -> None:
    from gradtail.config import load_config
    from gradtail.engine.trainer import Trainer

    torch.set_num_threads(args["threads"])
    method = args["method"]
    path = REPO / "configs" / "inat2018" / f"{'softmax_eql' if method == 'ce' else method}.yaml"
    overrides = [
        f"data.image_root={args['root']}",
        f"data.list_dir={args['list_dir']}",
        f"data.image_size={args['image_size']}",
        "data.num_workers=0",
        f"optim.batch_size={args['batch']}",
        "train.amp=none",
        "train.progress=false",
        f"train.threads={args['threads']}",
    ]
    if method == "ce":
        overrides += ["name=inat2018_ce", "loss.name=ce", "loss.params={}"]
    cfg = load_config(path, overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*entries, the community", category=UserWarning)
        trainer = Trainer(cfg, output_dir=Path(args["out"]) / "runs" / method, verbose=False)
    start = time.perf_counter()
    trainer.update_rule.on_epoch_start(0, trainer.training_view())  # GBG groups here; others: nothing
    grouping_s = time.perf_counter() - start
    trainer.model.train()
    trainer.loss_fn.train()
    if trainer.regularizer is not None:
        trainer.regularizer.train()
    c = trainer.data.num_classes
    gen = torch.Generator().manual_seed(1)
    size = args["image_size"]
    x = torch.randn(args["batch"], 3, size, size, generator=gen)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = _labels(c, args["batch"])
    rss_built, peak_built = _rss_mib(), _peak_mib()
    times, present = [], []
    for i in range(args["warmup"] + args["steps"]):
        start = time.perf_counter()
        out = trainer.train_step(x, y, epoch=0)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(out.loss.detach()):
            raise RuntimeError(f"{method}: non-finite loss at step {i}")
        if i >= args["warmup"]:
            times.append(elapsed)
        if "groups_present" in out.extras:
            present.append(float(out.extras["groups_present"]))
    peak = _peak_mib()
    params = sum(p.numel() for p in trainer.model.parameters())
    head = sum(p.numel() for p in trainer.model.classifier.parameters())
    loss_state = sum(t.numel() * t.element_size() for t in trainer.loss_fn.state_dict().values())
    queue.put(
        {
            "config": str(path.relative_to(REPO)) + (" + loss.name=ce" if method == "ce" else ""),
            "num_classes": c,
            "model": f"{cfg.model.name}, {cfg.model.head} head",
            "parameters": params,
            "head_parameters": head,
            "loss_state_bytes": loss_state,
            "grouping_seconds": round(grouping_s, 3),
            "groups_present": statistics.mean(present) if present else None,
            "rss_built_mib": round(rss_built, 1),
            "peak_before_steps_mib": round(peak_built, 1),
            "peak_rss_mib": round(peak, 1),
            "step_peak_mib": round(peak - rss_built, 1),
            "step_seconds": [round(t, 4) for t in times],
            "median_step_seconds": round(statistics.median(times), 4),
        }
    )


def _run_child(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
    """One method's measurement, in a spawned process (its own ``ru_maxrss``); a dead child is an error."""
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(args, queue))
    proc.start()
    while True:
        try:
            row = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                what = f"{args['method']}: the measuring process exited with {proc.exitcode}"
                raise RuntimeError(what) from None
    proc.join()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--baseline", default="ce")
    p.add_argument("--output", default="runs/bench/large_scale_step.json")
    a = p.parse_args()
    if a.batch < NUM_GROUPS:
        p.error(f"--batch must be at least {NUM_GROUPS} (one label per GBG group)")
    setup = {"batch": a.batch, "image_size": a.image_size, "threads": a.threads, "warmup": a.warmup,
             "steps": a.steps}  # fmt: skip
    rows: dict[str, Any] = {}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        root, list_dir = write_inat2018_copy(Path(tmp) / "inat2018")
        for method in a.methods:
            args = {"method": method, "root": str(root), "list_dir": str(list_dir), "out": str(Path(tmp))}
            row = rows[method] = _run_child(ctx, {**args, **setup})
            print(
                f"{method}: peak {row['peak_rss_mib']:.0f} MiB (the steps add {row['step_peak_mib']:.0f}), "
                f"{row['median_step_seconds']:.2f} s/step",
                flush=True,
            )
    base = rows.get(a.baseline)
    if base is not None:
        for row in rows.values():
            row["step_time_vs_baseline"] = round(row["median_step_seconds"] / base["median_step_seconds"], 2)
            row["peak_vs_baseline_mib"] = round(row["peak_rss_mib"] - base["peak_rss_mib"], 1)
    result = {
        "benchmark": "large_scale_step",
        "dataset": "inat2018",
        "setup": {**setup, "precision": "float32", "baseline": a.baseline},
        "methods": rows,
        "environment": environment_info(torch.device("cpu")),
    }
    write_result(result, a.output)


if __name__ == "__main__":
    main()

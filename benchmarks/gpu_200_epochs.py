"""Wall time of a full 200-epoch ResNet-32 run on a GPU (issue goal: under 2 minutes on one H100).

Runs ``configs/fashion_mnist_lt/resnet32_200ep.yaml`` through the ordinary trainer (in-memory data on the
GPU, whole-batch augmentation, bf16 autocast, channels_last) and writes the wall time, the training time
and the final accuracy as JSON. ``--compile`` adds ``torch.compile`` of the backbone.

    python benchmarks/gpu_200_epochs.py --output runs/bench/gpu_200_epochs.json [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from bench_output import write_result

from gradtail.config import load_config
from gradtail.engine.trainer import Trainer
from gradtail.environment import environment_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fashion_mnist_lt/resnet32_200ep.yaml")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="override (a shorter smoke run)")
    p.add_argument("--output", default="runs/bench/gpu_200_epochs.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_200_epochs: no CUDA device here; run it on a machine with a GPU")
    overrides = ["train.progress=false"] + (["train.compile=true"] if args.compile else [])
    if args.epochs:
        overrides.append(f"optim.epochs={args.epochs}")
    cfg = load_config(args.config, overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg, output_dir=tempfile.mkdtemp(prefix="gradtail_gpu_"), verbose=False)
    final = trainer.fit()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    result = {
        "benchmark": "gpu_200_epochs",
        "epochs": cfg.optim.epochs,
        "compile": args.compile,
        "wall_seconds": wall,
        "train_seconds": final["train_seconds"],
        "top1": final["last_epoch"]["top1"],
        "environment": environment_info(trainer.device),
    }
    write_result(result, args.output)


if __name__ == "__main__":
    main()

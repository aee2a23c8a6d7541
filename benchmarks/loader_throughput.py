"""Data loader throughput (batches/s with augmentation) vs. the model's training step time.

Both are measured in the same run, on the same device and batch size, so the figure that matters is
the ratio: the share of a training step spent producing its batch. Writes JSON.

    python benchmarks/loader_throughput.py --output runs/bench/loader_throughput.json
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_output import write_result

from gradtail.config import DataConfig
from gradtail.data.builder import build_data
from gradtail.data.loader import BatchAugment, BatchLoader
from gradtail.data.samplers import create_sampler
from gradtail.environment import environment_info, resolve_device
from gradtail.errors import DataError
from gradtail.models import create_model


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--model-width", type=int, default=16, help="small_cnn width")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="loader passes over the training set")
    p.add_argument("--steps", type=int, default=30, help="timed model steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default="runs/bench/loader_throughput.json")
    args = p.parse_args()

    device = resolve_device(args.device)
    try:
        data = build_data(DataConfig(dataset=args.dataset))
    except DataError as e:
        print(f"{e}; falling back to synthetic data of the same size")
        data = build_data(
            DataConfig(
                dataset="synthetic",
                imbalance_factor=100,
                val_per_class=0,
                synthetic={"per_class": 6000, "image_size": 28},
            )
        )
    aug = BatchAugment(data.mean, data.std, crop_padding=2, hflip=True)
    sampler = create_sampler("instance", data.train.labels, data.num_classes, seed=0)
    loader = BatchLoader(
        data.train.images, data.train.labels, args.batch_size, aug, sampler=sampler, device=device
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Loader alone: gather + crop + flip + normalise, whole epochs.
    batches = 0
    sync()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for _batch in loader:
            batches += 1
        sync()
    loader_s = (time.perf_counter() - start) / batches

    # Model step on a ready tensor: forward + backward + SGD step.
    kw = {"width": args.model_width} if args.model == "small_cnn" else {}
    model = create_model(args.model, data.num_classes, in_channels=data.train.images.shape[1], **kw).to(
        device
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader.set_epoch(0)
    x, y = next(iter(loader))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync()

    step_s = _time(step, args.steps)
    result = {
        "benchmark": "loader_throughput",
        "dataset": data.train.name,
        "train_images": len(data.train),
        "batch_size": args.batch_size,
        "model": args.model,
        "loader_batches_per_s": 1.0 / loader_s,
        "loader_ms_per_batch": 1000 * loader_s,
        "model_step_ms": 1000 * step_s,
        "data_share_of_step": loader_s / (loader_s + step_s),
        "environment": environment_info(device),
    }
    write_result(result, args.output)


if __name__ == "__main__":
    main()

"""gradtail's training throughput vs a reference loop written the way the original repositories do it.

Reference: a ``torch.utils.data.Dataset`` returning PIL images through torchvision transforms
(RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize), a ``DataLoader`` with
``num_workers=2`` and shuffling, and a plain forward / cross-entropy / backward / SGD step.
gradtail: the same model, batch size, optimizer and number of steps through ``Trainer.train_step``
fed by the in-memory :class:`~gradtail.data.loader.BatchLoader`, once in float32 (as the original
repositories train) and once with ``train.amp: auto`` (bfloat16 autocast where the machine computes it
natively). All run on the same long-tailed Fashion-MNIST subset, alternating trial by trial, and the
figures are ratios of images/s against the reference loop.

The reference runs in a process of its own, as a script from the original repositories would: gradtail's
trainer retunes the process's allocator on CPU (``train.cpu_allocator: auto``,
:func:`gradtail.environment.configure_cpu_allocator`), which would otherwise speed the reference up
too. The same reference loop is also timed inside gradtail's process (``reference_retained_allocator``)
so the JSON shows how much of the speed-up the allocator setting alone gives.

    python benchmarks/reference_loop.py --output runs/bench/reference_loop.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_output import write_result
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from gradtail.config import load_config
from gradtail.data.builder import build_data
from gradtail.engine.trainer import Trainer
from gradtail.environment import environment_info
from gradtail.models import create_model


class PILDataset(Dataset):
    """Images as PIL, transformed one by one in worker processes (the original repos' pattern)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[i], mode="L")
        return self.transform(img), int(self.labels[i])


def _reference_model_and_loader(
    spec: dict[str, Any],
) -> tuple[Callable[[int], float], Callable[[], None]]:
    """The reference loop (PIL dataset, DataLoader with workers, plain step) as a timing function."""
    torch.set_num_threads(spec["threads"])
    tf = transforms.Compose([
        transforms.RandomCrop(spec["size"], padding=spec["pad"]),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(spec["mean"], spec["std"]),
    ])  # fmt: skip
    dataset = PILDataset(spec["images"], spec["labels"], tf)
    loader = DataLoader(dataset, batch_size=spec["batch_size"], shuffle=True, num_workers=spec["workers"],
                        drop_last=True, persistent_workers=True)  # fmt: skip
    torch.manual_seed(0)
    model = create_model(spec["model"], spec["num_classes"], in_channels=1, **spec["model_params"])
    o = spec["optim"]
    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                          weight_decay=o["weight_decay"])  # fmt: skip
    model.train()
    state = {"it": iter(loader)}

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            try:
                x, y = next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                x, y = next(state["it"])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return time.perf_counter() - start

    def close() -> None:
        state.pop("it", None)

    return run, close


def _reference_process(conn: Any, spec: dict[str, Any]) -> None:
    """A fresh interpreter (spawn) with the system allocator: times ``steps`` on request, until 0."""
    run, close = _reference_model_and_loader(spec)
    conn.send("ready")
    while (steps := conn.recv()) > 0:
        conn.send(run(steps))
    close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fashion_mnist_lt/base.yaml")
    p.add_argument("--steps", type=int, default=60, help="timed steps per trial")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--untimed", type=int, default=8, help="steps run before each timed trial")
    p.add_argument("--settle", type=float, default=0.5, help="seconds of rest before each trial")
    p.add_argument("--output", default="runs/bench/reference_loop.json")
    args = p.parse_args()

    common = ["train.progress=false", "train.diagnostics=false"]
    cfg = load_config(args.config, [*common, "train.amp=none"])
    data = build_data(cfg.data)
    o = cfg.optim
    spec = {
        "images": data.train.images[:, 0].numpy(), "labels": data.train.labels.numpy(),
        "mean": data.mean, "std": data.std, "size": data.train.images.shape[-1],
        "pad": cfg.data.augment.crop_padding, "batch_size": o.batch_size, "workers": args.workers,
        "model": cfg.model.name, "model_params": cfg.model.params, "num_classes": data.num_classes,
        "optim": {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay},
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    # the reference's own process starts before gradtail's trainer touches this process's allocator
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_reference_process, args=(child, spec))
    proc.start()
    if parent.recv() != "ready":
        raise RuntimeError("the reference process did not start")

    def reference(steps: int) -> float:
        parent.send(steps)
        return float(parent.recv())

    trainer = Trainer(cfg, data=data, output_dir=tempfile.mkdtemp(prefix="gradtail_ref_"), verbose=False)
    auto_cfg = load_config(args.config, [*common, "train.amp=auto"])
    auto_dir = tempfile.mkdtemp(prefix="gradtail_ref_")
    auto = Trainer(auto_cfg, data=data, output_dir=auto_dir, verbose=False)
    retained, close_retained = _reference_model_and_loader(spec)  # same loop, gradtail's allocator setting
    bs = o.batch_size

    def gradtail_loop(t: Trainer) -> Callable[[int], float]:
        t.model.train()
        epoch = [0]

        def run(steps: int) -> float:
            start = time.perf_counter()
            done = 0
            while done < steps:
                t.train_loader.set_epoch(epoch[0])
                epoch[0] += 1
                for x, y in t.train_loader:
                    t.train_step(x, y, epoch=0)
                    done += 1
                    if done == steps:
                        break
            return time.perf_counter() - start

        return run

    loops = {
        "reference": reference,
        "reference_retained_allocator": retained,
        "float32": gradtail_loop(trainer),
        "auto": gradtail_loop(auto),
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    for loop in loops.values():
        loop(5)  # warm-up: workers started, first batches, oneDNN kernels chosen
    for _ in range(args.trials):
        for name, loop in loops.items():  # round-robin, so a slow spell of the machine hits all
            # The DataLoader workers of the loop timed before keep prefetching for a moment: let them finish
            # so their work does not land in this timing; then this loop's own head start (batches its
            # workers prefetched while it was idle) is consumed untimed, so each trial is steady state.
            time.sleep(args.settle)
            loop(args.untimed)
            times[name].append(loop(args.steps))
    parent.send(0)
    proc.join(timeout=60)
    close_retained()
    ips = {name: args.steps * bs / statistics.median(t) for name, t in times.items()}
    ref_ips, gt_ips = ips["reference"], ips["float32"]
    result = {
        "benchmark": "reference_loop",
        "model": cfg.model.name,
        "batch_size": bs,
        "steps": args.steps,
        "trials": args.trials,
        "reference_workers": args.workers,
        "untimed_steps_per_trial": args.untimed,
        "reference_images_per_s": ref_ips,
        "gradtail_images_per_s": gt_ips,
        "speedup": gt_ips / ref_ips,
        "auto_precision": auto.precision.to_dict(),
        "cpu_allocator": trainer.allocator,
        "gradtail_auto_images_per_s": ips["auto"],
        "speedup_auto": ips["auto"] / ref_ips,
        "auto_vs_float32": ips["auto"] / gt_ips,
        "reference_retained_allocator_images_per_s": ips["reference_retained_allocator"],
        "reference_retained_allocator_vs_reference": ips["reference_retained_allocator"] / ref_ips,
        "note": "same model, batch, optimizer; neither side runs the gradient-ratio diagnostics; the "
        "reference (its own process, system allocator) and `speedup` are float32, `speedup_auto` uses "
        "train.amp=auto; `reference_retained_allocator` is the reference loop run in gradtail's process",
        "environment": environment_info(trainer.device),
    }
    write_result(result, args.output)


if __name__ == "__main__":
    main()

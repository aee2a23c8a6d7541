"""gradtail's training throughput vs a reference loop written the way the original repositories do it.

Reference: a ``torch.utils.data.Dataset`` returning PIL images through torchvision transforms
(RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize), a ``DataLoader`` with
``num_workers=2`` and shuffling, and a plain forward / cross-entropy / backward / SGD step.
gradtail: the same model, batch size, optimizer and number of steps through ``Trainer.train_step``
fed by the in-memory :class:`~gradtail.data.loader.BatchLoader`, once in float32 (as the original
repositories train) and once with ``train.amp: auto`` (bfloat16 autocast where the machine computes it
natively). All run on the same long-tailed Fashion-MNIST subset in the same process, alternating, and the
figures are ratios of images/s against the reference loop.

    python benchmarks/reference_loop.py --output runs/bench/reference_loop.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from bench_output import write_result
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from gradtail.config import load_config
from gradtail.engine.environment import environment_info
from gradtail.engine.trainer import Trainer
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fashion_mnist_lt/base.yaml")
    p.add_argument("--steps", type=int, default=60, help="timed steps per trial")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--output", default="runs/bench/reference_loop.json")
    args = p.parse_args()

    common = ["train.progress=false", "train.diagnostics=false"]
    cfg = load_config(args.config, [*common, "train.amp=none"])
    trainer = Trainer(cfg, output_dir=tempfile.mkdtemp(prefix="gradtail_ref_"), verbose=False)
    auto_cfg = load_config(args.config, [*common, "train.amp=auto"])
    auto_dir = tempfile.mkdtemp(prefix="gradtail_ref_")
    auto = Trainer(auto_cfg, data=trainer.data, output_dir=auto_dir, verbose=False)
    data = trainer.data
    bs = cfg.optim.batch_size
    pad = cfg.data.augment.crop_padding
    size = data.train.images.shape[-1]
    tf = transforms.Compose([
        transforms.RandomCrop(size, padding=pad),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.mean, data.std),
    ])  # fmt: skip
    dataset = PILDataset(data.train.images[:, 0].numpy(), data.train.labels.numpy(), tf)
    loader = DataLoader(dataset, batch_size=bs, shuffle=True, num_workers=args.workers, drop_last=True,
                        persistent_workers=True)  # fmt: skip
    ref_model = create_model(cfg.model.name, data.num_classes, in_channels=1, **cfg.model.params)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)  # fmt: skip
    ref_model.train()

    def reference(steps: int) -> float:
        it = iter(loader)
        start = time.perf_counter()
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            ref_opt.zero_grad(set_to_none=True)
            F.cross_entropy(ref_model(x), y).backward()
            ref_opt.step()
        return time.perf_counter() - start

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

    loops = {"reference": reference, "float32": gradtail_loop(trainer), "auto": gradtail_loop(auto)}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for loop in loops.values():
        loop(5)  # warm-up: workers started, first batches, oneDNN kernels chosen
    for _ in range(args.trials):
        for name, loop in loops.items():  # round-robin, so a slow spell of the machine hits all
            times[name].append(loop(args.steps))
    ips = {name: args.steps * bs / statistics.median(t) for name, t in times.items()}
    ref_ips, gt_ips = ips["reference"], ips["float32"]
    result = {
        "benchmark": "reference_loop",
        "model": cfg.model.name,
        "batch_size": bs,
        "steps": args.steps,
        "trials": args.trials,
        "reference_workers": args.workers,
        "reference_images_per_s": ref_ips,
        "gradtail_images_per_s": gt_ips,
        "speedup": gt_ips / ref_ips,
        "auto_precision": auto.precision.to_dict(),
        "gradtail_auto_images_per_s": ips["auto"],
        "speedup_auto": ips["auto"] / ref_ips,
        "auto_vs_float32": ips["auto"] / gt_ips,
        "note": "same model, batch, optimizer; neither side runs the gradient-ratio diagnostics; the "
        "reference and `speedup` are float32, `speedup_auto` uses train.amp=auto",
        "environment": environment_info(trainer.device),
    }
    write_result(result, args.output)


if __name__ == "__main__":
    main()

"""gradtail's training throughput vs a reference loop written the way the original repositories do it.

Reference: a ``torch.utils.data.Dataset`` returning PIL images through torchvision transforms
(RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize), a ``DataLoader`` with
``num_workers=2`` and shuffling, and a plain forward / cross-entropy / backward / SGD step.
gradtail: the same model, batch size, optimizer and number of steps through ``Trainer.train_step``
fed by the in-memory :class:`~gradtail.data.loader.BatchLoader`. Both run on the same long-tailed
Fashion-MNIST subset in the same process, alternating, and the figure is the ratio of images/s.

    python benchmarks/reference_loop.py --output runs/bench/reference_loop.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

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

    cfg = load_config(args.config, ["train.progress=false", "train.diagnostics=false"])
    trainer = Trainer(cfg, output_dir=tempfile.mkdtemp(prefix="gradtail_ref_"), verbose=False)
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

    trainer.model.train()
    epoch = [0]

    def gradtail_loop(steps: int) -> float:
        start = time.perf_counter()
        done = 0
        while done < steps:
            trainer.train_loader.set_epoch(epoch[0])
            epoch[0] += 1
            for x, y in trainer.train_loader:
                trainer.train_step(x, y, epoch=0)
                done += 1
                if done == steps:
                    break
        return time.perf_counter() - start

    reference(5)  # warm-up: workers started, first batches
    gradtail_loop(5)
    ref_times, gt_times = [], []
    for _ in range(args.trials):
        ref_times.append(reference(args.steps))
        gt_times.append(gradtail_loop(args.steps))
    ref_ips = args.steps * bs / statistics.median(ref_times)
    gt_ips = args.steps * bs / statistics.median(gt_times)
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
        "note": "same model, batch, optimizer; neither side runs the gradient-ratio diagnostics",
        "environment": environment_info(trainer.device),
    }
    write_result(result, args.output)


if __name__ == "__main__":
    main()

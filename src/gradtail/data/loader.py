"""In-memory batch loading with whole-batch tensor augmentation.

The whole dataset lives as one uint8 tensor on the training device. Each batch is gathered by index and
augmented with tensor ops over the whole batch (random crop with zero padding, horizontal flip, an
optional uint8 policy stage such as AutoAugment + Cutout, normalisation): no per-sample Python, no
worker processes, no host-device copies in the hot path.

Randomness is reproducible and resumable: the sample order comes from the sampler's ``(seed, epoch)``
and the augmentation draws from a ``torch.Generator`` seeded by ``(seed, epoch)`` on the data's device,
so an epoch replays bit-identically after a resume from an epoch-boundary checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed derived from (seed, epoch, stream) with a fixed integer hash (SplitMix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


@dataclass
class BatchAugment:
    """Whole-batch augmentation of uint8 (B, C, H, W) images -> normalised float (B, C, H, W)."""

    mean: Sequence[float]
    std: Sequence[float]
    crop_padding: int = 0
    hflip: bool = False
    policy: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None  # uint8 -> uint8

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ConfigError("augment.mean and augment.std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ConfigError("augment.std entries must be > 0")
        if self.crop_padding < 0:
            raise ConfigError("augment.crop_padding must be >= 0")
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1] -> (x - mean) / std, per channel."""
        if x.shape[1] != len(self.mean):
            raise ConfigError(f"images have {x.shape[1]} channels, normalisation has {len(self.mean)}")
        if x.device not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            # (x/255 - mean)/std  ==  x * (1/(255 std)) - mean/std: one fused multiply-add.
            self._stats[x.device] = (1.0 / (255.0 * std), mean / std)
        scale, shift = self._stats[x.device]
        return torch.addcmul(-shift, x.float(), scale)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            # One offset pair per image; gather rows then columns with broadcast index tensors.
            off = torch.randint(0, 2 * p + 1, (2, b), device=x.device, generator=generator)
            rows = (off[0].view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
            cols = (off[1].view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
            padded = padded.gather(2, rows.expand(b, x.shape[1], h, padded.shape[3]))
            x = padded.gather(3, cols.expand(b, x.shape[1], h, w))
        if self.hflip:
            flip = torch.rand(b, device=x.device, generator=generator) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        if self.policy is not None:  # e.g. AutoAugment + Cutout (gradtail.data.augment_policies)
            x = self.policy(x, generator)
        return self.normalize(x)


class BatchLoader:
    """Iterates (images, labels) batches of an in-memory uint8 dataset on ``device``.

    Args:
        images: uint8 (N, C, H, W); moved to ``device`` once.
        labels: int64 (N,).
        batch_size: per-process batch size.
        augment: the batch transform (``None``: normalisation only is still required, pass a
            :class:`BatchAugment` with padding 0 and no flip).
        sampler: an object with ``indices(epoch, rank, world_size) -> LongTensor`` (see
            ``gradtail.data.samplers``); ``None`` = sequential order (evaluation).
        train: whether augmentation is random (train) or only normalisation (eval).
        drop_last: drop the last partial batch.
        seed: seeds the augmentation stream together with the epoch.
        rank, world_size: this process's share under multi-process training.
        views, num_views: a uint8 -> uint8 view transform (e.g.
            :class:`~gradtail.data.contrastive_views.SimCLRViews`) and how many extra views of each
            training image to make from the stored (un-augmented) images; with ``num_views > 0`` a training
            batch is ``(x, y, v)``, v the normalised views stacked view-major into (num_views * B, C, H, W).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        augment: BatchAugment,
        sampler: object | None = None,
        train: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        views: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
        num_views: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ConfigError(f"labels {tuple(labels.shape)} do not match images ({images.shape[0]},)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, dtype=torch.long)
        self.batch_size = batch_size
        self.augment = augment
        self.sampler = sampler
        self.train = train
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        if num_views < 0 or (num_views > 0 and views is None):
            raise ConfigError(f"num_views={num_views} needs a view transform and must be >= 0")
        self.views = views
        self.num_views = int(num_views) if train else 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        if self.sampler is None:
            n = self.images.shape[0]
            order = torch.arange(n, device=self.device)
            return order[self.rank :: self.world_size] if self.world_size > 1 else order
        order = self.sampler.indices(self.epoch, rank=self.rank, world_size=self.world_size)  # type: ignore[attr-defined]
        return order.to(self.device)

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _num_samples(self) -> int:
        if self.sampler is None:
            n = self.images.shape[0]
            return len(range(self.rank, n, self.world_size))
        return int(self.sampler.num_samples_per_rank(self.world_size))  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self._order()
        gen = None
        if self.train:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(epoch_seed(self.seed, self.epoch, stream=1 + self.rank))
        n = order.numel()
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            raw = self.images.index_select(0, idx)
            x = self.augment(raw, gen) if self.train else self.augment.normalize(raw)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.labels.index_select(0, idx)
            if self.num_views == 0:
                yield x, y
                continue
            assert self.views is not None
            v = torch.cat([self.augment.normalize(self.views(raw, gen)) for _ in range(self.num_views)])
            if self.channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            yield x, y, v

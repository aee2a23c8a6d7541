"""Batch loader: whole-batch augmentation equals the per-image definition; reproducible by (seed, epoch)."""

import torch
import torch.nn.functional as F

from gradtail.data.loader import BatchAugment, BatchLoader, epoch_seed


def _images(n=12, c=3, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_crop_and_flip_match_per_image_reference():
    x = _images()
    aug = BatchAugment(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], crop_padding=2, hflip=True)
    gen = torch.Generator().manual_seed(5)
    out = aug(x, gen)
    # Replay the same random draws and build each image by hand.
    gen = torch.Generator().manual_seed(5)
    off = torch.randint(0, 5, (2, x.shape[0]), generator=gen)
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    mean = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    for i in range(x.shape[0]):
        padded = F.pad(x[i], (2, 2, 2, 2))
        crop = padded[:, off[0, i] : off[0, i] + 8, off[1, i] : off[1, i] + 6]
        if flip[i]:
            crop = crop.flip(2)
        ref = (crop.float() / 255 - mean) / std
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_eval_mode_only_normalises():
    x = _images()
    aug = BatchAugment(mean=[0.0] * 3, std=[1.0] * 3, crop_padding=4, hflip=True)
    loader = BatchLoader(x, torch.arange(12) % 3, 5, aug, train=False)
    xs = torch.cat([b for b, _ in loader])
    torch.testing.assert_close(xs, x.float() / 255)
    assert len(loader) == 3


class _Perm:
    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def indices(self, epoch, rank=0, world_size=1):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g)[rank::world_size]

    def num_samples_per_rank(self, world_size):
        return self.n // world_size


def test_epochs_are_reproducible_and_differ():
    x, y = _images(n=20), torch.arange(20)
    aug = BatchAugment(mean=[0.5] * 3, std=[0.5] * 3, crop_padding=2, hflip=True)

    def run(epoch):
        loader = BatchLoader(x, y, 7, aug, sampler=_Perm(20, 3), seed=3)
        loader.set_epoch(epoch)
        return [(b.clone(), t.clone()) for b, t in loader]

    a, b, c = run(1), run(1), run(2)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([t for _, t in a]), torch.cat([t for _, t in c]))
    assert sorted(torch.cat([t for _, t in a]).tolist()) == list(range(20))


def test_drop_last():
    x, y = _images(n=20), torch.arange(20)
    aug = BatchAugment(mean=[0.5] * 3, std=[0.5] * 3)
    loader = BatchLoader(x, y, 7, aug, sampler=_Perm(20, 0), drop_last=True)
    assert len(loader) == 2 and sum(t.numel() for _, t in loader) == 14

"""Extra augmented views for contrastive terms (BCL, docs/methods/gbg.md §3), made for a whole batch at once.

:class:`SimCLRViews` maps a uint8 batch (B, C, H, W) to one SimCLR-style view per image, uint8, same
size: random resized crop (area scale 0.2-1, aspect 3/4-4/3, bilinear), horizontal flip (p 0.5), colour
jitter (brightness/contrast/saturation 0.4, hue 0.1) with probability 0.8, grayscale with probability
0.2. Everything is tensor ops over the batch on its device, drawn from the loader's generator, so views
are reproducible and resumable like the rest of the batch.

Choices (documented deviations from torchvision's per-image PIL pipeline):

- the crop box is drawn in continuous coordinates: up to 10 (scale, ratio) draws per image, the first
  that fits is kept, else the whole image (torchvision's fallback for square images);
- the colour-jitter factors are applied in the fixed order brightness, contrast, saturation, hue
  (torchvision draws a random order per call); values stay float until one final rounding to uint8;
- on 1-channel images saturation, hue and grayscale are identities (only brightness and contrast act).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError

_LUMA = (0.299, 0.587, 0.114)


def _uniform(
    n: int, low: float, high: float, device: torch.device, gen: torch.Generator | None
) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) * (high - low) + low


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float RGB (n, 3, H, W) -> (n, 1, H, W); a 1-channel image is its own luma."""
    if x.shape[1] == 1:
        return x
    return (x[:, 0] * _LUMA[0] + x[:, 1] * _LUMA[1] + x[:, 2] * _LUMA[2]).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1] (n, 3, H, W) -> HSV with hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    i = i.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in enumerate(choices):
        m = (i == k).unsqueeze(1)
        out = torch.where(m, torch.stack([rr, gg, bb], dim=1), out)
    return out


class SimCLRViews:
    """One SimCLR-style view of every image of a uint8 batch (see the module docstring).

    Args:
        scale: range of the crop's area as a fraction of the image (default 0.2-1, docs/methods/gbg.md §3).
        ratio: range of the crop's aspect ratio (width / height).
        jitter: (brightness, contrast, saturation, hue) strengths; factors drawn in [1 - s, 1 + s]
            (hue: a shift in [-s, s] of a turn).
        jitter_p: probability that an image is colour-jittered.
        grayscale_p: probability that an image is turned to gray (3-channel luma).
        hflip: flip horizontally with probability 0.5.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        hflip: bool = True,
    ) -> None:
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"view crop scale must be 0 < low <= high <= 1, got {list(scale)}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"view crop ratio must be 0 < low <= high, got {list(ratio)}")
        if len(jitter) != 4 or any(j < 0 for j in jitter) or jitter[3] > 0.5:
            raise ConfigError(f"view jitter must be 4 values >= 0 (hue <= 0.5), got {list(jitter)}")
        for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p)):
            if not 0 <= p <= 1:
                raise ConfigError(f"view {name} must be in [0, 1], got {p}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = float(jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.hflip = bool(hflip)

    def __repr__(self) -> str:
        return (
            f"SimCLRViews(scale={self.scale}, ratio={self.ratio}, jitter={self.jitter}, "
            f"jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, hflip={self.hflip})"
        )

    def crop_boxes(
        self, n: int, device: torch.device, gen: torch.Generator | None, aspect: float = 1.0
    ) -> torch.Tensor:
        """(n, 4) boxes (centre x, centre y, width, height) as fractions of the image's width and height.

        ``aspect``: the image's width / height, so that a box's pixel aspect ratio is the drawn ratio.
        """
        tries = 10
        area = _uniform(n * tries, *self.scale, device, gen).view(n, tries)
        log_r = _uniform(n * tries, math.log(self.ratio[0]), math.log(self.ratio[1]), device, gen)
        r = log_r.exp().view(n, tries)
        w, h = (area * r / aspect).sqrt(), (area * aspect / r).sqrt()
        ok = (w <= 1) & (h <= 1)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=device))
        w = torch.where(ok.any(1), w.gather(1, first[:, None])[:, 0], torch.ones(n, device=device))
        h = torch.where(ok.any(1), h.gather(1, first[:, None])[:, 0], torch.ones(n, device=device))
        cx = w / 2 + torch.rand(n, device=device, generator=gen) * (1 - w)
        cy = h / 2 + torch.rand(n, device=device, generator=gen) * (1 - h)
        return torch.stack([cx, cy, w, h], dim=1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ConfigError(f"views expect uint8 (B, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
        n, c, hgt, wid = x.shape
        dev = x.device
        box = self.crop_boxes(n, dev, generator, aspect=wid / hgt)
        flip = torch.ones(n, device=dev)
        if self.hflip:
            flip = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -flip, flip)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = box[:, 2] * flip
        theta[:, 0, 2] = 2 * box[:, 0] - 1
        theta[:, 1, 1] = box[:, 3]
        theta[:, 1, 2] = 2 * box[:, 1] - 1
        grid = F.affine_grid(theta, [n, c, hgt, wid], align_corners=False)
        out = F.grid_sample(
            x.float() / 255.0, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        out = self._color(out, generator)
        return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)

    def _color(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        n, c = x.shape[:2]
        dev = x.device
        b, con, sat, hue = self.jitter
        apply = (torch.rand(n, device=dev, generator=gen) < self.jitter_p).view(n, 1, 1, 1)
        j = x
        fb = _uniform(n, max(0.0, 1 - b), 1 + b, dev, gen).view(n, 1, 1, 1)
        j = (j * fb).clamp(0, 1)
        fc = _uniform(n, max(0.0, 1 - con), 1 + con, dev, gen).view(n, 1, 1, 1)
        mean = luma(j).mean(dim=(1, 2, 3), keepdim=True)
        j = (fc * j + (1 - fc) * mean).clamp(0, 1)
        fs = _uniform(n, max(0.0, 1 - sat), 1 + sat, dev, gen).view(n, 1, 1, 1)
        fh = _uniform(n, -hue, hue, dev, gen).view(n, 1, 1)
        if c == 3:
            j = (fs * j + (1 - fs) * luma(j)).clamp(0, 1)
            hsv = rgb_to_hsv(j)
            hsv = torch.stack([(hsv[:, 0] + fh) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
            j = hsv_to_rgb(hsv)
        x = torch.where(apply, j, x)
        gray = (torch.rand(n, device=dev, generator=gen) < self.grayscale_p).view(n, 1, 1, 1)
        if c == 3:
            x = torch.where(gray, luma(x).expand(-1, 3, -1, -1), x)
        return x


__all__ = ["SimCLRViews", "hsv_to_rgb", "luma", "rgb_to_hsv"]

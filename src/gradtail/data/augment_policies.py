"""Batched AutoAugment (CIFAR-10 policy) and Cutout for uint8 image batches on any device.

Both transforms take a uint8 ``(B, C, H, W)`` batch and a ``torch.Generator`` (on the batch's device,
or ``None`` for the global RNG) and return a uint8 batch of the same shape, so they can run on the
training device before the crop/flip/normalise of :class:`gradtail.data.loader.BatchAugment`.

:class:`BatchAutoAugment` keeps the per-image semantics of AutoAugment (Cubuk et al., 2019): every
image draws its own sub-policy, its own two coin flips and its own two magnitude signs. The work is
batched: for each of the two steps, images are grouped by operation (one ``argsort`` and one host
read of the group sizes per call) and each operation runs once on its group with per-image
magnitudes as tensors. The Python loop runs over operations (at most 14 per step), never over images.

Operations follow torchvision's tensor kernels (``torchvision.transforms.v2.functional``) and its
magnitude discretisation (10 bins; float32 ``linspace`` so thresholds match it exactly): geometric
ops use a nearest-neighbour ``grid_sample`` with the same inverse matrices (shears about the top-left
corner, rotation and translation about the centre, translations truncated to whole pixels); colour
ops blend with a degenerate image with a fused multiply-add (``addcmul``, as torchvision's
``add(alpha=)``) and truncate to uint8. On CPU every op equals torchvision's per-image output bit for
bit (tests); another device's float rounding may move a blended pixel by one intensity level.

:class:`BatchCutout` (DeVries & Taylor, 2017) zeroes one ``size x size`` square per image around a
uniformly drawn centre, clipped at the border. It runs on uint8 images before normalisation, so the
hole is black (fill 0), as in recipes that apply Cutout after ``ToTensor`` and before ``Normalize``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError, InputError

BatchTransform = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
Fill = float | Sequence[float]

OPS: tuple[str, ...] = (
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
_OP_INDEX = {name: i for i, name in enumerate(OPS)}
_SIGNED = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
)
NUM_BINS = 10

Step = tuple[str, float, int | None]  # (operation, probability, magnitude bin or None)

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, appendix): 25 sub-policies of two steps each.
CIFAR10_POLICY: tuple[tuple[Step, Step], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
POLICIES: dict[str, tuple[tuple[Step, Step], ...]] = {"cifar10": CIFAR10_POLICY}


def magnitude_bins(op: str, height: int, width: int) -> list[float]:
    """The unsigned magnitude of each of the 10 bins of ``op`` for an ``height x width`` image.

    Shears are matrix coefficients (0 to 0.3), translations pixels (0 to 150/331 of the side),
    rotations degrees (0 to 30), enhancements the factor minus one (0 to 0.9), Posterize the bits
    kept (8 to 4), Solarize the threshold (255 to 0); ops without a magnitude get zeros.
    """
    top = {
        "ShearX": 0.3,
        "ShearY": 0.3,
        "TranslateX": 150.0 / 331.0 * width,
        "TranslateY": 150.0 / 331.0 * height,
        "Rotate": 30.0,
        "Brightness": 0.9,
        "Color": 0.9,
        "Contrast": 0.9,
        "Sharpness": 0.9,
    }
    if op in top:
        return torch.linspace(0.0, top[op], NUM_BINS).tolist()
    if op == "Posterize":
        return [8.0 - round(k / ((NUM_BINS - 1) / 4)) for k in range(NUM_BINS)]
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, NUM_BINS).tolist()
    if op in OPS:
        return [0.0] * NUM_BINS
    raise ConfigError(f"unknown AutoAugment operation {op!r}; known: {', '.join(OPS)}")


# --------------------------------------------------------------------------- operations


def _fill_tensor(fill: Fill, channels: int, device: torch.device) -> torch.Tensor:
    values = [float(fill)] if isinstance(fill, (int, float)) else [float(f) for f in fill]
    if len(values) not in (1, channels):
        raise ConfigError(f"fill has {len(values)} values for {channels}-channel images")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def _per_image(magnitude: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Magnitudes as a float64 (n,) tensor (float64 so derived ratios round like Python floats)."""
    m = torch.as_tensor(magnitude, dtype=torch.float64, device=device)
    return m.expand(n) if m.dim() == 0 else m


def _warp(x: torch.Tensor, theta: torch.Tensor, fill: Fill) -> torch.Tensor:
    """Nearest-neighbour warp with per-image inverse matrices ``theta`` (n, 2, 3) in pixel units.

    ``theta`` maps an output pixel centre to its source, both measured from the image centre. Outside
    the image the result is ``fill``: sampling ``x - fill`` with zero padding and adding ``fill`` back is
    exact for nearest interpolation.
    """
    n, c, h, w = x.shape
    dev = x.device
    base = torch.ones(1, h, w, 3, dtype=torch.float32, device=dev)
    base[..., 0] = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=dev)
    base[..., 1] = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=dev).view(h, 1)
    half = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=dev)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta.float().transpose(1, 2) / half)
    fill_t = _fill_tensor(fill, c, dev)
    out = F.grid_sample(
        x.float() - fill_t, grid.view(n, h, w, 2), mode="nearest", padding_mode="zeros", align_corners=False
    )
    return (out + fill_t).round_().clamp_(0, 255).to(torch.uint8)


def _affine_theta(op: str, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image inverse matrices (n, 2, 3), float64, for a geometric op with signed magnitudes ``m``."""
    n = m.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=m.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if op == "ShearX":  # x_src = x + m (y - y_top): shear about the top-left corner
        theta[:, 0, 1] = m
        theta[:, 0, 2] = m * (0.5 * h)
    elif op == "ShearY":
        theta[:, 1, 0] = m
        theta[:, 1, 2] = m * (0.5 * w)
    elif op == "TranslateX":  # whole pixels, truncated toward zero; positive moves content right
        theta[:, 0, 2] = -torch.trunc(m)
    elif op == "TranslateY":
        theta[:, 1, 2] = -torch.trunc(m)
    else:  # Rotate: degrees, counter-clockwise, about the centre
        rad = m * (math.pi / 180.0)
        cos, sin = torch.cos(rad), torch.sin(rad)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return theta


def _grayscale(xf: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float RGB (n, 3, H, W), floored as for uint8 images -> (n, 1, H, W)."""
    luma = xf[:, 0].mul(0.2989).add_(xf[:, 1], alpha=0.587).add_(xf[:, 2], alpha=0.114)
    return luma.floor_().unsqueeze(1)


def _blend(xf: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` per image, clamped and truncated to uint8."""
    ratio = factor.float().view(-1, 1, 1, 1)
    rest = (1.0 - factor).float().view(-1, 1, 1, 1)
    return xf.mul(ratio).addcmul_(other, rest).clamp_(0, 255).to(torch.uint8)


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a 3x3 smoothing (centre weight 5/13) of the interior; border pixels are kept."""
    _, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x.clone()
    k = torch.full((3, 3), 1.0 / 13.0, dtype=torch.float32, device=x.device)
    k[1, 1] = 5.0 / 13.0
    xf = x.float()
    smooth = F.conv2d(xf, k.expand(c, 1, 3, 3), groups=c).round_()
    inner = xf[:, :, 1:-1, 1:-1]
    rest = (1.0 - factor).float().view(-1, 1, 1, 1)
    xf[:, :, 1:-1, 1:-1] = inner.addcmul(smooth - inner, rest)
    return xf.clamp_(0, 255).to(torch.uint8)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to [0, 255]; constant channels are left unchanged."""
    xf = x.float()
    lo = xf.amin(dim=(-2, -1), keepdim=True)
    hi = xf.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(lo), (hi - lo) * (1.0 / 255.0))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((xf - lo) / scale).clamp_(0, 255).to(torch.uint8)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image (PIL's look-up table rule), vectorised.

    One histogram per (image, channel) row via ``scatter_add_`` of ones; ``step = (pixels - count of
    the largest value present) // 255``; ``lut[v] = (step // 2 + #pixels below v) // step``; rows with
    ``step == 0`` (nearly constant) are left unchanged.
    """
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top_count = hist.gather(1, flat.amax(dim=1, keepdim=True))
    step = (h * w - top_count).div(255, rounding_mode="floor")
    below = hist.cumsum(dim=1) - hist  # pixels strictly below each value
    lut = (below + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.to(torch.uint8).view(n, c, h, w)


def apply_op(x: torch.Tensor, op: str, magnitude: float | torch.Tensor = 0.0, fill: Fill = 0) -> torch.Tensor:
    """Apply one AutoAugment operation to every image of a uint8 batch (B, C, H, W).

    Args:
        x: uint8 images, C in {1, 3} for the colour ops.
        op: one of :data:`OPS`.
        magnitude: the signed magnitude, a float for the whole batch or a (B,) tensor per image, in
            the units of :func:`magnitude_bins` (enhancements: factor = 1 + magnitude; Posterize: bits
            kept; Solarize: threshold, pixels >= it are inverted). Ignored by AutoContrast, Equalize,
            Invert.
        fill: value (or per-channel values) of pixels moved in from outside by geometric ops.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise InputError(f"expected uint8 (B, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        return _warp(x, _affine_theta(op, _per_image(magnitude, n, x.device), h, w), fill)
    if op == "Invert":
        return x.bitwise_not()
    if op == "AutoContrast":
        return _autocontrast(x)
    if op == "Equalize":
        return _equalize(x)
    if op == "Posterize":
        bits = _per_image(magnitude, n, x.device).round().clamp(0, 8).long()
        mask = (256 - torch.pow(2, 8 - bits)).to(torch.uint8).view(-1, 1, 1, 1)
        return x.bitwise_and(mask)
    if op == "Solarize":
        threshold = _per_image(magnitude, n, x.device).float().view(-1, 1, 1, 1)
        return torch.where(x.float() >= threshold, x.bitwise_not(), x)
    if op not in ("Brightness", "Color", "Contrast", "Sharpness"):
        raise ConfigError(f"unknown AutoAugment operation {op!r}; known: {', '.join(OPS)}")
    if c not in (1, 3):
        raise InputError(f"colour operations need 1 or 3 channels, got {c}")
    factor = 1.0 + _per_image(magnitude, n, x.device)
    if op == "Sharpness":
        return _sharpness(x, factor)
    xf = x.float()
    if op == "Brightness":
        return _blend(xf, torch.zeros_like(xf[:, :1]), factor)
    if op == "Color":
        return x.clone() if c == 1 else _blend(xf, _grayscale(xf), factor)
    gray = _grayscale(xf) if c == 3 else xf
    return _blend(xf, gray.mean(dim=(-3, -2, -1), keepdim=True), factor)


# --------------------------------------------------------------------------- AutoAugment


@dataclass(frozen=True)
class AutoAugmentDraw:
    """The random choices of one batch: per image a sub-policy, and per step a coin and a sign."""

    policy: torch.Tensor  # (B,) int64 sub-policy index
    coin: torch.Tensor  # (B, 2) float in [0, 1): step s runs when coin < its probability
    negate: torch.Tensor  # (B, 2) bool: a signed magnitude is negated


class BatchAutoAugment:
    """AutoAugment on a uint8 batch with per-image sub-policies, batched by operation.

    Args:
        policy: the policy name (``"cifar10"``).
        fill: value (or per-channel values, in 0..255) of pixels moved in by geometric ops; 0 = black,
            as torchvision's default. (PIL re-implementations of the CIFAR policy often use 128.)
    """

    def __init__(self, policy: str = "cifar10", fill: Fill = 0) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown AutoAugment policy {policy!r}; known: {', '.join(sorted(POLICIES))}")
        self.policy = policy
        self.fill = fill
        self.sub_policies = POLICIES[policy]
        self._tables: dict[tuple[torch.device, int, int], tuple[torch.Tensor, ...]] = {}

    def __repr__(self) -> str:
        return f"BatchAutoAugment(policy={self.policy!r}, fill={self.fill!r})"

    def _table(self, device: torch.device, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """(op index, probability, magnitude, signed), each (P, 2), cached per device and image size."""
        key = (device, h, w)
        if key not in self._tables:
            ops, probs, mags, signed = [], [], [], []
            for sub in self.sub_policies:
                ops.append([_OP_INDEX[op] for op, _, _ in sub])
                probs.append([p for _, p, _ in sub])
                mags.append([0.0 if b is None else magnitude_bins(op, h, w)[b] for op, _, b in sub])
                signed.append([op in _SIGNED for op, _, _ in sub])
            self._tables[key] = (
                torch.tensor(ops, dtype=torch.long, device=device),
                torch.tensor(probs, dtype=torch.float32, device=device),
                torch.tensor(mags, dtype=torch.float64, device=device),
                torch.tensor(signed, dtype=torch.bool, device=device),
            )
        return self._tables[key]

    def draw(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None
    ) -> AutoAugmentDraw:
        """Draw every image's sub-policy, coins and signs (in this order) from ``generator``."""
        device = torch.device(device)
        policy = torch.randint(0, len(self.sub_policies), (batch,), device=device, generator=generator)
        coin = torch.rand((batch, 2), device=device, generator=generator)
        negate = torch.randint(0, 2, (batch, 2), device=device, generator=generator) == 1
        return AutoAugmentDraw(policy, coin, negate)

    def steps(self, d: AutoAugmentDraw, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and step, the op index into :data:`OPS` (``len(OPS)`` = skipped) and the signed
        magnitude (float64), both (B, 2)."""
        ops, probs, mags, signed = self._table(d.policy.device, height, width)
        op = ops[d.policy]
        op = torch.where(d.coin < probs[d.policy], op, torch.full_like(op, len(OPS)))
        mag = mags[d.policy]
        mag = torch.where(signed[d.policy] & d.negate, -mag, mag)
        return op, mag

    def apply(self, x: torch.Tensor, d: AutoAugmentDraw) -> torch.Tensor:
        """Apply drawn choices: step 0 then step 1; each op runs once on the images that drew it."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise InputError(f"expected uint8 (B, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
        b, _, h, w = x.shape
        if d.policy.shape != (b,):
            raise InputError(f"draw is for {tuple(d.policy.shape)} images, batch has {b}")
        if b == 0:
            return x.clone()
        op, mag = self.steps(d, h, w)
        k = len(OPS) + 1
        offsets = torch.tensor([0, k], device=x.device)
        counts = torch.bincount((op + offsets).view(-1), minlength=2 * k).tolist()  # one host sync
        out = x.clone()
        for s in range(2):
            sizes = counts[s * k : (s + 1) * k]
            if sizes[-1] == b:  # nobody runs this step
                continue
            order = torch.argsort(op[:, s], stable=True)
            groups = torch.split(order, sizes)
            for i, idx in enumerate(groups[:-1]):
                if idx.numel():
                    sub = apply_op(out.index_select(0, idx), OPS[i], mag[idx, s], self.fill)
                    out.index_copy_(0, idx, sub)
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], x.device, generator))


# --------------------------------------------------------------------------- Cutout


class BatchCutout:
    """Cutout: one ``size x size`` hole per image, centred on a uniform pixel, clipped at the border.

    Rows ``[cy - size // 2, cy - size // 2 + size)`` and the same columns around ``cx`` are set to
    ``fill`` (0 = black on uint8 images before normalisation). A hole near the border is cut by it, so
    it can cover fewer than ``size**2`` pixels (DeVries & Taylor, 2017). ``size = 0`` is the identity.
    """

    def __init__(self, size: int = 16, fill: int = 0) -> None:
        if size < 0:
            raise ConfigError(f"cutout size must be >= 0, got {size}")
        if not 0 <= fill <= 255:
            raise ConfigError(f"cutout fill must be in 0..255, got {fill}")
        self.size = int(size)
        self.fill = int(fill)

    def __repr__(self) -> str:
        return f"BatchCutout(size={self.size}, fill={self.fill})"

    def draw(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | str,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Hole centres (B, 2) int64 as (row, column): rows drawn first, then columns."""
        rows = torch.randint(0, height, (batch,), device=device, generator=generator)
        cols = torch.randint(0, width, (batch,), device=device, generator=generator)
        return torch.stack([rows, cols], dim=1)

    def mask(self, centres: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boolean (B, 1, H, W), True inside each image's hole, from broadcast comparisons."""
        start = centres - self.size // 2
        r = torch.arange(height, device=centres.device)
        c = torch.arange(width, device=centres.device)
        in_r = (r >= start[:, :1]) & (r < start[:, :1] + self.size)
        in_c = (c >= start[:, 1:]) & (c < start[:, 1:] + self.size)
        return (in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1)

    def apply(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise InputError(f"expected (B, C, H, W) images, got {tuple(x.shape)}")
        return x.masked_fill(self.mask(centres, x.shape[2], x.shape[3]), self.fill)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.size == 0:
            return x
        return self.apply(x, self.draw(x.shape[0], x.shape[2], x.shape[3], x.device, generator))


# --------------------------------------------------------------------------- composition


class BatchCompose:
    """Runs batch transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[BatchTransform]) -> None:
        self.transforms = tuple(transforms)

    def __repr__(self) -> str:
        return f"BatchCompose({', '.join(map(repr, self.transforms))})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x


def compose_batch_transforms(*transforms: BatchTransform | None) -> BatchCompose:
    """Compose ``(x, generator) -> x`` transforms left to right; ``None`` entries are skipped."""
    return BatchCompose([t for t in transforms if t is not None])


def build_policy_transforms(autoaugment: str | None, cutout: int, fill: Fill = 0) -> BatchCompose | None:
    """The uint8 policy stage of a recipe: AutoAugment (if named) then Cutout (if ``cutout > 0``)."""
    parts: list[BatchTransform] = []
    if autoaugment:
        parts.append(BatchAutoAugment(autoaugment, fill=fill))
    if cutout:
        parts.append(BatchCutout(cutout))
    return BatchCompose(parts) if parts else None


def _throughput(batch: int = 128, size: int = 32, repeats: int = 50) -> None:
    """Print the best and median time of AutoAugment / Cutout on a (batch, 3, size, size) uint8 CPU batch."""
    import time

    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    transforms = {
        "autoaugment": BatchAutoAugment(),
        "cutout": BatchCutout(16),
        "autoaugment+cutout": compose_batch_transforms(BatchAutoAugment(), BatchCutout(16)),
    }
    for name, t in transforms.items():
        t(x, gen)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            t(x, gen)
            times.append(time.perf_counter() - start)
        times.sort()
        best, median = times[0], times[len(times) // 2]
        print(
            f"{name:>20}: best {best * 1e3:6.2f} ms, median {median * 1e3:6.2f} ms per batch of {batch} "
            f"({batch / median:,.0f} images/s at the median, {torch.get_num_threads()} threads)"
        )


if __name__ == "__main__":
    _throughput()

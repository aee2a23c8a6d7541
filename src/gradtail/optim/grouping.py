"""GBG stage 1: group classes whose training gradients point the same way (gbg.md §1).

- :func:`class_gradient_prototypes`: per-class mean gradient of the training loss w.r.t. the shared
  (backbone) parameters, over the un-augmented training set, model in eval mode; optionally sketched to
  k dimensions by a seeded Gaussian random projection (:class:`GaussianSketch`, Johnson-Lindenstrauss).
- :func:`spectral_groups`: spectral clustering of the affinity A = cos + 1, assignment by ``cluster_qr``.
- :func:`frequency_groups` and :func:`random_groups`: the ablation groupings.

Every grouping returns a LongTensor (C,) of group ids, contiguous from 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GaussianSketch:
    """x -> x R / sqrt(k) with R a (D, k) matrix of iid N(0, 1), never held whole (gbg.md §1, "Cost").

    R is regenerated row-chunk by row-chunk from a generator re-seeded with ``seed`` at every call, so
    memory is O(k * chunk_rows) (``chunk_rows = max(1, chunk_elems // k)``) whatever D is, and the map is
    deterministic for a given (seed, dim, sketch_dim, chunk_elems, device kind). Inner products are
    preserved in expectation and cosines up to O(1/sqrt(k)). When R fits in one chunk it is kept.
    """

    def __init__(
        self,
        dim: int,
        sketch_dim: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        chunk_elems: int = 1 << 22,
    ) -> None:
        if dim < 1 or sketch_dim < 1:
            raise InputError(f"sketch needs dim >= 1 and sketch_dim >= 1, got {dim}, {sketch_dim}")
        self.dim = int(dim)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_rows = max(1, int(chunk_elems) // self.sketch_dim)
        self._cached: torch.Tensor | None = None

    def _chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_rows, self.dim)) for s in range(0, self.dim, self.chunk_rows)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project a (D,) or (b, D) tensor to (k,) or (b, k) (float32, on the sketch's device)."""
        squeeze = x.dim() == 1
        x2 = x.reshape(1, -1) if squeeze else x
        if x2.shape[1] != self.dim:
            raise InputError(f"sketch expects vectors of length {self.dim}, got {x2.shape[1]}")
        x2 = x2.to(self.device, torch.float32)
        scale = 1.0 / math.sqrt(self.sketch_dim)
        chunks = self._chunks()
        if len(chunks) == 1:
            if self._cached is None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(self.seed)
                self._cached = torch.randn(self.dim, self.sketch_dim, generator=gen, device=self.device)
            out = x2 @ self._cached
        else:
            out = torch.zeros(x2.shape[0], self.sketch_dim, device=self.device)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.seed)
            for start, stop in chunks:
                r = torch.randn(stop - start, self.sketch_dim, generator=gen, device=self.device)
                out.addmm_(x2[:, start:stop], r)
        out.mul_(scale)
        return out[0] if squeeze else out


def _backbone_params(model: nn.Module) -> list[nn.Parameter]:
    """The shared parameters (gbg.md §1): ``model.backbone_parameters()``, else all but ``classifier``."""
    inner = model.module if hasattr(model, "module") else model
    if hasattr(inner, "backbone_parameters"):
        params = list(inner.backbone_parameters())
    else:
        head = {id(p) for p in inner.classifier.parameters()} if hasattr(inner, "classifier") else set()
        params = [p for p in inner.parameters() if id(p) not in head]
    return [p for p in params if p.requires_grad]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    inner = model.module if hasattr(model, "module") else model
    if hasattr(inner, "features") and hasattr(inner, "classifier"):
        return inner.classifier(inner.features(x))
    return inner(x)


def class_gradient_prototypes(
    model: nn.Module,
    loss_fn: LossFn | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    sketch_dim: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    params: Sequence[nn.Parameter] | None = None,
    class_block: int = 8,
) -> torch.Tensor:
    """Per-class mean gradient of the training loss w.r.t. the shared parameters (gbg.md §1).

    The data are visited class by class (batches never mix classes), so each backward yields one class's
    gradient sum: ``torch.autograd.grad`` of ``n * loss_fn(logits, labels)`` (``loss_fn`` reduces by the
    mean, as every gradtail loss does; default: cross-entropy), accumulated in place into a flat buffer.
    ``model.eval()`` during the pass (BatchNorm statistics untouched), the previous mode restored after;
    ``.grad`` of the parameters is not touched. ``transform`` maps a batch of stored images (e.g. uint8)
    to the model's input (normalisation, no augmentation). A class without samples gets a zero row.

    Args:
        params: the shared parameters; default the model's ``backbone_parameters()`` (classifier excluded).
        sketch_dim: project each class gradient to this many dimensions with :class:`GaussianSketch`
            (seeded by ``seed``); ``class_block`` class gradients are projected together, so memory is
            ``class_block * D + C * sketch_dim`` floats plus one projection chunk.

    Returns:
        (C, D) float32 prototypes, or (C, sketch_dim) when sketched, on ``device`` (default: the model's).
    """
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    shared = list(params) if params is not None else _backbone_params(model)
    if not shared:
        raise InputError("class_gradient_prototypes: the model has no shared parameters requiring grad")
    loss = loss_fn if loss_fn is not None else F.cross_entropy
    sizes = [p.numel() for p in shared]
    dim = sum(sizes)
    labels_cpu = labels.detach().to("cpu", torch.long)
    if labels_cpu.numel() and (labels_cpu.min() < 0 or labels_cpu.max() >= num_classes):
        raise InputError(f"labels must be in [0, {num_classes})")
    order = torch.argsort(labels_cpu, stable=True)
    counts = torch.bincount(labels_cpu, minlength=num_classes).tolist()

    sketch = GaussianSketch(dim, sketch_dim, seed, device) if sketch_dim is not None else None
    out = torch.zeros(num_classes, sketch_dim if sketch is not None else dim, device=device)
    block = max(1, min(class_block, num_classes))
    staging = torch.zeros(block, dim, device=device) if sketch is not None else None
    staged: list[int] = []

    def flush() -> None:
        assert sketch is not None and staging is not None
        if staged:
            out[staged] = sketch(staging[: len(staged)])
            staging.zero_()
            staged.clear()

    modules = [model] + ([loss] if isinstance(loss, nn.Module) else [])
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        offset = 0
        for c, n_c in enumerate(counts):
            if n_c == 0:
                continue
            acc = staging[len(staged)] if staging is not None else out[c]
            idx_c = order[offset : offset + n_c]
            offset += n_c
            for start in range(0, n_c, batch_size):
                idx = idx_c[start : start + batch_size]
                x = images[idx].to(device)
                x = transform(x) if transform is not None else x.float()
                y = labels_cpu[idx].to(device)
                with torch.enable_grad():
                    value = loss(_logits(model, x), y) * idx.numel()
                    grads = torch.autograd.grad(value, shared, allow_unused=True, materialize_grads=True)
                pos = 0
                for g, size in zip(grads, sizes, strict=True):
                    acc[pos : pos + size].add_(g.reshape(-1).to(acc.dtype))
                    pos += size
            acc.div_(n_c)
            if staging is not None:
                staged.append(c)
                if len(staged) == block:
                    flush()
        if staging is not None:
            flush()
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return out


def _contiguous(labels: torch.Tensor) -> torch.Tensor:
    """Relabel group ids to 0..G'-1 in order of first appearance over the classes."""
    mapping: dict[int, int] = {}
    out = [mapping.setdefault(v, len(mapping)) for v in labels.tolist()]
    return torch.tensor(out, dtype=torch.long)


def _cluster_qr(vectors: torch.Tensor) -> torch.Tensor:
    """Deterministic assignment of spectral embeddings (Damle, Minden & Ying 2019; sklearn's cluster_qr).

    Column-pivoted QR of the (G, C) embedding picks G pivot classes (greedy: largest remaining norm, then
    orthogonalise); the polar factor of the pivots' rows rotates the embedding so that each pivot lies
    near one axis; a class joins the axis of its largest absolute coordinate.
    """
    g = vectors.shape[1]
    rest = vectors.T.clone()  # (G, C): columns are classes
    pivots: list[int] = []
    for _ in range(g):
        norms = (rest * rest).sum(dim=0)
        if pivots:
            norms[pivots] = -1.0
        j = int(torch.argmax(norms))
        pivots.append(j)
        col = rest[:, j]
        q = col / col.norm().clamp_min(1e-300)
        rest -= torch.outer(q, q @ rest)
    u, _, vh = torch.linalg.svd(vectors[pivots].T)
    return (vectors @ (u @ vh)).abs().argmax(dim=1)


def spectral_groups(prototypes: torch.Tensor, num_groups: int, seed: int = 0) -> torch.Tensor:
    """Spectral clustering of classes by gradient direction (gbg.md §1).

    Affinity A_cd = cos(g_c, g_d) + 1 (self-affinities dropped, as scipy's normalised Laplacian does);
    embedding: the G leading eigenvectors of D^-1/2 A D^-1/2 (``torch.linalg.eigh``, float64), divided by
    sqrt(degree) as in sklearn's ``spectral_embedding``; assignment: ``cluster_qr`` (no randomness, so
    ``seed`` has no effect; kept for a uniform grouping signature). G >= C gives one class per group.
    Group sizes are unconstrained; if the assignment leaves a group empty, fewer than G ids are used.
    """
    if prototypes.dim() != 2:
        raise InputError(f"prototypes must be (C, D), got shape {tuple(prototypes.shape)}")
    if num_groups < 1:
        raise InputError(f"num_groups must be >= 1, got {num_groups}")
    c = prototypes.shape[0]
    if num_groups >= c:
        return torch.arange(c, dtype=torch.long)
    if num_groups == 1:
        return torch.zeros(c, dtype=torch.long)
    p = F.normalize(prototypes.detach().to(torch.float64), dim=1)
    affinity = (p @ p.T + 1.0).clamp_min(0.0)
    affinity.fill_diagonal_(0.0)
    degree = affinity.sum(dim=1)
    dd = torch.where(degree > 0, degree.sqrt(), torch.ones_like(degree))
    normalised = affinity / dd[:, None] / dd[None, :]
    _, evecs = torch.linalg.eigh(normalised)
    embedding = evecs[:, -num_groups:].flip(1) / dd[:, None]
    return _contiguous(_cluster_qr(embedding).cpu())


def frequency_groups(class_counts: Sequence[int] | torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sort classes by training count (descending; ties by class index) and cut into G equal blocks.

    Group 0 holds the most frequent classes; block sizes differ by at most one (the first ones larger),
    as ``torch.tensor_split``. G >= C gives one class per group (gbg.md §1, ablation).
    """
    counts = torch.as_tensor(class_counts).flatten().cpu()
    if num_groups < 1:
        raise InputError(f"num_groups must be >= 1, got {num_groups}")
    order = torch.sort(counts, descending=True, stable=True).indices
    return _blocks(order, num_groups)


def random_groups(num_classes: int, num_groups: int, seed: int = 0) -> torch.Tensor:
    """A seeded random permutation of the classes cut into G equal blocks (gbg.md §1, ablation)."""
    if num_groups < 1:
        raise InputError(f"num_groups must be >= 1, got {num_groups}")
    gen = torch.Generator().manual_seed(int(seed))
    return _blocks(torch.randperm(num_classes, generator=gen), num_groups)


def _blocks(order: torch.Tensor, num_groups: int) -> torch.Tensor:
    """groups[order[i]] = the block of position i when ``order`` is cut into min(G, C) equal blocks."""
    c = order.numel()
    groups = torch.empty(c, dtype=torch.long)
    for gid, part in enumerate(torch.tensor_split(order, min(num_groups, max(c, 1)))):
        groups[part] = gid
    return groups


__all__ = [
    "GaussianSketch",
    "class_gradient_prototypes",
    "frequency_groups",
    "random_groups",
    "spectral_groups",
]

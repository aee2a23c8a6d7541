"""GBG stage 1: group classes whose training gradients point the same way (docs/methods/gbg.md §1).

- :func:`class_gradient_prototypes`: per-class mean gradient of the training loss w.r.t. the shared
  (backbone) parameters, over the un-augmented training set, model in eval mode; optionally sketched to
  k dimensions by a seeded random projection (Johnson-Lindenstrauss): :class:`CountSketch` (sparse,
  O(D) per vector, the default: it scales to ResNet-50 on 1000 classes) or :class:`GaussianSketch`.
  :class:`PrototypeAccumulator` is the memory-bounded core: class_block x D floats plus C x k.
- :func:`spectral_groups`: spectral clustering of the affinity A = cos + 1, assignment by ``cluster_qr``.
- :func:`frequency_groups` and :func:`random_groups`: the ablation groupings.

Every grouping returns a LongTensor (C,) of group ids, contiguous from 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.contracts import unwrap_model
from gradtail.errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GaussianSketch:
    """x -> x R / sqrt(k) with R a (D, k) matrix of iid N(0, 1), never held whole (docs/methods/gbg.md §1,
    "Cost").

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


class CountSketch:
    """Sparse Johnson-Lindenstrauss sketch (CountSketch; Kane & Nelson's sparse JL for ``nnz > 1``).

    Coordinate i of x is added, with a random sign s_j(i), into ``nnz`` random buckets h_j(i) of k:
    y = S x with S (k, D) having ``nnz`` entries +-1/sqrt(nnz) per column. E[<Sx, Sy>] = <x, y>, and the
    variance of a cosine is O(1/k) as for a Gaussian sketch, but a vector costs O(nnz D) instead of O(k D).
    The hashes are regenerated chunk by chunk (chunk c from a CPU generator seeded by (seed, c)), so the
    map is the same on every device and memory is O(chunk) whatever D is; they are cached when
    ``nnz * dim <= cache_elems``.
    """

    def __init__(
        self,
        dim: int,
        sketch_dim: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        nnz: int = 1,
        chunk_elems: int = 1 << 22,
        cache_elems: int = 1 << 22,
    ) -> None:
        if dim < 1 or sketch_dim < 1 or nnz < 1:
            raise InputError(f"sketch needs dim, sketch_dim and nnz >= 1, got {dim}, {sketch_dim}, {nnz}")
        self.dim = int(dim)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.nnz = int(nnz)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk = max(1, int(chunk_elems))
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if self.nnz * self.dim <= cache_elems else None
        )

    def _hashes(self, index: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (nnz, length) and signs (nnz, length) of chunk ``index``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        buckets = torch.randint(0, self.sketch_dim, (self.nnz, length), generator=gen)
        signs = torch.randint(0, 2, (self.nnz, length), generator=gen, dtype=torch.int8)
        signs = signs.to(torch.float32).mul_(2.0 / math.sqrt(self.nnz)).sub_(1.0 / math.sqrt(self.nnz))
        out = (buckets.to(self.device), signs.to(self.device))
        if self._cache is not None:
            self._cache[index] = out
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project a (D,) or (b, D) tensor to (k,) or (b, k) (float32, on the sketch's device)."""
        squeeze = x.dim() == 1
        x2 = x.reshape(1, -1) if squeeze else x
        if x2.shape[1] != self.dim:
            raise InputError(f"sketch expects vectors of length {self.dim}, got {x2.shape[1]}")
        out = torch.zeros(x2.shape[0], self.sketch_dim, device=self.device)
        for index, start in enumerate(range(0, self.dim, self.chunk)):
            stop = min(start + self.chunk, self.dim)
            part = x2[:, start:stop].to(self.device, torch.float32)
            buckets, signs = self._hashes(index, stop - start)
            for j in range(self.nnz):
                out.index_add_(1, buckets[j], part * signs[j])
        return out[0] if squeeze else out


SKETCHES = ("count", "gaussian")


def create_sketch(
    kind: str, dim: int, sketch_dim: int, seed: int = 0, device: torch.device | str | None = None
) -> CountSketch | GaussianSketch:
    """``count`` (:class:`CountSketch`, default) or ``gaussian`` (:class:`GaussianSketch`)."""
    if kind == "count":
        return CountSketch(dim, sketch_dim, seed, device)
    if kind == "gaussian":
        return GaussianSketch(dim, sketch_dim, seed, device)
    raise InputError(f"unknown sketch {kind!r}; valid: {', '.join(SKETCHES)}")


class PrototypeAccumulator:
    """Per-class mean gradients, accumulated in place and optionally sketched (docs/methods/gbg.md §1,
    "Cost").

    Classes arrive one at a time (``add`` any number of gradient sums of class c, then ``end_class(c, n)``);
    each is accumulated into one row of a (class_block, D) staging buffer, divided by its sample count,
    and ``class_block`` rows are sketched together. Memory: ``class_block * D + C * k`` floats plus the
    sketch's chunk, whatever C is; without a sketch the (C, D) result is accumulated directly.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        sketch: CountSketch | GaussianSketch | None = None,
        class_block: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        self.sketch = sketch
        self.dim = int(dim)
        self.out = torch.zeros(num_classes, sketch.sketch_dim if sketch is not None else dim, device=device)
        block = max(1, min(int(class_block), num_classes))
        self.staging = torch.zeros(block, dim, device=device) if sketch is not None else None
        self.staged: list[int] = []  # finished classes waiting in the staging buffer
        self.finished: set[int] = set()

    def _row(self, c: int) -> torch.Tensor:
        if c in self.finished:
            raise InputError(f"class {c} was already finished; classes must arrive one at a time")
        return self.out[c] if self.staging is None else self.staging[len(self.staged)]

    def add(self, c: int, grads: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add a gradient sum of class c: one flat (D,) tensor or per-parameter tensors, in order."""
        row = self._row(c)
        parts = [grads] if isinstance(grads, torch.Tensor) else grads
        pos = 0
        for g in parts:
            n = g.numel()
            row[pos : pos + n].add_(g.reshape(-1).to(row.dtype))
            pos += n
        if pos != self.dim:
            raise InputError(f"gradients of class {c} have {pos} entries, expected {self.dim}")

    def end_class(self, c: int, count: int) -> None:
        """Class c is complete with ``count`` samples: divide its sum (its mean gradient,
        docs/methods/gbg.md §1)."""
        self._row(c).div_(max(int(count), 1))
        self.finished.add(c)
        if self.staging is not None:
            self.staged.append(c)
            if len(self.staged) == self.staging.shape[0]:
                self._flush()

    def _flush(self) -> None:
        assert self.sketch is not None and self.staging is not None
        if self.staged:
            self.out[self.staged] = self.sketch(self.staging[: len(self.staged)])
            self.staging.zero_()
            self.staged.clear()

    def result(self) -> torch.Tensor:
        """(C, D) or (C, k) prototypes; classes never added are zero rows."""
        if self.staging is not None:
            self._flush()
        return self.out


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The shared parameters (docs/methods/gbg.md §1) that require grad: the model's ``backbone_parameters()``
    (a :class:`~gradtail.models.LongTailClassifier`, DDP-wrapped or not; the classifier excluded)."""
    inner: Any = unwrap_model(model)
    return [p for p in inner.backbone_parameters() if p.requires_grad]


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
    sketch: str = "count",
) -> torch.Tensor:
    """Per-class mean gradient of the training loss w.r.t. the shared parameters (docs/methods/gbg.md §1).

    The data are visited class by class (batches never mix classes), so each backward yields one class's
    gradient sum: ``torch.autograd.grad`` of ``n * loss_fn(logits, labels)`` (``loss_fn`` reduces by the
    mean, as every gradtail loss does; default: cross-entropy), accumulated in place by a
    :class:`PrototypeAccumulator`. ``model.eval()`` during the pass (BatchNorm statistics untouched), the
    previous mode restored after; ``.grad`` of the parameters is not touched. ``transform`` maps a batch
    of stored images (e.g. uint8) to the model's input (normalisation, no augmentation). A class without
    samples gets a zero row.

    Args:
        params: the shared parameters; default the model's ``backbone_parameters()`` (classifier excluded).
        sketch_dim: project each class gradient to this many dimensions (seeded by ``seed``) with the
            ``sketch`` kind (``count`` or ``gaussian``, see :func:`create_sketch`); ``class_block`` class
            gradients are projected together, so memory is ``class_block * D + C * sketch_dim`` floats.

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
    shared = list(params) if params is not None else backbone_parameters(model)
    if not shared:
        raise InputError("class_gradient_prototypes: the model has no shared parameters requiring grad")
    loss = loss_fn if loss_fn is not None else F.cross_entropy
    network: Any = unwrap_model(model)
    dim = sum(p.numel() for p in shared)
    labels_cpu = labels.detach().to("cpu", torch.long)
    if labels_cpu.numel() and (labels_cpu.min() < 0 or labels_cpu.max() >= num_classes):
        raise InputError(f"labels must be in [0, {num_classes})")
    order = torch.argsort(labels_cpu, stable=True)
    counts = torch.bincount(labels_cpu, minlength=num_classes).tolist()
    projector = create_sketch(sketch, dim, sketch_dim, seed, device) if sketch_dim is not None else None
    acc = PrototypeAccumulator(num_classes, dim, projector, class_block, device)

    modules = [model] + ([loss] if isinstance(loss, nn.Module) else [])
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        offset = 0
        for c, n_c in enumerate(counts):
            if n_c == 0:
                continue
            idx_c = order[offset : offset + n_c]
            offset += n_c
            for start in range(0, n_c, batch_size):
                idx = idx_c[start : start + batch_size]
                x = images[idx].to(device)
                x = transform(x) if transform is not None else x.float()
                y = labels_cpu[idx].to(device)
                with torch.enable_grad():
                    value = loss(network.classifier(network.features(x)), y) * idx.numel()
                    grads = torch.autograd.grad(value, shared, allow_unused=True, materialize_grads=True)
                acc.add(c, grads)
            acc.end_class(c, n_c)
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return acc.result()


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
    """Spectral clustering of classes by gradient direction (docs/methods/gbg.md §1).

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
    as ``torch.tensor_split``. G >= C gives one class per group (docs/methods/gbg.md §1, ablation).
    """
    counts = torch.as_tensor(class_counts).flatten().cpu()
    if num_groups < 1:
        raise InputError(f"num_groups must be >= 1, got {num_groups}")
    order = torch.sort(counts, descending=True, stable=True).indices
    return _blocks(order, num_groups)


def random_groups(num_classes: int, num_groups: int, seed: int = 0) -> torch.Tensor:
    """A seeded random permutation of the classes cut into G equal blocks (docs/methods/gbg.md §1,
    ablation)."""
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
    "SKETCHES",
    "CountSketch",
    "GaussianSketch",
    "PrototypeAccumulator",
    "class_gradient_prototypes",
    "create_sketch",
    "frequency_groups",
    "random_groups",
    "spectral_groups",
]

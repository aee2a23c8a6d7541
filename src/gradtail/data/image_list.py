"""Image-list datasets for the large-scale benchmarks: ImageNet-LT, Places-LT, iNaturalist 2018.

A split is an image root plus a list file with one ``relative/path label`` per line
(docs/methods/protocol.md §2; the community's list files). Images are decoded with PIL and transformed per
sample with torchvision; :class:`ImageListLoader` batches them with worker processes and has the surface of
the in-memory :class:`~gradtail.data.loader.BatchLoader` (``set_epoch``, ``len``, iteration of (x, y) on the
device).

Reproducibility: every training sample's augmentation draws from the RNGs reseeded with a hash of
``(seed, epoch, global position in the epoch)``, so an epoch replays identically whatever the number of
workers, whether they persist, and after a resume from an epoch boundary. The position is the one in
the sampler's global order (rank ``r`` holds positions ``r, r + W, r + 2W, ...``; see
``gradtail.data.samplers``), so a sample is augmented the same way under any world size.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gradtail.data.loader import epoch_seed
from gradtail.data.samplers import Sampler
from gradtail.errors import ConfigError, DataError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_MAX_MISSING_REPORTED = 5
_LABEL = re.compile(r"[+-]?[0-9]+")

Transform = Callable[[Any], Any]


# ---------------------------------------------------------------------------------------------- parsing
@dataclass
class ParsedList:
    """A parsed list file: image paths (root joined), labels, and the 1-based line of each entry."""

    list_file: Path
    root: Path
    paths: list[Path]
    labels: np.ndarray  # int64 (N,)
    lines: np.ndarray  # int64 (N,)
    num_classes: int


def _check_num_classes(num_classes: int | None) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def read_image_list(
    list_file: str | os.PathLike[str],
    root: str | os.PathLike[str],
    num_classes: int | None = None,
    check_files: bool = True,
) -> ParsedList:
    """Parse ``list_file`` (see :func:`parse_image_list`) keeping each entry's line number."""
    list_path, root_path = Path(list_file), Path(root)
    nc = _check_num_classes(num_classes)
    if not list_path.is_file():
        raise DataError(f"image list file {list_path} does not exist")
    try:
        text = list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{list_path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{list_path}: cannot read the image list ({e})") from None
    rels: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{list_path}:{lineno}: expected 'relative/path label', got {line!r}")
        rel, tok = parts
        if not _LABEL.fullmatch(tok):
            raise DataError(f"{list_path}:{lineno}: label {tok!r} is not an integer (line {line!r})")
        label = int(tok)
        if label < 0 or (nc is not None and label >= nc):
            bound = "num_classes" if nc is None else str(nc)
            raise DataError(f"{list_path}:{lineno}: label {label} is outside [0, {bound})")
        rels.append(rel)
        labels.append(label)
        lines.append(lineno)
    if not rels:
        raise DataError(f"{list_path}: the image list has no entries")
    paths = [root_path / rel for rel in rels]
    if check_files:
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            shown = ", ".join(f"line {lines[i]}: {rels[i]!r}" for i in missing[:_MAX_MISSING_REPORTED])
            more = len(missing) - _MAX_MISSING_REPORTED
            tail = f" (and {more} more)" if more > 0 else ""
            raise DataError(
                f"{list_path}: {len(missing)} listed image(s) missing under {root_path}: {shown}{tail}"
            )
    y = np.asarray(labels, dtype=np.int64)
    return ParsedList(
        list_file=list_path,
        root=root_path,
        paths=paths,
        labels=y,
        lines=np.asarray(lines, dtype=np.int64),
        num_classes=nc if nc is not None else int(y.max()) + 1,
    )


def parse_image_list(
    list_file: str | os.PathLike[str],
    root: str | os.PathLike[str],
    num_classes: int | None = None,
    check_files: bool = True,
) -> tuple[list[Path], np.ndarray]:
    """Read a ``relative/path label`` list: the image paths under ``root`` and int64 labels.

    Each non-blank line is split on its *last* whitespace (paths may contain spaces). Labels must lie
    in ``[0, num_classes)`` (``num_classes`` defaults to the largest label + 1). With ``check_files``
    every image must exist (checked up front; the first few missing ones are reported). Every
    problem raises :class:`DataError` naming the list file and the line.
    """
    parsed = read_image_list(list_file, root, num_classes=num_classes, check_files=check_files)
    return parsed.paths, parsed.labels


# ---------------------------------------------------------------------------------------------- dataset
class ImageListDataset(Dataset):
    """The images of a list file, decoded with PIL (RGB) and passed through ``transform``.

    ``dataset[i]`` is ``(transform(image), label)``. Paths are stored as one byte buffer plus offsets
    rather than a list of Python objects, so forked loader workers do not copy them page by page.

    Args:
        list_file, root, num_classes, check_files: as in :func:`parse_image_list`.
        transform: applied to the PIL image (e.g. :func:`imagenet_transform`); ``None``: the PIL image.
        name: for messages; defaults to the list file's stem.
    """

    def __init__(
        self,
        list_file: str | os.PathLike[str],
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        num_classes: int | None = None,
        check_files: bool = True,
        name: str | None = None,
    ) -> None:
        parsed = read_image_list(list_file, root, num_classes=num_classes, check_files=check_files)
        self.list_file = parsed.list_file
        self.root = parsed.root
        self.num_classes = parsed.num_classes
        self.labels = parsed.labels
        self.lines = parsed.lines
        self.transform = transform
        self.name = name or parsed.list_file.stem
        encoded = [os.fsencode(p) for p in parsed.paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, index: int) -> Path:
        """The image file of entry ``index``."""
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return Path(os.fsdecode(self._blob[lo:hi].tobytes()))

    @property
    def paths(self) -> list[Path]:
        return [self.path(i) for i in range(len(self))]

    def class_counts(self) -> list[int]:
        """Images per class, indexed by label (length ``num_classes``): what Many/Medium/Few use."""
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def load_image(self, index: int) -> Any:
        """Entry ``index`` decoded as an RGB PIL image; an unreadable file is a :class:`DataError`."""
        from PIL import Image

        path = self.path(index)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            line = int(self.lines[index])
            raise DataError(f"{self.list_file}:{line}: cannot decode image {path}: {e}") from None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


# ---------------------------------------------------------------------------------------------- transforms
def imagenet_transform(
    train: bool,
    size: int = 224,
    resize: int | None = None,
    mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    std: tuple[float, ...] | list[float] = IMAGENET_STD,
    color_jitter: float = 0.0,
) -> Transform:
    """The standard ImageNet transforms (torchvision v1), PIL image -> normalised float (3, size, size).

    Train: RandomResizedCrop(size) + RandomHorizontalFlip [+ ColorJitter(b, c, s = color_jitter)].
    Test: Resize(resize) + CenterCrop(size), ``resize`` defaulting to ``round(size * 256 / 224)``.
    """
    from torchvision import transforms as T

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"transform size must be a positive int, got {size!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"mean/std must have 3 entries with std > 0, got {list(mean)} / {list(std)}")
    if color_jitter < 0:
        raise ConfigError(f"color_jitter must be >= 0, got {color_jitter}")
    tail = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    if train:
        head: list[Any] = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        if color_jitter > 0:
            head.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        return T.Compose(head + tail)
    if resize is None:
        resize = round(size * 256 / 224)
    if resize < size:
        raise ConfigError(f"test resize {resize} is smaller than the crop size {size}")
    return T.Compose([T.Resize(resize), T.CenterCrop(size), *tail])


# ---------------------------------------------------------------------------------------------- loading
class _SeedRNGs:
    """Reseed torch's CPU generator, ``random`` and NumPy's global generator; restore them on exit."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._state = (torch.default_generator.get_state(), random.getstate(), np.random.get_state())
        torch.default_generator.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed & (2**32 - 1))

    def __exit__(self, *exc: object) -> None:
        torch_state, py_state, np_state = self._state
        torch.default_generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class _SeededItems(Dataset):
    """Wraps a dataset so that ``view[(index, seed)]`` draws its augmentation from ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int | None]) -> Any:
        index, seed = key
        if seed is None:
            return self.dataset[index]
        with _SeedRNGs(seed):
            return self.dataset[index]


@dataclass
class _EpochBatches:
    """The batch sampler of an :class:`ImageListLoader`: lists of ``(index, seed)`` of its current epoch.

    It holds no reference to the loader: without a reference cycle the loader (and its persistent
    workers) is released as soon as it is dropped, not at a later garbage collection.
    """

    size: int
    batch_size: int
    sampler: Any
    train: bool
    drop_last: bool
    seed: int
    rank: int
    world_size: int
    epoch: int = 0

    def order(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(self.rank, self.size, self.world_size)
        order = self.sampler.indices(self.epoch, rank=self.rank, world_size=self.world_size)
        return torch.as_tensor(order, dtype=torch.long).cpu()

    def num_samples(self) -> int:
        if self.sampler is None:
            return len(range(self.rank, self.size, self.world_size))
        return int(self.sampler.num_samples_per_rank(self.world_size))

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        order = self.order().tolist()
        n = len(order)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            chunk = order[start : start + self.batch_size]
            seeds: list[int | None] = [None] * len(chunk)
            if self.train:
                # Global position of this rank's p-th sample: rank + p * world_size.
                seeds = [
                    epoch_seed(self.seed, self.epoch, stream=1 + self.rank + p * self.world_size)
                    for p in range(start, start + len(chunk))
                ]
            yield list(zip(chunk, seeds, strict=True))


def _plan_attribute(name: str) -> property:
    return property(lambda self: getattr(self._plan, name), doc=f"The loader's ``{name}`` (read-only).")


class ImageListLoader:
    """Batches of an :class:`ImageListDataset` on ``device``, loaded by ``num_workers`` processes.

    The large-scale counterpart of :class:`~gradtail.data.loader.BatchLoader`, with its surface:
    ``set_epoch``, ``len`` (batches per epoch on this rank), iteration of (x, y) on ``device``, and
    ``labels`` (int64 on ``device``); ``images`` is ``None`` (nothing is held in memory). Workers
    persist across epochs: build one loader per split and reuse it.

    Args:
        dataset: the images; its ``transform`` is the train or test transform.
        batch_size: per-process batch size.
        sampler: an object with ``indices(epoch, rank, world_size)`` and ``num_samples_per_rank``
            (``gradtail.data.samplers``); ``None``: sequential order, rank ``r`` taking ``r::world_size``.
        train: seed each sample's augmentation from ``(seed, epoch, position)``; ``False`` (evaluation)
            leaves the RNGs alone (the test transform is deterministic).
        drop_last: drop the last partial batch.
        num_workers: loader processes (0: load in this process).
        pin_memory: page-locked batches; ``None``: when ``device`` is CUDA.
        prefetch_factor: batches loaded ahead per worker (``None``: PyTorch's default).
    """

    images: None = None
    num_views = 0  # extra contrastive views are made by the in-memory loader only
    epoch = _plan_attribute("epoch")
    batch_size = _plan_attribute("batch_size")
    sampler = _plan_attribute("sampler")
    train = _plan_attribute("train")
    drop_last = _plan_attribute("drop_last")
    seed = _plan_attribute("seed")
    rank = _plan_attribute("rank")
    world_size = _plan_attribute("world_size")

    def __init__(
        self,
        dataset: ImageListDataset,
        batch_size: int,
        sampler: object | None = None,
        train: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if sampler is not None and not isinstance(sampler, Sampler):
            raise ConfigError(f"sampler must be a gradtail Sampler, got {type(sampler).__name__}")
        self.dataset = dataset
        self.device = torch.device(device)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long).to(self.device)
        self.channels_last = channels_last
        self.num_workers = num_workers
        self._plan = _EpochBatches(
            len(dataset), batch_size, sampler, bool(train), bool(drop_last), int(seed), rank, world_size
        )
        self._pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        # Worker base seeds come from this generator; per-sample reseeding makes them irrelevant to
        # the transforms, but keeps anything else the workers draw deterministic too.
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(int(seed), 0, stream=2**20))
        extra: dict[str, Any] = {}
        if num_workers > 0:
            extra["persistent_workers"] = True
            if prefetch_factor is not None:
                extra["prefetch_factor"] = prefetch_factor
        self._loader = DataLoader(
            _SeededItems(dataset),
            batch_sampler=self._plan,
            num_workers=num_workers,
            pin_memory=self._pin,
            generator=generator,
            **extra,
        )

    def set_epoch(self, epoch: int) -> None:
        self._plan.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """This rank's dataset indices for the current epoch, in order (int64, CPU)."""
        return self._plan.order()

    def __len__(self) -> int:
        return len(self._plan)

    def close(self) -> None:
        """Stop the worker processes now (the next iteration starts new ones).

        Dropping the loader stops them too; this is for when the loader outlives its use, or is kept
        alive by a reference cycle (an exception's traceback): a cyclic garbage collection closes the
        workers' queues before the iterator's finaliser runs, and shutting down then waits for a timeout.
        """
        iterator = getattr(self._loader, "_iterator", None)  # where DataLoader keeps persistent workers
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._loader._iterator = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self._loader)
        while True:
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except BaseException:
                self.close()  # a failed worker (e.g. a corrupt image) leaves nothing running
                raise
            x = x.to(self.device, non_blocking=self._pin)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=self._pin)


# ---------------------------------------------------------------------------------------------- known splits
@dataclass(frozen=True)
class ImageListSpec:
    """A benchmark's community list files: ``files[split] = (list file name, expected entries)``."""

    name: str
    num_classes: int
    subdir: str  # where the list files usually sit under the list directory
    files: dict[str, tuple[str, int]]


_SPECS: dict[str, ImageListSpec] = {
    "imagenet_lt": ImageListSpec(
        "imagenet_lt",
        1000,
        "ImageNet_LT",
        {
            "train": ("ImageNet_LT_train.txt", 115_846),
            "val": ("ImageNet_LT_val.txt", 20_000),
            "test": ("ImageNet_LT_test.txt", 50_000),
        },
    ),
    "places_lt": ImageListSpec(
        "places_lt",
        365,
        "Places_LT",
        {
            "train": ("Places_LT_train.txt", 62_500),
            "val": ("Places_LT_val.txt", 7_300),
            "test": ("Places_LT_test.txt", 36_500),
        },
    ),
    # iNaturalist 2018 has no separate test list: the official validation set is the test set.
    "inat2018": ImageListSpec(
        "inat2018",
        8142,
        "iNaturalist18",
        {
            "train": ("iNaturalist18_train.txt", 437_513),
            "val": ("iNaturalist18_val.txt", 24_426),
        },
    ),
}


def known_splits() -> dict[str, ImageListSpec]:
    """The image-list benchmarks gradtail knows (docs/methods/protocol.md §2), by name."""
    return dict(_SPECS)


def get_spec(name: str) -> ImageListSpec:
    spec = _SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown image-list dataset {name!r}; valid: {', '.join(sorted(_SPECS))}")
    return spec


def find_list_file(name: str, split: str, list_dir: str | os.PathLike[str]) -> Path:
    """The list file of ``name``/``split``: ``list_dir/<file>`` or ``list_dir/<subdir>/<file>``."""
    spec = get_spec(name)
    if split not in spec.files:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; valid: {', '.join(spec.files)}")
    file_name = spec.files[split][0]
    candidates = [Path(list_dir) / file_name, Path(list_dir) / spec.subdir / file_name]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"{name} {split} list file not found; looked for {', '.join(map(str, candidates))}")


def load_image_list_split(
    name: str,
    split: str,
    root: str | os.PathLike[str],
    list_dir: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
    check_files: bool = True,
) -> ImageListDataset:
    """The ``split`` of a known benchmark (``imagenet_lt``, ``places_lt``, ``inat2018``) under ``root``.

    The list file is looked up in ``list_dir`` (default ``root``), parsed with the benchmark's number of
    classes, and a size different from the community file's warns (a user's own variant is allowed).
    """
    spec = get_spec(name)
    path = find_list_file(name, split, root if list_dir is None else list_dir)
    ds = ImageListDataset(
        path,
        root,
        transform=transform,
        num_classes=spec.num_classes,
        check_files=check_files,
        name=f"{name}-{split}",
    )
    expected = spec.files[split][1]
    if len(ds) != expected:
        warnings.warn(
            f"{path}: {len(ds)} entries, the community {name} {split} list has {expected}",
            stacklevel=2,
        )
    return ds

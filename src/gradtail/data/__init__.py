"""Data: long-tailed subsets (docs/methods/protocol.md §1), dataset readers (§2), samplers,
the in-memory batch loader."""

from gradtail.data.base import ImageArrays
from gradtail.data.builder import DATASETS, build_data
from gradtail.data.bundle import ClassificationData
from gradtail.data.cifar import load_cifar, resolve_cifar_dir
from gradtail.data.download import download_file, extract_tar, verify_checksum
from gradtail.data.fashion_mnist import load_fashion_mnist, read_idx, resolve_fashion_mnist_dir
from gradtail.data.loader import BatchAugment, BatchLoader
from gradtail.data.longtail import LongTailSplit, build_longtail_split, longtail_counts, split_hash
from gradtail.data.samplers import SAMPLERS, Sampler, create_sampler

__all__ = [
    "DATASETS",
    "SAMPLERS",
    "BatchAugment",
    "BatchLoader",
    "ClassificationData",
    "ImageArrays",
    "LongTailSplit",
    "Sampler",
    "build_data",
    "build_longtail_split",
    "create_sampler",
    "download_file",
    "extract_tar",
    "load_cifar",
    "load_fashion_mnist",
    "longtail_counts",
    "read_idx",
    "resolve_cifar_dir",
    "resolve_fashion_mnist_dir",
    "split_hash",
    "verify_checksum",
]

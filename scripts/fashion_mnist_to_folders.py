"""Write real Fashion-MNIST as own data: image folders, and optionally a CSV list and an ``.npz`` file.

    python scripts/fashion_mnist_to_folders.py OUT [--format png] [--csv] [--npz] [--data-dir DIR]

writes

- ``OUT/train/<class>/<index>.<format>`` and ``OUT/test/<class>/<index>.<format>``: ``index`` is the
  image's position in the IDX file, zero-padded to 5 digits, so sorted order within a class is the
  original order (and the LDAM rule of ``data.longtail`` picks the images the built-in dataset picks);
- ``OUT/classes.txt``: the class folders in Fashion-MNIST's label order (``T-shirt/top`` is written as
  ``T-shirt_top``); give it as ``data.class_list`` to keep that order (folder names sort otherwise);
- with ``--csv``: ``OUT/train.csv`` and ``OUT/test.csv`` (``path,label``, paths relative to ``OUT``,
  labels as class names);
- with ``--npz``: ``OUT/fashion_mnist.npz`` (``x_train, y_train, x_test, y_test`` uint8 ``N,H,W``,
  ``class_names``).

Then, for example: ``gradtail train configs/own_data/image_folder.yaml --set data.data_dir=OUT
--set data.class_list=classes.txt``. Fashion-MNIST is found as by the built-in dataset (``--data-dir``,
``$GRADTAIL_DATA``, Debian's ``/usr/share/datasets/fashion-mnist``, the download cache). ``OUT`` must be
empty or not exist (``--overwrite`` writes into a non-empty one).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from gradtail.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from gradtail.errors import GradtailError

FORMATS = {"png": "PNG", "bmp": "BMP", "webp": "WEBP"}  # lossless formats only: pixels are kept exactly


def folder_name(class_name: str) -> str:
    """A class name as a folder name: path separators become ``_``."""
    return class_name.replace("/", "_").replace("\\", "_")


def write_split(
    out: Path, split: str, images: np.ndarray, labels: np.ndarray, fmt: str
) -> list[tuple[str, str]]:
    """Write one split's images; returns (path relative to ``out``, class name) in index order."""
    from PIL import Image

    names = [folder_name(n) for n in CLASS_NAMES]
    for name in names:
        (out / split / name).mkdir(parents=True, exist_ok=True)
    rows = []
    save_args = {"lossless": True} if fmt == "webp" else {}
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        relative = f"{split}/{names[label]}/{index:05d}.{fmt}"
        Image.fromarray(image, mode="L").save(out / relative, FORMATS[fmt], **save_args)
        rows.append((relative, names[label]))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (empty or new)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png", help="image format (lossless)")
    parser.add_argument("--csv", action="store_true", help="also write train.csv and test.csv")
    parser.add_argument("--npz", action="store_true", help="also write fashion_mnist.npz")
    parser.add_argument("--data-dir", help="where the Fashion-MNIST IDX files are (default: searched)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"fashion_mnist_to_folders: {out} is not empty (use --overwrite)", file=sys.stderr)
        return 2
    try:
        splits = {
            split: load_fashion_mnist(train=split == "train", data_dir=args.data_dir, download=False)
            for split in ("train", "test")
        }
    except GradtailError as e:
        print(f"fashion_mnist_to_folders: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    arrays = {s: (a.images[:, 0].numpy(), a.labels.numpy()) for s, a in splits.items()}
    rows = {s: write_split(out, s, x, y, args.format) for s, (x, y) in arrays.items()}
    (out / "classes.txt").write_text("".join(folder_name(n) + "\n" for n in CLASS_NAMES), encoding="utf-8")
    if args.csv:
        for split, split_rows in rows.items():
            write_csv(out / f"{split}.csv", split_rows)
    if args.npz:
        np.savez(
            out / "fashion_mnist.npz",
            x_train=arrays["train"][0], y_train=arrays["train"][1],
            x_test=arrays["test"][0], y_test=arrays["test"][1],
            class_names=np.array([folder_name(n) for n in CLASS_NAMES]),
        )  # fmt: skip
    total = sum(len(r) for r in rows.values())
    print(f"wrote {total} images to {out} (train {len(rows['train'])}, test {len(rows['test'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

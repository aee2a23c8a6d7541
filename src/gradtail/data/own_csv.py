"""Own data listed in CSV files: ``dataset: image_csv``.

``data.data_dir`` is either a folder holding ``train.csv`` and ``test.csv`` (and optionally ``val.csv``;
without ``test.csv``, ``data.split_fractions.test`` carves a test split), or one ``.csv`` file (split by
``data.split_fractions``: ``test`` required, ``val`` default 0.1).

Each CSV has a header row naming (at least) the columns ``path`` and ``label``, in any order; other
columns are ignored, blank rows skipped. A path is relative to ``data.image_root`` (default: the folder
of the CSV files) unless absolute. Labels are class names or integers (see
:func:`gradtail.data.own_data.resolve_labels`): with ``data.class_list`` (relative to the CSV folder) a
label is a name of the list or an index into it; without it, all-integer labels are the labels
``0..C-1`` and any other labels are names (classes sorted by name). With ``data.check_files`` (default)
every listed image must exist. Every problem is a one-line :class:`~gradtail.errors.DataError` naming the
file and line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from gradtail.config import DataConfig
from gradtail.data.own_data import OwnSource, SplitSource, data_location, read_class_list, resolve_labels
from gradtail.errors import DataError

CSV_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
_EXPECTS = "a folder with train.csv and test.csv (val.csv optional), or one .csv file, columns path,label"
_MAX_MISSING_REPORTED = 3


@dataclass
class CsvRows:
    """The entries of a CSV file: paths and labels as written, and the line of each."""

    file: Path
    paths: list[str]
    labels: list[str]
    lines: list[int]


def read_csv_rows(file: Path) -> CsvRows:
    """The ``path`` and ``label`` cells of every non-blank row below the header of ``file``."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{file} is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror or e}") from None
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows = CsvRows(file, [], [], [])
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                if "path" not in header or "label" not in header:
                    raise DataError(
                        f"{file}:{reader.line_num}: the header must name the columns path and label, "
                        f"got {row}"
                    )
                path_col, label_col = header.index("path"), header.index("label")
                continue
            if len(row) <= max(path_col, label_col):
                raise DataError(f"{file}:{reader.line_num}: expected {len(header)} columns, got {row}")
            path, label = row[path_col].strip(), row[label_col].strip()
            if not path or not label:
                raise DataError(f"{file}:{reader.line_num}: empty {'path' if not path else 'label'}")
            rows.paths.append(path)
            rows.labels.append(label)
            rows.lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{file}:{reader.line_num}: not valid CSV ({e})") from None
    if header is None:
        raise DataError(f"{file} is empty (expected a header naming the columns path and label)")
    if not rows.paths:
        raise DataError(f"{file} lists no images")
    return rows


def read_image_csv(cfg: DataConfig) -> OwnSource:
    """The CSV lists under ``data.data_dir`` (see the module docstring).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "train.csv").write_text("path,label\\na.png,dog\\nb.png,cat\\nc.png,dog\\n")
        >>> _ = (folder / "test.csv").write_text("path,label\\nd.png,cat\\n")
        >>> cfg = DataConfig(dataset="image_csv", data_dir=str(folder), check_files=False)
        >>> source = read_image_csv(cfg)
        >>> source.class_names, source.train.labels.tolist(), [p.name for p in source.test.paths]
        (['cat', 'dog'], [1, 0, 1], ['d.png'])
    """
    location = data_location(cfg, _EXPECTS)
    if location.is_file():
        files, base = {"train": location}, location.parent
        test_hint = "one CSV file"
    else:
        base = location
        files = {s: location / name for s, name in CSV_FILES.items() if (location / name).is_file()}
        if "train" not in files:
            raise DataError(f"{location} has no train.csv (image_csv reads {_EXPECTS})")
        test_hint = f"no {location / 'test.csv'}"
    image_root = Path(cfg.image_root).expanduser() if cfg.image_root else base
    if not image_root.is_dir():
        raise DataError(f"data.image_root {image_root} (where the CSV paths start) is not a folder")
    class_list = read_class_list(cfg, base)
    rows = {s: read_csv_rows(f) for s, f in files.items()}
    names, labels = resolve_labels(
        {s: r.labels for s, r in rows.items()},
        class_list,
        lambda split, i: f"{rows[split].file}:{rows[split].lines[i]}",
    )
    splits: dict[str, SplitSource] = {}
    for s, r in rows.items():
        paths = [image_root / p for p in r.paths]
        if cfg.check_files:
            missing = [i for i, p in enumerate(paths) if not p.is_file()]
            if missing:
                shown = ", ".join(f"line {r.lines[i]}: {paths[i]}" for i in missing[:_MAX_MISSING_REPORTED])
                more = len(missing) - _MAX_MISSING_REPORTED
                tail = f" (and {more} more)" if more > 0 else ""
                raise DataError(f"{r.file}: {len(missing)} listed image(s) do not exist: {shown}{tail}")
        splits[s] = SplitSource(labels=labels[s], origin=str(r.file), paths=paths)
    return OwnSource(
        name="image_csv",
        location=location,
        root=image_root,
        class_names=names,
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        test_hint=test_hint,
    )


__all__ = ["CSV_FILES", "CsvRows", "read_csv_rows", "read_image_csv"]

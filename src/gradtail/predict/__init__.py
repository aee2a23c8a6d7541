"""``gradtail predict``: a trained run's predictions from its checkpoint alone (no training data), one
module per task, each writing the task's own format (docs/runs.md, "Predict"):

- :mod:`~gradtail.predict.classification`: top-k class names and probabilities (CSV / JSON), with the
  run's fitted post-hoc adjusters;
- :mod:`~gradtail.predict.segmentation`: one label-map PNG per image (palette PNG, class ids as pixel
  values);
- :mod:`~gradtail.predict.detection`: a results file in the COCO / LVIS results format (``image_id``,
  ``category_id``, ``bbox`` [x, y, w, h], ``score``), and on request the images with their boxes drawn.

The task of the checkpoint's config picks the module (:meth:`gradtail.contracts.TaskContract.predict`);
:class:`CheckpointData` stands in for the run's data where a task's model builder reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradtail.errors import DataError
from gradtail.predict.classification import FORMATS, PredictionSet, Predictor, output_format


@dataclass
class CheckpointData:
    """What a checkpoint records of its run's data (``class_counts``, ``class_names``, ``preprocessing``,
    the data hash): enough for a task to rebuild its model and loss without the training data."""

    class_counts: list[int]
    class_names: list[str]
    preprocessing: dict[str, Any]
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: dict[str, Any], path: Path) -> CheckpointData:
        missing = [k for k in ("class_counts", "class_names", "preprocessing") if state.get(k) is None]
        if missing:
            raise DataError(
                f"checkpoint {path} lacks {', '.join(missing)} (written before gradtail predict existed); "
                "train the run again with a current gradtail"
            )
        counts = [int(n) for n in state["class_counts"]]
        names = [str(n) for n in state["class_names"]]
        if len(names) != len(counts):
            raise DataError(f"checkpoint {path}: {len(names)} class names for {len(counts)} classes")
        return cls(counts, names, dict(state["preprocessing"]), str(state.get("subset_sha256")))

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def in_channels(self) -> int:
        return 1 if self.preprocessing.get("mode") == "L" else 3

    @property
    def train_labels(self) -> torch.Tensor:  # pragma: no cover - not needed to predict
        raise DataError("a checkpoint holds no training labels")


def load_weights(module: torch.nn.Module, weights: dict[str, Any], path: Path, what: str = "model") -> None:
    """``module.load_state_dict(weights)`` with a one-line :class:`DataError` naming the checkpoint."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().split("\n")[0]
        raise DataError(f"checkpoint {path}: the {what} weights do not fit its config ({first})") from None


__all__ = ["FORMATS", "CheckpointData", "PredictionSet", "Predictor", "load_weights", "output_format"]

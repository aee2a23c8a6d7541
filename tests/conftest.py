from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


REPO = Path(__file__).resolve().parent.parent
# Detection configs and suites (task: detection) have their own schema (gradtail.detection.training,
# gradtail.bench.detection, docs/detection.md), not RunConfig's: tests/test_detection_training.py and
# tests/test_detection_cli.py check them.
DETECTION_FILES = ("configs/detection/", "suites/detection_")


def shipped_run_configs() -> list[Path]:
    """Every shipped ``gradtail train`` config (configs/**/*.yaml but the detection runs' files)."""
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    return [p for p in paths if not str(p.relative_to(REPO)).startswith(DETECTION_FILES)]


def shipped_suites() -> list[Path]:
    """Every shipped ``gradtail bench`` suite (suites/*.yaml but the detection runs' suite)."""
    paths = sorted((REPO / "suites").glob("*.yaml"))
    return [p for p in paths if not str(p.relative_to(REPO)).startswith(DETECTION_FILES)]


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent

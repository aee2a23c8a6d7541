from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


REPO = Path(__file__).resolve().parent.parent
def shipped_run_configs() -> list[Path]:
    """Every shipped ``gradtail train`` config (configs/**/*.yaml), whatever its task."""
    return sorted((REPO / "configs").rglob("*.yaml"))


def shipped_suites() -> list[Path]:
    """Every shipped ``gradtail bench`` suite (suites/*.yaml), whatever its task."""
    return sorted((REPO / "suites").glob("*.yaml"))


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent

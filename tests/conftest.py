from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent

"""Shared test set-up: the repository root on sys.path, few threads (CI has 2 cores), no network."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
SHARED_DATA = ROOT.parent / "shared" / "datasets"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").exists():
        pytest.skip(f"real MNIST not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    os.environ.pop("WORLD_SIZE", None)

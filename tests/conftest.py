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


class FlatLinear(torch.nn.Module):
    """A model whose features are exactly its flattened input and whose head is one linear map: detectors' tests
    control the features they see. `with_weights` fixes the head's W and b."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim, num_classes)

    @classmethod
    def with_weights(cls, weight, bias) -> "FlatLinear":
        weight = torch.as_tensor(weight, dtype=torch.float32)
        model = cls(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            model.fc.weight.copy_(weight)
            model.fc.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        return model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

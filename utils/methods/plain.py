"""Plain empirical risk minimisation: mean cross-entropy on the clean batch."""
from __future__ import annotations

from argparse import Namespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.methods.base import Method


def plain_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
               opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """L = mean_i CE(f(x_i), y_i). For a model that outputs log-probabilities (CCU) CE equals the NLL."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


PLAIN = Method(loss=plain_loss)

"""The training-method interface: one loss function per method, plus optional hooks for the training loop."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

# loss(model, x, y, x_out, opts) -> (scalar loss, logits of the clean batch x)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Namespace],
                  "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Method:
    """A training objective for `train.py --method`.

    loss: the objective on one batch (see `LossFn`).
    uses_out_data: the loop draws an out-distribution batch `x_out` from `--out-data` for every step.
    wrap_model: optional `fn(model, opts, init) -> model` applied after the backbone is built (CCU wraps it).
        With init=True (start of training) it may read other run folders named in opts (CCU's `--gmm`); with
        init=False (`models.load_run`) it must build the structure from the saved config alone, since the
        checkpoint's state_dict supplies every tensor.
    param_groups: optional `fn(model, opts) -> list[dict]` of optimiser groups (CCU: GMMs get their own lr).
    after_step: optional `fn(model, opts) -> None` called after every optimiser step (CCU's variance clamp).
    """

    loss: LossFn
    uses_out_data: bool = False
    wrap_model: Optional[Callable] = None
    param_groups: Optional[Callable] = None
    after_step: Optional[Callable] = None

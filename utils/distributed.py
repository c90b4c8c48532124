"""DistributedDataParallel for any network of the training loop (the classifier, and auxiliary networks).

`wrap_ddp(module, device)` returns the module itself outside `torchrun` (world size 1) or when it has nothing
to train, else a DistributedDataParallel wrapper: its bucketed all-reduce starts while the backward pass is still
running, instead of one all-reduce after it. The wrapper's reducer expects one backward per forward, so:
  * a loss calls the wrapped network exactly once per step (clean and out batches concatenated, as every
    method in utils/methods/ does);
  * passes that need no parameter gradients (attacks, scoring) call `unwrap(module)`; `utils.attacks` does
    this for every PGD attack;
  * evaluation, checkpoints and `after_step` hooks use the unwrapped module (its state_dict keys have no
    "module." prefix, so run folders are the same with and without torchrun).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel when a process group of more than one process is running."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module  # nothing to synchronise
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (the module itself when it is not wrapped)."""
    return module.module if isinstance(module, DistributedDataParallel) else module

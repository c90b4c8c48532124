"""Training objectives for `train.py --method NAME`: one loss function per method, one training loop."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Union

import torch
from torch import nn

from utils import checkpoints
from utils.methods.base import Method
from utils.methods.ccu import CCU_METHODS
from utils.methods.certified import CERTIFIED_METHODS
from utils.methods.edl import EDL_METHODS
from utils.methods.gan import GAN_METHODS
from utils.methods.noise import NOISE_METHODS
from utils.methods.plain import PLAIN

METHODS: dict[str, Method] = {
    "plain": PLAIN,
    **NOISE_METHODS,
    **CCU_METHODS,
    **EDL_METHODS,
    **GAN_METHODS,
    **CERTIFIED_METHODS,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def load_run(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The trained model of a run folder, in eval mode on `device`: `utils.checkpoints.load_run` with every
    method's `wrap_model`, so a CCU, EDL or ProoD run comes back wrapped as it was trained."""
    wrappers = {name: method.wrap_model for name, method in METHODS.items() if method.wrap_model is not None}
    return checkpoints.load_run(run_dir, device, wrappers)


def load_auxiliary(run_dir, device="cpu"):
    """(classifier, Auxiliary) of a run folder: `load_run` and the method's auxiliary networks restored
    from model.pt (weights_only=True), all in eval mode on `device`; e.g. a GAN run's generator for figures."""
    model = load_run(run_dir, device)
    method = get_method(str(model.run_config.get("method")))
    if method.auxiliary is None:
        raise ValueError(f"{run_dir}: method {model.run_config.get('method')!r} trains no auxiliary networks")
    aux = method.auxiliary(model, Namespace(**model.run_config))
    aux.load_state_dict(checkpoints.read_checkpoint(Path(run_dir) / "model.pt", device))
    for net in aux.nets.values():
        net.eval()
    return model, aux

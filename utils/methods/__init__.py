"""Training objectives for `train.py --method NAME`: one loss function per method, one training loop.

A method is one file under utils/methods/: its loss, its flags with their ranges (`base.FlagGroup`; flags that
several methods read are declared once in `shared.py`) and its defaults, in a `base.Method`. Adding one is that
file, one line in METHODS below, a test and its docs/methods.md section: train.py builds its parser, checks
the ranges and takes the defaults from this registry.
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from utils import checkpoints
from utils.methods.base import FlagGroup, Method
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


def flag_groups() -> dict[FlagGroup, list[str]]:
    """Every flag group of the registered methods, once, in registry order -> the methods that read it."""
    groups: dict[FlagGroup, list[str]] = {}
    for name, method in METHODS.items():
        for group in method.flags:
            groups.setdefault(group, []).append(name)
    return groups


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """One argument group per flag group, titled with the methods that read it (all methods' flags, so that
    every run's config.json has the same keys whatever its method)."""
    for group, names in flag_groups().items():
        group.add(parser.add_argument_group(f"{group.title} (--method {', '.join(names)})"))


def method_ranges() -> dict[str, Any]:
    """The allowed values of every method flag (argparse dest -> utils.cli.Range)."""
    return {dest: allowed for group in flag_groups() for dest, allowed in group.ranges.items()}


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

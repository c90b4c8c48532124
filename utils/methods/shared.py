"""Flag groups that several training methods read, declared once; each method lists the ones it uses in
`Method.flags` (see `utils.methods.base.FlagGroup`).

OUT_DATA: the training out-distribution the loop draws `x_out` from, for every method with `uses_out_data`.
ATTACK: the PGD that ACET runs on its out batch; its defaults are `utils.attacks.PGD_DEFAULTS`, the ones
`evaluate.py`'s adversarial sets start from too.
"""
from __future__ import annotations

import argparse

import data
from utils.attacks import NORMS, PGD_DEFAULTS
from utils.cli import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE
from utils.methods.base import FlagGroup


def _add_out_data(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--out-data", default=None, type=data.dataset_arg,
                       help="training out-distribution: a data key, or NAME=PATH (an image folder or a .npz of "
                            "uint8 images) (default: model_params.PARAMS[dataset].out_data)")
    group.add_argument("--out-frac", type=float, default=1.0, help="out batch size relative to the clean batch")


def _add_attack(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--attack-eps", type=float, default=PGD_DEFAULTS.eps)
    group.add_argument("--attack-steps", type=int, default=PGD_DEFAULTS.steps)
    group.add_argument("--attack-step-size", type=float, default=PGD_DEFAULTS.step_size, help="default: eps / steps")
    group.add_argument("--attack-norm", default=PGD_DEFAULTS.norm, choices=list(NORMS))
    group.add_argument("--attack-random-start", action=argparse.BooleanOptionalAction,
                       default=PGD_DEFAULTS.random_start)


OUT_DATA = FlagGroup("out-distribution", _add_out_data, ranges={"out_frac": POSITIVE})
ATTACK = FlagGroup("attack on the out batch", _add_attack,
                   ranges={"attack_eps": NON_NEGATIVE, "attack_steps": NON_NEGATIVE_INT, "attack_step_size": POSITIVE})

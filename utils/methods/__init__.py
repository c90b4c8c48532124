"""Training objectives for `train.py --method NAME`: one loss function per method, one training loop."""
from __future__ import annotations

from utils.methods.base import Method
from utils.methods.ccu import CCU_METHODS
from utils.methods.certified import CERTIFIED_METHODS
from utils.methods.edl import EDL_METHODS
from utils.methods.noise import NOISE_METHODS
from utils.methods.plain import PLAIN

METHODS: dict[str, Method] = {
    "plain": PLAIN,
    **NOISE_METHODS,
    **CCU_METHODS,
    **EDL_METHODS,
    **CERTIFIED_METHODS,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]

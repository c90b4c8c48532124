"""Mixed precision (`--amp`), channels-last memory format (`--channels-last`) and `--compile` for every script.

What runs in reduced precision: the network's forward and backward passes in training (the loss, and the
attacks and extra passes the loss makes, e.g. ACET's PGD), and the attack steps in evaluation and the studies.
What never does, whatever `--amp` says (each place disables autocast itself, see `full_precision`, defined in
models/precision.py and re-exported here):
  * CCU's Gaussian-mixture log-densities and the CCU output formula (models/gmm.py, models/ccu.py), float32:
    densities reach -1e9 far from the data, and the Gram-expansion distances cancel catastrophically in bf16;
  * certified radii (utils/certify.py) and interval bounds: float64 inputs, which autocast never casts;
  * metrics (utils/metrics.py: float64 tensors and scikit-learn on numpy);
  * the scores that feed the metrics: evaluation's forward passes run in float32 unless `--amp-scores` is
    given, because bf16 logits keep about three significant digits, so confidences near 1 tie and AUROC moves.
fp16 training uses a GradScaler (dynamic loss scaling); bf16 has float32's exponent range and needs none.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from models.precision import full_precision  # noqa: F401  (re-exported: it lives with the models that use it)

AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_amp(device: str | torch.device) -> str:
    """`--amp`'s default: bf16 on a CUDA device that supports it, else off (CPU autocast is slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "off"


def check_amp(amp: str, device: str | torch.device) -> None:
    """One clear error for a precision this device cannot run."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; valid: {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (CPU autocast supports bf16); use --amp bf16 or off")


def autocast(device: str | torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for `amp` on `device`'s type; a no-op context for "off" (it never disables an outer one)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# --- attacks in evaluation and the studies ----------------------------------------------------------------------
_ATTACK_AMP = {"amp": "off"}


def set_attack_amp(amp: str) -> None:
    """The precision of attack steps outside training (evaluate.py, gen_attack_stats.py set it from --amp).
    Inside training the whole loss already runs under the training autocast, attacks included."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; valid: {', '.join(AMP_DTYPES)}")
    _ATTACK_AMP["amp"] = amp


def attack_autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """Autocast for one attack step at the precision `set_attack_amp` chose (default off)."""
    return autocast(device, _ATTACK_AMP["amp"])


# --- training -----------------------------------------------------------------------------------------------------
@dataclass
class Precision:
    """How the training loop runs its steps: autocast dtype, loss scaling (fp16), memory format."""

    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        check_amp(self.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images to channels-last when the model is (a (N, C, H, W) batch; vectors pass unchanged)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """backward + optimiser step, scaled for fp16 (the scaler skips steps whose gradients overflowed)."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights in NHWC order (faster convs with tensor cores); no-op for nets without 4-d weights."""
    return model.to(memory_format=torch.channels_last)


def try_compile(model: nn.Module, example: torch.Tensor, backend: str | Callable = "inductor",
                precision: Optional[Precision] = None) -> bool:
    """torch.compile `model` in place (its state_dict keys stay the same), checked on one forward and backward
    of `example` under the training autocast; on any failure the model stays uncompiled and one line says why.
    Returns whether it compiled."""
    model.compile(backend=backend)
    devices = [example.device] if example.device.type == "cuda" else []
    autocast_context = precision.autocast() if precision is not None else contextlib.nullcontext()
    try:  # the trial pass must leave no trace: random state, batch-norm statistics and gradients are restored
        with torch.random.fork_rng(devices=devices), bn_frozen(model):
            with autocast_context:
                output = model(example)
            (output[0] if isinstance(output, tuple) else output).float().sum().backward()
        model.zero_grad(set_to_none=True)
        # a later recompilation (eval mode in attacks, a new batch shape) that fails runs that call eagerly
        torch._dynamo.config.suppress_errors = True
        return True
    except Exception as error:  # noqa: BLE001 (any compiler failure means: run eagerly)
        model._compiled_call_impl = None  # undo nn.Module.compile
        model.zero_grad(set_to_none=True)
        root = _root_cause(error)
        first_line = (str(root).strip().splitlines() or [""])[0][:200]
        print(f"--compile: torch.compile failed ({type(root).__name__}: {first_line}); training uncompiled",
              flush=True)
        return False


def _root_cause(error: BaseException) -> BaseException:
    """The original error under torch._dynamo's wrappers (BackendCompilerFailed names the backend only)."""
    while getattr(error, "inner_exception", None) is not None or error.__cause__ is not None:
        error = getattr(error, "inner_exception", None) or error.__cause__
    return error


@contextlib.contextmanager
def bn_frozen(model: nn.Module) -> Iterator[None]:
    """Keep batch-norm running statistics unchanged through a trial pass (momentum 0 would still count it)."""
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])

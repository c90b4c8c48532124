"""Build a model from a run configuration, save checkpoints atomically, and rebuild a trained run safely.

A checkpoint `run_dir/model.pt` is `{"model": state_dict, "config": dict, "epoch": int, ...}` and is only ever
read with `torch.load(..., weights_only=True)`: a file that would need code to unpickle is refused, never run.

The checkpoint's config names the run it belongs to (`IDENTITY_KEYS`: the run id train.py draws at the first
start, method, arch, dataset, seed). Every reader of a run folder (`read_run_checkpoint`: load_run, resume,
utils.resume.run_state) compares them with the folder's config.json and refuses a checkpoint of another run,
naming what differs. Checkpoints and configs written before the run id existed are compared on the keys both
have (method, arch, dataset, seed); a folder without config.json is read from model.pt alone.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn

OPTIONAL_DEFAULTS: Dict[str, Any] = {"dropout": 0.0, "normalize": None, "spectral_norm_coeff": None,
                                     "mod": False}
REQUIRED_KEYS = ("arch", "num_classes", "in_channels", "input_size")


def _as_tuple(value: Any) -> Any:
    """JSON turns tuples into lists; the constructors want tuples back (nested for normalize)."""
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def build_model(config: dict) -> nn.Module:
    """Build `MODELS[config["arch"]]` from a run config (keys: arch, num_classes, in_channels, input_size,
    and optionally dropout, normalize, spectral_norm_coeff, mod, arch_kwargs; other keys are ignored)."""
    from models import MODELS

    arch = config.get("arch")
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(MODELS)}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config lacks {missing}; needs {list(REQUIRED_KEYS)}")
    kwargs = {k: config[k] for k in ("num_classes", "in_channels")}
    kwargs["input_size"] = _as_tuple(config["input_size"])
    for key, default in OPTIONAL_DEFAULTS.items():
        value = config.get(key, default)
        kwargs[key] = _as_tuple(value) if key == "normalize" else value
    kwargs["dropout"] = float(kwargs["dropout"] or 0.0)
    kwargs["mod"] = bool(kwargs["mod"])
    arch_kwargs = {k: _as_tuple(v) for k, v in (config.get("arch_kwargs") or {}).items()}
    return MODELS[arch](**kwargs, **arch_kwargs)


def save_checkpoint(path: Union[str, Path], payload: dict) -> None:
    """torch.save `payload` to `path` atomically: a temporary file in the same folder, fsync, os.replace, so a
    crash leaves either the old file or the new one, never half of one. The file gets the user's umask; a full
    disk raises `utils.runs.DiskFullError` ("No space left on ...; the last checkpoint ... is intact")."""
    from utils.runs import write_atomically

    path = Path(path)
    buffer = io.BytesIO()  # serialised first: a full disk then fails in a plain write, with its errno
    torch.save(payload, buffer)
    write_atomically(path, buffer.getbuffer(), what="checkpoint")
    try:  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, foreign, code-carrying, or not matching its config)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def unpickling_reason(text: str) -> str:
    """What torch refused to unpickle, without torch's advice around it (retry with weights_only=False, i.e. run
    the file's code; file an issue; read the docs), which this project never passes on."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.split(":", 1)[1].strip().split(". Please")[0].rstrip(".")
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    specific = [line for line in lines if not line.startswith(advice) and "weights_only" not in line]
    return specific[0] if specific else "the file needs code to be unpickled"


def read_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> dict:
    """Load a checkpoint dict with weights_only=True and check its keys; every failure is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused below
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load {path}: not a plain-tensor checkpoint "
                         f"({unpickling_reason(str(err))})") from None
    except Exception as err:  # truncated zip, empty file, foreign format
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or not a PyTorch file "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) \
            or not isinstance(payload.get("config"), dict):
        found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: expected a dict with 'model' (state dict) and 'config' (dict), found {found}")
    return payload


IDENTITY_KEYS = ("run_id", "method", "arch", "dataset", "seed")


def identity_mismatch(checkpoint_config: dict, run_config: dict) -> list[str]:
    """`key 'saved' in the checkpoint, 'other' in config.json` for each IDENTITY_KEYS entry both carry and that
    differs (a key only one of them has, as in runs saved before the run id existed, is not compared)."""
    return [f"{key} {checkpoint_config[key]!r} in the checkpoint, {run_config[key]!r} in config.json"
            for key in IDENTITY_KEYS
            if key in checkpoint_config and key in run_config and checkpoint_config[key] != run_config[key]]


def read_run_config(run_dir: Union[str, Path]) -> Union[dict, None]:
    """The run folder's config.json as a dict, None when there is none; unreadable: CheckpointError."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {_first_line(err)}); restore it from "
                              "a copy of the run, or retrain the run") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a run configuration (a JSON object); restore it or retrain the run")
    return config


def read_run_checkpoint(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> dict:
    """`read_checkpoint(run_dir/model.pt)`, refused when it belongs to another run than run_dir's config.json."""
    path = Path(run_dir) / "model.pt"
    payload = read_checkpoint(path, device)
    run_config = read_run_config(run_dir)
    differences = identity_mismatch(payload["config"], run_config) if run_config is not None else []
    if differences:
        raise CheckpointError(f"{path} belongs to another run ({'; '.join(differences)}); put back this run's "
                              "own model.pt, or move the folder aside and retrain it")
    return payload


def _check_state_dict(path: Path, arch: str, model: nn.Module, state: dict) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and (not isinstance(state[k], torch.Tensor)
                                                         or tuple(state[k].shape) != tuple(expected[k].shape))]
    if missing or unexpected or mismatched:
        parts = [f"{name} {len(keys)} (e.g. {keys[0]})" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
        raise CheckpointError(f"{path}: checkpoint does not match arch {arch}: {'; '.join(parts)}")


def load_run(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild the trained model of `run_dir` from `run_dir/model.pt` alone, in eval mode on `device`.

    When config["method"] names a method of `utils.methods.METHODS` with a `wrap_model` (CCU), the backbone is
    wrapped with `wrap_model(model, Namespace(**config), init=False)` before the weights are loaded. The
    config is attached as `model.run_config`. A checkpoint of another run than the folder's config.json is
    refused (`read_run_checkpoint`).
    """
    path = Path(run_dir) / "model.pt"
    payload = read_run_checkpoint(run_dir, device)
    config = payload["config"]
    try:
        model = build_model(config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot build the configured model: {_first_line(err)}") from None
    method_name = config.get("method")
    if method_name is not None:
        from utils.methods import METHODS  # lazy: the models package must not depend on training code

        method = METHODS.get(method_name)
        if method is not None and method.wrap_model is not None:
            model = method.wrap_model(model, argparse.Namespace(**config), init=False)
    _check_state_dict(path, str(config.get("arch")), model, payload["model"])
    model.load_state_dict(payload["model"])
    model.run_config = dict(config)
    return model.to(device).eval()

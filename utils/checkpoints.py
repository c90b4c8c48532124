"""Run folders' checkpoints: save them atomically, read them safely, rebuild a trained run.

A checkpoint `run_dir/model.pt` is `{"model": state_dict, "config": dict, "epoch": int, ...}` and is only ever
read with `torch.load(..., weights_only=True)`: a file that would need code to unpickle is refused, never run.

The checkpoint's config names the run it belongs to (`IDENTITY_KEYS`: the run id train.py draws at the first
start, method, arch, dataset, seed). Every reader of a run folder (`read_run_checkpoint`: load_run, resume,
utils.resume.run_state) compares them with the folder's config.json and refuses a checkpoint of another run,
naming what differs. Checkpoints and configs written before the run id existed are compared on the keys both
have (method, arch, dataset, seed); a folder without config.json is read from model.pt alone.

This is the I/O above the models: `models.build_model` builds the network from a config, and this module fills
it with a run's weights. A method that wraps its backbone (CCU, EDL, ProoD) hands its `wrap_model` to
`load_run`; `utils.methods.load_run` does that for every method.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from models import build_model
from utils.cli import first_line, unpickling_reason
from utils.runs import write_atomically

WrapModel = Callable[[nn.Module, argparse.Namespace, bool], nn.Module]


def save_checkpoint(path: Union[str, Path], payload: dict) -> None:
    """torch.save `payload` to `path` atomically: a temporary file in the same folder, fsync, os.replace, so a
    crash leaves either the old file or the new one, never half of one. The file gets the user's umask; a full
    disk raises `utils.runs.DiskFullError` ("No space left on ...; the last checkpoint ... is intact")."""
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


def _first_sentence(err: BaseException) -> str:
    """The first sentence of err's first line, or its type name: the cause inside a one-line checkpoint error."""
    return first_line(str(err)).split(". ")[0] or type(err).__name__


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
                         f"({type(err).__name__}: {_first_sentence(err)})") from None
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
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {_first_sentence(err)}); restore it from "
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


def load_run(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
             wrappers: Optional[Mapping[str, WrapModel]] = None) -> nn.Module:
    """Rebuild the trained model of `run_dir` from `run_dir/model.pt` alone, in eval mode on `device`.

    When config["method"] is a key of `wrappers` (method name -> its `wrap_model`), the backbone is wrapped with
    `wrap_model(model, Namespace(**config), init=False)` before the weights are loaded. The methods are above
    this module, so they hand their wrappers in: `utils.methods.load_run` is this function with every method's
    wrapper, the one to call for any run. The config is attached as `model.run_config`. A checkpoint of another
    run than the folder's config.json is refused (`read_run_checkpoint`).
    """
    path = Path(run_dir) / "model.pt"
    payload = read_run_checkpoint(run_dir, device)
    config = payload["config"]
    try:
        model = build_model(config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot build the configured model: {_first_sentence(err)}") from None
    wrap_model = (wrappers or {}).get(str(config.get("method")))
    if wrap_model is not None:
        model = wrap_model(model, argparse.Namespace(**config), init=False)
    _check_state_dict(path, str(config.get("arch")), model, payload["model"])
    model.load_state_dict(payload["model"])
    model.run_config = dict(config)
    return model.to(device).eval()

"""Bring your own model: a network built and trained elsewhere, scored by every script that takes run folders.

    python evaluate.py --dataset digits --model my_net.py:build --weights my_net.pt --detectors msp,mahalanobis

`--model FILE.py:CALLABLE` names a function (or class) that `CALLABLE()` builds the network with, `--weights`
a file holding its `state_dict` (loaded with `torch.load(..., weights_only=True)`; a run's `model.pt`, whose
state dict sits under "model", is taken too). The network takes pixels in [0, 1] and returns logits;
`--normalize NAME` puts a normalisation first when it expects normalised input (as train.py's models carry
it). Features for the detectors that need them come from a forward hook (`models.hooked`): the input of the
last nn.Linear, or the module `--features-layer NAME`. Rows name the network `--name` (default FILE:CALLABLE)
and key it by `weights_hash`, a hash of its weights and normalisation (the `checkpoint` of a run's rows).

Every check runs before any scoring, each failure one line and exit status 2: the file, the callable, what it
returns, the weights' file, keys and shapes, and the output width against the dataset's classes.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import data
import model_params
from models.common import Normalize
from models.hooked import HookedFeatures, with_features
from utils.cli import UserError, first_line

SHOWN_KEYS = 5  # missing / unexpected state-dict keys named in an error


@dataclass
class ExternalNetwork:
    """A checked, loaded network from elsewhere: what rows call it (`name`, also their run) and key it by."""

    name: str
    network: nn.Module
    checkpoint: str


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a network from elsewhere (evaluate.py and every study of gen_attack_stats.py)."""
    group = parser.add_argument_group("a network trained elsewhere (docs/byom.md)")
    group.add_argument("--model", default=None, metavar="FILE.py:CALLABLE",
                       help="score the network CALLABLE() of FILE.py builds (with --weights) instead of run folders")
    group.add_argument("--weights", default=None, metavar="W.pt", help="the network's state_dict (weights_only)")
    group.add_argument("--normalize", default=None, choices=["none", *model_params.NORMALIZATIONS],
                       help="input normalisation put before the network (default none: it takes [0, 1] pixels)")
    group.add_argument("--name", default=None, help="label of the network in rows and tables (default FILE:CALLABLE)")
    group.add_argument("--features-layer", default=None, metavar="NAME",
                       help="module of named_modules() whose output are the features (default: the input of the "
                            "last nn.Linear)")


def check_model_flags(args: argparse.Namespace) -> None:
    """--weights, --normalize, --name and --features-layer belong to --model, which needs --weights."""
    if getattr(args, "model", None) is None:
        given = [flag for flag in ("weights", "normalize", "name", "features_layer") if getattr(args, flag, None)]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies to a network given with --model "
                            "FILE.py:CALLABLE; add --model or drop it")
        return
    if getattr(args, "weights", None) is None:
        raise UserError("--model needs --weights W.pt (the network's state_dict)")


def model_name(spec: str) -> str:
    """FILE:CALLABLE, the default label of --model FILE.py:CALLABLE."""
    file, _, attr = spec.rpartition(":")
    return f"{Path(file).stem}:{attr}"


def build_network(spec: str) -> nn.Module:
    """CALLABLE() of FILE.py, checked to be an nn.Module."""
    file, sep, attr = spec.rpartition(":")
    if not sep or not file or not attr:
        raise UserError(f"--model {spec!r}: give FILE.py:CALLABLE, e.g. my_net.py:build")
    path = Path(file)
    if not path.is_file() or path.suffix != ".py":
        raise UserError(f"--model: {path} is not a Python file (.py); give FILE.py:CALLABLE")
    unique = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]  # two files of one name stay apart
    module_spec = importlib.util.spec_from_file_location(f"byom_{unique}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 (the user's file: any error is theirs to fix)
        raise UserError(f"--model: importing {path} raised {type(error).__name__}: {first_line(str(error))}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
                       and getattr(value, "__module__", None) == module.__name__)
        raise UserError(f"--model: {path} defines no callable {attr!r}; callables defined there: "
                        f"{', '.join(found) or 'none'}")
    try:
        network = factory()
    except Exception as error:  # noqa: BLE001
        raise UserError(f"--model: {attr}() of {path} raised {type(error).__name__}: {first_line(str(error))}") from error
    if not isinstance(network, nn.Module):
        raise UserError(f"--model: {attr}() of {path} returned {type(network).__name__}, not a torch.nn.Module")
    return network


def read_weights(path: str | Path) -> dict:
    """The state_dict in `path` (a run's {"model": state_dict, ...} checkpoint too), with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (pickled code, a torn or foreign file)
        raise UserError(f"--weights: {path} is not a state_dict torch.load(..., weights_only=True) can read "
                        f"({type(error).__name__}); save it with torch.save(model.state_dict(), path)") from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights: {path} holds no state_dict (a dict of tensors); save it with "
                        "torch.save(model.state_dict(), path)")
    return state


def load_weights(network: nn.Module, state: dict, where: str) -> None:
    """load_state_dict after naming the first missing, unexpected or mis-shaped key in one line."""
    own = network.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:SHOWN_KEYS])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:SHOWN_KEYS])}" if unexpected else ""]
        raise UserError(f"--weights: {where} does not fit the network of --model: "
                        f"{'; '.join(p for p in parts if p)} (of {len(own)} keys)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"--weights: {where}: {key} has shape {tuple(value.shape)}, the network of --model "
                            f"wants {tuple(own[key].shape)}")
    network.load_state_dict(state)


def weights_hash(network: nn.Module, length: int = 12) -> str:
    """A hash of the network's state_dict (names, dtypes, shapes, values) and of a Normalize in front: the same
    for the network loaded by the CLI and the same network passed from Python, whatever file held it."""
    digest = hashlib.sha256()
    for key, value in network.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(json.dumps([key, str(value.dtype), list(value.shape)]).encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:length]


def prepare_network(network: nn.Module, features_layer: Optional[str] = None,
                    normalize: Optional[str] = None) -> nn.Module:
    """The network as the scripts score it: a Normalize in front when asked, features by hook when it has no
    features()/head() (or another layer is named), in eval mode."""
    mean_std = model_params.normalization(normalize)
    if mean_std is not None:
        network = HookedFeatures(network, features_layer, Normalize(*mean_std))
    else:
        try:
            network = with_features(network, features_layer)
        except ValueError as error:  # an unknown features layer
            raise UserError(f"--features-layer: {error}") from error
    return network.eval()


def check_output_width(network: nn.Module, dataset: str, device: torch.device | str, what: str) -> None:
    """One input of the dataset's shape gives (1, num_classes) logits, or a one-line error."""
    num_classes, shape = data.dataset_info(dataset)
    x = torch.zeros(1, *shape, device=device, dtype=next(network.parameters(), torch.zeros(())).dtype)
    try:
        with torch.no_grad():
            out = network.eval()(x)
    except Exception as error:  # noqa: BLE001 (the user's forward pass)
        raise UserError(f"{what}: its forward pass on one {dataset} input of shape {tuple(shape)} raised "
                        f"{type(error).__name__}: {first_line(str(error))}") from error
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{what}: on one {dataset} input it returns {got}, expected logits of shape "
                        f"(1, {num_classes}) ({dataset} has {num_classes} classes)")


def load_external(args: argparse.Namespace, dataset: str, device: torch.device | str) -> Optional[ExternalNetwork]:
    """The checked network of --model/--weights (None without --model), ready to score on `dataset`."""
    check_model_flags(args)
    if args.model is None:
        return None
    network = build_network(args.model)
    load_weights(network, read_weights(args.weights), str(args.weights))
    return external_network(network, args.name or model_name(args.model), dataset, device, args.features_layer,
                            args.normalize, f"--model {args.model}")


def external_network(network: nn.Module, name: str, dataset: str, device: torch.device | str,
                     features_layer: Optional[str], normalize: Optional[str], what: str) -> ExternalNetwork:
    """`network` on `device`, prepared (features hook, normalisation) and checked to give the dataset's logits."""
    prepared = prepare_network(network.to(device), features_layer, normalize)
    check_output_width(prepared, dataset, device, what)
    return ExternalNetwork(name, prepared, weights_hash(prepared))


@dataclass
class StudyTarget:
    """One network a study of gen_attack_stats.py scores: its label, what its rows call its run, and `load()`
    giving (network, checkpoint hash) when its turn comes (run folders are loaded one at a time)."""

    label: str
    run: str
    load: Callable[[], tuple[nn.Module, str]]
    run_dirs: tuple = ()  # its run folders (none for a network of --model)


def run_target(label: str, run_dirs: Sequence[Path], load: Callable[[], nn.Module]) -> StudyTarget:
    """A target of run folders: rows name them (comma-joined) and key them by their model.pt hashes."""
    from utils.runs import file_hash

    def loaded() -> tuple[nn.Module, str]:
        network = load()
        return network, ",".join(file_hash(Path(d) / "model.pt") for d in run_dirs)

    return StudyTarget(label, ",".join(map(str, run_dirs)), loaded, tuple(Path(d) for d in run_dirs))


def study_targets(args: argparse.Namespace, runs: Callable[[], list[StudyTarget]]) -> list[StudyTarget]:
    """The targets of a study: the run folders (`runs()`: --runs, or the table's), then the network of
    --model, checked and loaded here, before any work; --model without --runs studies that network alone."""
    external = load_external(args, args.dataset, args.device)
    targets = [] if external is not None and not args.runs else runs()
    if external is not None:
        targets.append(StudyTarget(external.name, external.name, lambda: (external.network, external.checkpoint)))
    return targets

"""Resuming a training run (`train.py --name X --resume`): the run continues the configuration in its own
config.json; the command line may change only what cannot change the experiment.

* The run is found by the folder the command names, `<--runs-root>/<--dataset>/<--name>` (without --dataset:
  the one dataset folder that holds a run of that name), never by the name stored inside its config, so a
  copied or renamed run resumes in its own folder and the original stays untouched.
* A flag left out keeps the saved value (a 6-epoch run stays a 6-epoch run; its --data-root stays).
* A flag given explicitly (its value differs from the parser default) may change only `RESUME_CHANGEABLE`:
  the length of the run and how this process runs it. Any other difference from the saved value (method,
  arch, dataset, seed, lr, ...) is refused, naming the flag. Changes are recorded in config.json ("resumes")
  and in the first log.jsonl row after the resume ("resumed").
* The saved configuration is checked like the command line (types, choices, ranges) before anything is
  written, so a hand-edited config.json fails with one line and leaves the run as it was.
* A run without a checkpoint (never started, or stopped before its first epoch ended) has nothing to continue:
  `--resume` then starts it from scratch with this command's flags (`has_checkpoint`), so a preemptible job can
  pass --resume every time.
"""
from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

from utils.cli import UserError

# May change when a run is resumed: how long it trains, and how this process runs it (none of these changes
# what one training step computes; --max-batches shortens or lengthens later epochs and is recorded).
RESUME_CHANGEABLE = ("epochs", "max_batches", "test_batch_size", "data_root", "download", "device", "num_workers",
                     "progress", "amp", "channels_last", "compile", "device_data")  # the last four: speed settings
# Taken from this command even when not given: they describe the machine, not the experiment.
PER_PROCESS = ("device", "num_workers", "progress", "download")
# Say where the run is or how this command behaves; never compared with the saved configuration.
LOCATION_FLAGS = ("resume", "name", "runs_root", "dataset", "debug")
# Not worth a record: they change nothing in the run's files.
UNRECORDED = ("progress", "download")


class RunNotFound(UserError):
    """No run of that name under the runs root (without --dataset): nothing to resume."""


def locate_run(args: Namespace) -> Path:
    """The folder named on the command line: <runs_root>/<dataset>/<name>."""
    from utils.runs import check_run_name, check_runs_root

    name = check_run_name(args.name or f"{args.method}-s{args.seed}")
    check_runs_root(args.runs_root)
    root = Path(args.runs_root)
    if args.dataset is not None:
        return root / check_run_name(args.dataset, "--dataset") / name
    found = sorted(path.parent for path in root.glob(f"*/{name}/config.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise RunNotFound(f"--resume: no run named {name!r} in {root}/<dataset>/; pass the --dataset and --name "
                        "of the run to continue (or start it without --resume)")
    raise UserError(f"--resume: runs named {name!r} exist for several datasets "
                    f"({', '.join(p.parent.name for p in found)}); pass --dataset")


def read_saved_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.exists():
        hint = ("start the run without --resume" if not (run_dir / "model.pt").exists()
                else "the folder is not a complete train.py run")
        raise UserError(f"--resume: no configuration at {path}; {hint}")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--resume: {path} is unreadable ({type(err).__name__}: {err}); restore it from a copy "
                        "of the run, or start a new run") from None
    if not isinstance(saved, dict) or "method" not in saved or "arch" not in saved:
        raise UserError(f"--resume: {path} is not a train.py configuration (no method/arch)")
    return saved


def has_checkpoint(args: Namespace) -> bool:
    """Whether the run `--resume` names has a model.pt to continue; False (nothing to resume) for a run not
    yet started or stopped before its first checkpoint. Several datasets holding the name: UserError."""
    try:
        run_dir = locate_run(args)
    except RunNotFound:
        return False
    return (run_dir / "model.pt").is_file()


# Flags whose saved value is the resolved form, not what the flag takes (--normalize: the numbers of the name).
RESOLVED_FORM = ("normalize",)
# Always set in a train.py configuration (resolved from the dataset's defaults): a saved null is refused too.
NEVER_NULL = ("seed", "epochs", "batch_size", "test_batch_size", "optimizer", "lr", "momentum", "weight_decay",
              "milestones", "gamma", "arch")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", dict: "a JSON object", str: "a string"}


def _expected_type(action: argparse.Action) -> type | None:
    """The JSON type of a saved value of this flag; None for a flag with its own parser (checked by calling it)."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return bool
    if action.type is None or action.type is str:
        return str
    return {int: int, float: float, json.loads: dict}.get(action.type)


def _refusal(dest: str, value: Any, action: argparse.Action) -> str | None:
    """What the flag takes, when a saved value could not have come from it; None when it could."""
    expected = _expected_type(action)
    what = _TYPE_WORDS.get(expected, f"what {action.option_strings[0]} reads")
    many = action.nargs not in (None, "?", 0)  # 0: an on/off flag
    if many and value is not None and not isinstance(value, list):
        return f"a list of {what.removeprefix('an ').removeprefix('a ')}s" if expected else "a list"
    for item in (value if many and value is not None else [value]):
        if item is None:
            if dest in NEVER_NULL:
                return what
            continue
        if expected is None:  # e.g. data.dataset_arg, a fraction: the flag's own parser judges the text
            try:
                if isinstance(item, (list, dict, bool)):
                    raise TypeError(f"not {type(item).__name__}")
                action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
                return f"{what} ({err})"
            continue
        fits = isinstance(item, (int, float) if expected is float else expected)
        if not fits or (isinstance(item, bool) and expected is not bool):
            return what
        if action.choices is not None and item not in action.choices:
            return f"one of {', '.join(map(str, action.choices))}"
    return None


def check_saved_config(saved: dict, parser: argparse.ArgumentParser, path: Path) -> None:
    """Refuse a saved value of a flag that its command-line flag would refuse (type or choice), naming the key,
    the file and what it takes. Ranges are checked afterwards with the command line's rules (train.py)."""
    for action in parser._actions:
        dest = action.dest
        if dest not in saved or dest in LOCATION_FLAGS or dest in RESOLVED_FORM or not action.option_strings:
            continue
        why = _refusal(dest, saved[dest], action)
        if why:
            raise UserError(f"--resume: {path} has \"{dest}\": {json.dumps(saved[dest], default=str)}, which "
                            f"{action.option_strings[0]} refuses: it takes {why}; correct the file (or restore "
                            "it from a copy of the run)")


def _same(a: Any, b: Any) -> bool:
    """Equal after a JSON round trip (tuples vs lists, ints vs floats)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or a == b


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resume_config(args: Namespace, defaults: dict[str, Any],
                  parser: argparse.ArgumentParser | None = None) -> tuple[Namespace, dict, dict]:
    """(configuration to continue, changes {dest: [saved, new]}, saved extras {provenance, resumes}).

    `defaults` are the parser's defaults: a flag counts as given when its value differs from them. With
    `parser`, the saved values are checked against its flags' types and choices first."""
    from utils.runs import resolve_data_root

    run_dir = locate_run(args)
    saved = read_saved_config(run_dir)
    if parser is not None:
        check_saved_config(saved, parser, run_dir / "config.json")
    extras = {key: saved.pop(key) for key in ("provenance", "resumes") if key in saved}
    given = {dest: value for dest, value in vars(args).items()
             if dest in defaults and not _same(value, defaults[dest]) and dest not in LOCATION_FLAGS}
    for dest, value in given.items():
        if dest not in RESUME_CHANGEABLE and not _same(value, saved.get(dest)):
            allowed = ", ".join(_flag(d) for d in RESUME_CHANGEABLE)
            raise UserError(f"--resume: {_flag(dest)} {value} differs from the run's {saved.get(dest)!r} "
                            f"({run_dir / 'config.json'}); a resumed run keeps its configuration and may change "
                            f"only {allowed}: start a new run (another --name) to change {_flag(dest)}")
    opts = {**{dest: value for dest, value in vars(args).items() if dest not in saved}, **saved}
    changes: dict[str, list] = {}
    for dest in RESUME_CHANGEABLE:
        if dest in given or dest in PER_PROCESS or dest not in saved:
            opts[dest] = getattr(args, dest)
        if dest == "data_root":
            opts[dest] = resolve_data_root(args.data_root) if "data_root" in given else saved.get("data_root")
        if dest in saved and dest not in UNRECORDED and not _same(opts[dest], saved[dest]):
            changes[dest] = [saved[dest], opts[dest]]
    if saved.get("dataset") != run_dir.parent.name:
        raise UserError(f"--resume: {run_dir} lies in a folder for {run_dir.parent.name} but its config.json trains "
                        f"{saved.get('dataset')}; move it to {run_dir.parent.parent / str(saved.get('dataset'))}")
    if saved.get("name") != run_dir.name:  # a copied or renamed run: it lives, and goes on, in its own folder
        changes["name"] = [saved.get("name"), run_dir.name]
    opts.update(name=run_dir.name, runs_root=str(run_dir.parent.parent), resume=True,
                debug=getattr(args, "debug", False))
    return Namespace(**opts), changes, extras


def resume_record(after_epoch: int, changes: dict) -> dict:
    """One entry of config.json's "resumes": when, from which command, after which epoch, what changed."""
    from utils.runs import git_sha, now

    return {"after_epoch": after_epoch, "changes": changes, "argv": list(sys.argv), "git_sha": git_sha(),
            "date": now()}


def run_state(run_dir: Path) -> str:
    """"finished", "interrupted" (a checkpoint of an unfinished run), "stale" (files but no checkpoint yet) or
    "missing": what reproduce.py (also with --train-only) and scripts/demo.py decide to train, resume or keep by.

    The checkpoint is read like every other (utils.checkpoints.read_run_checkpoint: weights only, of this run); a
    truncated or foreign file, or one without its epoch count, is a utils.checkpoints.CheckpointError (one line)."""
    from utils.checkpoints import CheckpointError, read_run_checkpoint

    checkpoint = Path(run_dir) / "model.pt"
    if checkpoint.exists():
        saved = read_run_checkpoint(run_dir)
        epoch, epochs = saved.get("epoch"), saved["config"].get("epochs")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (epoch, epochs)):
            raise CheckpointError(f"{checkpoint} lacks its epoch count ('epoch' {epoch!r}, config 'epochs' "
                                  f"{epochs!r}): not a train.py checkpoint; move the folder aside to retrain it")
        return "finished" if epoch >= epochs else "interrupted"
    return "stale" if Path(run_dir).exists() and any(Path(run_dir).iterdir()) else "missing"

"""Train one model with one method: `python train.py --dataset digits --method plain --seed 0`.

Every method of the five papers (plain, ceda, acet, oe, ccu, ccus, edl, ...) is one file in `utils/methods/`:
its loss, its flags (one group below per method) and its defaults; this script is the one training loop. Flags
that default to None take the dataset's defaults from `model_params.PARAMS` (or a named `--recipe`), then the
method's (see model_params.py for the order). The run goes to `<runs-root>/<dataset>/<name>/`:
config.json (written before training), model.pt (atomic, every epoch), log.jsonl and tb/ (TensorBoard).
Under `torchrun --nproc_per_node N train.py ...` it trains data-parallel; only rank 0 writes.

`--resume` continues the run in the folder the command names with the configuration saved in its config.json;
only the length of the run and how this process runs it may change (see `utils/resume.py`); a run without a
checkpoint yet (not started, or stopped in its first epoch) is started from scratch with this command's flags.
`--name` is one folder name. Numbers (a batch no larger than the training set included) are
checked before any folder is made; a NaN or infinite loss stops the run (exit 3) and keeps the last good
checkpoint; a user error prints one line and exits 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import secrets
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import data
import model_params
import models
from data.device_loader import DeviceDataset, load_train_set
from utils import amp, checkpoints, cli, training
from utils.cli import AT_LEAST_ONE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, UNIT, UNIT_OPEN_HIGH, Range
from utils.distributed import wrap_ddp
from utils.methods import METHODS, add_method_args, get_method, method_ranges
from utils.resume import has_checkpoint, resume_config, resume_record
from utils.progress import add_progress_flag, wanted
from utils.runs import (append_jsonl, prepare_run_dir, provenance, resolve_data_root, run_folder, trim_log,
                        write_json)

# Flags whose None default means "take model_params.PARAMS[dataset]" (argparse dest -> Params field).
DATASET_DEFAULTS = ("arch", "optimizer", "lr", "epochs", "batch_size", "test_batch_size", "momentum",
                    "weight_decay", "milestones", "gamma", "augment", "out_data", "val_fraction",
                    "spectral_norm_coeff", "mod", "dropout", "normalize", "arch_kwargs")

# Allowed values of the numeric flags, checked before any folder is made (None = unset, allowed).
SEED_RANGE = Range(0, 2**32 - 1, integer=True)  # what numpy's seed takes (torch's and Python's take more)
# The methods' own flags carry their ranges (`utils.methods.method_ranges`).
TRAIN_RANGES = {"seed": SEED_RANGE, "epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "test_batch_size": AT_LEAST_ONE,
                "max_batches": AT_LEAST_ONE, "num_workers": NON_NEGATIVE_INT, "lr": POSITIVE, "momentum": UNIT,
                "weight_decay": NON_NEGATIVE, "milestones": UNIT, "gamma": POSITIVE, "val_fraction": UNIT_OPEN_HIGH,
                "dropout": UNIT_OPEN_HIGH, "spectral_norm_coeff": POSITIVE}
EXIT_DIVERGED = 3


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None,
                   help="in-distribution: a key of data.DATASETS (default: digits; with --resume: the run's)")
    p.add_argument("--method", default="plain", choices=sorted(METHODS))
    p.add_argument("--arch", default=None, choices=sorted(models.MODELS))
    p.add_argument("--recipe", default=None, choices=sorted(model_params.RECIPES), help="named alternative defaults")
    p.add_argument("--seed", type=int, default=0, help=f"random seed, {SEED_RANGE}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $DATA_ROOT or ./datasets)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--name", default=None,
                   help="run folder name, one folder under <runs-root>/<dataset>/ (default: <method>-s<seed>)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the run in <runs-root>/<dataset>/<name> with its saved configuration; only "
                        "--epochs, --max-batches, --test-batch-size, --data-root, --device, --num-workers, "
                        "--progress may change. A run without a checkpoint yet starts from scratch")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--test-batch-size", type=int, default=None)
    p.add_argument("--optimizer", default=None, choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--milestones", type=float, nargs="*", default=None, help="lr drops, as fractions of --epochs")
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--augment", default=None, help="augmentation name (data.AUGMENTATIONS) or 'none'")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out share of the training set")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--normalize", default=None, choices=["none", *model_params.NORMALIZATIONS],
                   help="input normalisation the model carries as its first layer (default: the recipe's)")
    p.add_argument("--spectral-norm-coeff", type=float, default=None)
    p.add_argument("--mod", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--arch-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"widths": [100, 100]}\'')
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers for file-based sets (default: 0 in memory, up to 4 for files)")
    speed = p.add_argument_group("speed (see benchmarks/README.md)")
    speed.add_argument("--amp", default=None, choices=sorted(amp.AMP_DTYPES),
                   help="mixed precision of the training passes (default: bf16 on CUDA where supported, else off)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory format for conv nets")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (falls back to eager with one line when it cannot)")
    speed.add_argument("--device-data", action=argparse.BooleanOptionalAction, default=None,
                   help="hold in-memory sets on --device and augment batches there (default: where it applies)")
    add_progress_flag(p)
    cli.add_debug_flag(p)
    add_method_args(p)  # each method's flags (utils/methods/), one group per method or shared set
    return p


def parser_defaults() -> dict:
    """Every flag's default: a flag whose value differs was given on the command line."""
    return vars(get_args_parser().parse_args([]))


def resolve(args: Namespace) -> Namespace:
    """Fill None flags from the dataset's defaults and add the data shape; the result is saved as config."""
    opts = Namespace(**vars(args))
    opts.dataset = args.dataset or "digits"
    opts.num_classes, shape = data.dataset_info(opts.dataset)
    method = get_method(opts.method)  # a clear error before anything is written
    params = asdict(model_params.get_params(opts.dataset, args.recipe, method.defaults))
    by_dataset = method.dataset_defaults(opts.dataset) if method.dataset_defaults else {}
    # e.g. gan: G/D and its classifier; None keeps the dataset's
    method_defaults = {key: value for key, value in by_dataset.items() if value is not None}
    params.update(method_defaults)
    if args.arch is not None and args.arch != params["arch"]:
        params["arch_kwargs"] = {}  # the dataset's arch options belong to its default architecture
    for key in dict.fromkeys((*DATASET_DEFAULTS, *method_defaults)):
        if getattr(opts, key) is None:
            setattr(opts, key, params[key])
    opts.milestones = list(opts.milestones)
    opts.normalize = model_params.normalization(opts.normalize)  # the numbers go into config.json and the model
    # images (C, H, W) -> in_channels C, input_size H; flat vectors (D,) (moons) -> 1 channel of size D
    opts.in_channels, opts.input_size = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
    if opts.arch == "mlp":
        opts.input_size = math.prod(shape)  # the MLP flattens its input
    elif len(shape) != 3:
        raise ValueError(f"arch {opts.arch!r} takes images (C, H, W) but {opts.dataset} has vectors of shape "
                         f"{tuple(shape)}; use --arch mlp")
    if opts.normalize is not None and len(shape) == 3 and len(opts.normalize[0]) != shape[0]:
        raise ValueError(f"--normalize has {len(opts.normalize[0])} channel(s) but {opts.dataset} images have "
                         f"{shape[0]}; pick a normalisation for {shape[0]}-channel inputs or 'none'")
    opts.data_shape = list(shape)
    opts.name = args.name or f"{args.method}-s{args.seed}"
    run_folder(opts.runs_root, opts.dataset, opts.name)  # one folder name, a runs root that is a folder
    opts.run_id = secrets.token_hex(8)  # names this run in its config.json and every checkpoint (utils.checkpoints)
    opts.data_root = resolve_data_root(args.data_root)
    return opts


def build(opts: Namespace, device: torch.device):
    method = get_method(opts.method)
    model = models.build_model(vars(opts))
    if method.wrap_model is not None:
        model = method.wrap_model(model, opts, init=True)
    model = model.to(device)
    if getattr(opts, "channels_last", False):
        model = amp.to_channels_last(model)
    groups = method.param_groups(model, opts) if method.param_groups else [
        {"params": model.parameters(), "weight_decay": opts.weight_decay}]
    if opts.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=opts.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum)
    return method, model, optimizer, training.multistep_scheduler(optimizer, opts)


def main(args: Namespace) -> Path:
    cli.check_ranges(args, {"seed": SEED_RANGE})  # the default name is made of it
    if args.resume and not has_checkpoint(args):
        print(f"--resume: {args.name or f'{args.method}-s{args.seed}'} has no checkpoint yet (not started, or "
              "stopped in its first epoch): starting it from scratch with this command's flags", flush=True)
        args = Namespace(**{**vars(args), "resume": False})
    if args.resume:
        opts, changes, saved_extras = resume_config(args, parser_defaults(), get_args_parser())
    else:
        opts, changes, saved_extras = resolve(args), {}, {}
    cli.check_ranges(opts, {**TRAIN_RANGES, **method_ranges()})
    opts.amp = getattr(opts, "amp", None) or amp.default_amp(opts.device)  # runs saved before --amp existed: none
    amp.check_amp(opts.amp, opts.device)
    device = training.init_distributed(opts.device)
    rank, _ = training.world()
    run_dir = Path(opts.runs_root) / opts.dataset / opts.name
    training.seed_everything(opts.seed)
    # Adam's second-moment estimates and small gradients underflow into denormal floats, which x86 CPUs
    # process several times slower (a 6x slower LeNet step on MNIST here); flushing them to zero is harmless.
    torch.set_flush_denormal(True)
    # Everything that can fail on a bad configuration or missing data runs before the run folder is made.
    method, model, optimizer, scheduler = build(opts, device)
    aux = method.auxiliary(model, opts) if method.auxiliary is not None else None  # the method's other networks
    precision = amp.Precision(device, getattr(opts, "amp", "off"), getattr(opts, "channels_last", False))
    train_set = load_train_set(opts.dataset, opts.data_root, opts.augment, device, getattr(opts, "device_data", None),
                               download=opts.download, val_fraction=opts.val_fraction, seed=opts.seed)
    check_batch_size(opts.batch_size, len(train_set), opts)
    test_loader = _test_batches(opts, device)
    # built before the run folder: an unreadable NAME=PATH set or one smaller than a batch fails with nothing written
    out_source = training.OutSource(opts, opts.data_root, opts.num_workers, device) if method.uses_out_data else None
    if rank == 0:
        run_dir = prepare_run_dir(opts.runs_root, opts.dataset, opts.name, opts.resume)
    config = {k: v for k, v in vars(opts).items() if k not in ("resume", "progress", "debug")}
    start_epoch = 0
    if opts.resume:
        start_epoch = _restore(run_dir, model, optimizer, scheduler, opts.epochs, aux, precision.scaler)
        if rank == 0 and trim_log(run_dir / "log.jsonl", start_epoch):
            print(f"log.jsonl: dropped the rows after epoch {start_epoch} (logged, then killed before its checkpoint)")
        if rank == 0 and start_epoch < opts.epochs:
            resumes = [*saved_extras.get("resumes", []), resume_record(start_epoch, changes)]
            write_json(run_dir / "config.json", {**config, **saved_extras, "resumes": resumes})
    elif rank == 0:
        write_json(run_dir / "config.json", {**config, "provenance": provenance()})
    if rank == 0:
        print(start_summary(opts, run_dir, start_epoch, changes), flush=True)
    if getattr(opts, "compile", False):
        amp.try_compile(model, precision.prepare_input(_example_batch(train_set, opts.batch_size, device)),
                        precision=precision)
    train_model = wrap_ddp(model, device)  # the loss calls this; evaluation and checkpoints use `model`
    writer = _tensorboard(run_dir) if rank == 0 and start_epoch < opts.epochs else None
    guard = FiniteLossGuard(method.loss)
    method = dataclasses.replace(method, loss=guard)
    for epoch in range(start_epoch, opts.epochs):
        loader = training.epoch_batches(train_set, opts.batch_size, opts.seed, epoch, opts.num_workers)
        if len(loader) == 0:  # a batch larger than this process's share under torchrun: no step, so no save
            raise cli.UserError(f"batch size {opts.batch_size} exceeds each process's share of the {len(train_set)} "
                                f"training samples ({training.world()[1]} processes): nothing would train; use "
                                "a smaller --batch-size (a new run) or fewer processes")
        make_out = out_source.for_epoch(epoch) if out_source is not None else None
        lr = optimizer.param_groups[0]["lr"]  # the lr this epoch trains at (the scheduler steps after it)
        guard.reset()
        opts.epoch = epoch  # the schedules of good / prood (kappa and eps ramps) read it
        with training.EpochTimer() as timer:
            stats = training.train_epoch(train_model, loader, optimizer, method, opts, make_out, device,
                                         opts.max_batches, wanted(opts.progress) and rank == 0, precision,
                                         aux=aux)
        guard.check(epoch + 1, run_dir, lr)
        scheduler.step()
        if aux is not None:
            aux.step_schedulers()
            stats.update(aux.epoch_stats())
        if rank == 0:
            stats.update(training.evaluate_clean(model, test_loader, device))
            stats.update(epoch=epoch + 1, seconds=round(timer.seconds, 3), lr=lr)
            if epoch == start_epoch and opts.resume:
                stats["resumed"] = {"after_epoch": start_epoch, "changes": changes}
            # the row first: a kill between the two leaves a row the resume trims (trim_log), never a
            # finished checkpoint whose last epoch has no row
            _log(run_dir, writer, stats)
            _save(run_dir, model, optimizer, scheduler, config, epoch + 1, aux, precision.scaler)
    if writer is not None:
        writer.close()
    return run_dir


def check_batch_size(batch_size: int, n_train: int, opts: Namespace) -> None:
    """Refuse a batch larger than the training set: incomplete batches are dropped, so it would train nothing."""
    if batch_size > n_train:
        where = (f"run {opts.name}'s config.json has batch_size {batch_size}" if opts.resume
                 else f"--batch-size {batch_size}")
        raise cli.UserError(f"{where} but {opts.dataset} has {n_train} training samples (after the validation "
                            f"split): no batch is complete, so nothing would train; use a batch of "
                            f"at most {n_train}" + (" (start a new run with it)" if opts.resume else ""))


def _test_batches(opts: Namespace, device: torch.device):
    """The test set in order: gathered on the device when it is held in memory, else through a DataLoader."""
    test_set = data.get_dataset(opts.dataset, "test", root=opts.data_root, download=opts.download)
    if getattr(opts, "device_data", None) is not False and isinstance(test_set, data.TensorImageDataset):
        return DeviceDataset(test_set, device).in_order(opts.test_batch_size)
    workers = training.default_workers(test_set) if opts.num_workers is None else opts.num_workers
    return DataLoader(test_set, batch_size=opts.test_batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda")


def _example_batch(train_set, batch_size: int, device: torch.device) -> torch.Tensor:
    """The first `batch_size` training images, un-augmented (what --compile traces)."""
    count = min(batch_size, len(train_set))
    if isinstance(train_set, DeviceDataset):
        return train_set.gather(torch.arange(count), train_set.augment_generator("compile"))[0]
    return torch.stack([train_set[i][0] for i in range(count)]).to(device)


def start_summary(opts: Namespace, run_dir: Path, start_epoch: int, changes: dict) -> str:
    """The settings that matter, on two lines; the full configuration is in config.json."""
    limit = f" (at most {opts.max_batches} batches each)" if opts.max_batches else ""
    out = f", out-data {opts.out_data}" if get_method(opts.method).uses_out_data else ""
    line = (f"{run_dir}: {opts.method} on {opts.dataset}{out}, arch {opts.arch}, {opts.optimizer} lr {opts.lr:g}, "
            f"{opts.epochs} epochs{limit} of batch {opts.batch_size}, seed {opts.seed}, device {opts.device}")
    if opts.resume:
        changed = "; ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items()) or "nothing changed"
        line += f"\nresuming after epoch {start_epoch} ({changed})"
        if start_epoch >= opts.epochs:
            line += f"; it has trained all {opts.epochs} epochs: pass --epochs N to extend it"
    return line + f"\nfull configuration: {run_dir / 'config.json'}"


class TrainingDiverged(cli.UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class FiniteLossGuard:
    """Wraps a method's loss and remembers the first step of the epoch whose loss is NaN or infinite.

    The check stays on the device (no synchronisation per step); `check` reads it once at the end of the
    epoch, before the epoch's weights could be saved."""

    def __init__(self, loss_fn) -> None:
        self.loss_fn = loss_fn
        self.reset()

    def reset(self) -> None:
        self.step, self.first_bad, self.bad_value = 0, None, None

    def __call__(self, model, x, y, x_out, opts):
        loss, logits = self.loss_fn(model, x, y, x_out, opts)
        value = loss.detach().float()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=value.device)
            self.bad_value = torch.zeros((), device=value.device)
        newly_bad = ~torch.isfinite(value) & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, self.step, self.first_bad)
        self.bad_value = torch.where(newly_bad, value, self.bad_value)
        self.step += 1
        return loss, logits

    def check(self, epoch: int, run_dir: Path, lr: float) -> None:
        if self.first_bad is None or int(self.first_bad) < 0:
            return
        checkpoint = run_dir / "model.pt"
        kept = (f"the last good checkpoint {checkpoint} (epoch {epoch - 1}) is kept" if checkpoint.exists()
                else "no checkpoint was written")
        raise TrainingDiverged(f"the training loss became {float(self.bad_value)} at epoch {epoch}, step "
                               f"{int(self.first_bad) + 1}; training stopped and {kept}; try a lower --lr "
                               f"(this epoch trained at {lr:g})")


def _save(run_dir: Path, model, optimizer, scheduler, config: dict, epoch: int, aux=None,
          scaler=None) -> None:
    scaler_state = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
    checkpoints.save_checkpoint(run_dir / "model.pt", {
        "model": model.state_dict(), "config": json.loads(json.dumps(config, default=str)), "epoch": epoch,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": training.rng_state(),
        **(aux.state_dict() if aux is not None else {}), **scaler_state})  # the method's auxiliary networks, beside "model"


def _restore(run_dir: Path, model, optimizer, scheduler, epochs: int, aux=None, scaler=None) -> int:
    """Load the checkpoint of run_dir into model, optimizer, scheduler and the random states; its epoch."""
    from utils.checkpoints import CheckpointError, read_run_checkpoint

    path = run_dir / "model.pt"
    checkpoint = read_run_checkpoint(run_dir)  # refuses a checkpoint of another run (method, arch, dataset, id)
    missing = [key for key in ("optimizer", "scheduler", "rng", "epoch") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it is not a train.py checkpoint that can be resumed")
    done = int(checkpoint["epoch"])
    if epochs < done:
        raise cli.UserError(f"--epochs {epochs} is below the {done} epochs {run_dir} has trained; "
                            f"pass --epochs {done} or more")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} does not match the model of its config.json "
                              f"({str(err).strip().splitlines()[0]})") from None
    scheduler.load_state_dict(checkpoint["scheduler"])
    if aux is not None:
        aux.load_state_dict(checkpoint)
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])  # fp16 loss scale, so a resumed run scales as before
    training.set_rng_state(checkpoint["rng"])
    print(f"resuming {run_dir} after epoch {done}")
    return done


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def _log(run_dir: Path, writer, stats: dict) -> None:
    append_jsonl(run_dir / "log.jsonl", [stats])
    for key, value in stats.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, stats["epoch"])
    writer.flush()
    print(f"epoch {stats['epoch']:3d}  loss {stats['train_loss']:.4f}  train acc {stats['train_acc']:.4f}  "
          f"test acc {stats['test_acc']:.4f}  test MMC {stats['test_mmc']:.4f}  {stats['seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args_parser())

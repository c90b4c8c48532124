"""Train one model with one method: `python train.py --dataset digits --method plain --seed 0`.

Every method of the five papers (plain, ceda, acet, oe, ccu, ccus, edl, ...) is one loss function in
`utils/methods/`; this script is the one training loop. Flags that default to None take the dataset's
defaults from `model_params.PARAMS` (or a named `--recipe`). The run goes to `<runs-root>/<dataset>/<name>/`:
config.json (written before training), model.pt (atomic, every epoch), log.jsonl and tb/ (TensorBoard).
Under `torchrun --nproc_per_node N train.py ...` it trains data-parallel; only rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import math
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import data
import model_params
import models
from utils import training
from utils.methods import METHODS, get_method
from utils.runs import append_jsonl, prepare_run_dir, provenance, resolve_data_root, write_json

# Flags whose None default means "take model_params.PARAMS[dataset]" (argparse dest -> Params field).
DATASET_DEFAULTS = ("arch", "optimizer", "lr", "epochs", "batch_size", "test_batch_size", "momentum",
                    "weight_decay", "milestones", "gamma", "augment", "out_data", "val_fraction",
                    "spectral_norm_coeff", "mod", "dropout", "arch_kwargs")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="in-distribution: a key of data.DATASETS")
    p.add_argument("--method", default="plain", choices=sorted(METHODS))
    p.add_argument("--arch", default=None, choices=sorted(models.MODELS))
    p.add_argument("--recipe", default=None, choices=sorted(model_params.RECIPES), help="named alternative defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $DATA_ROOT or ./datasets)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--name", default=None, help="run folder name (default: <method>-s<seed>)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False)
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
    p.add_argument("--spectral-norm-coeff", type=float, default=None)
    p.add_argument("--mod", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--arch-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"widths": [100, 100]}\'')
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    g = p.add_argument_group("out-distribution and method options")
    g.add_argument("--out-data", default=None, type=data.dataset_arg,
                   help="training out-distribution: a data key, or NAME=PATH (an image folder or a .npz of uint8 images)")
    g.add_argument("--out-frac", type=float, default=1.0, help="out batch size relative to the clean batch")
    g.add_argument("--out-loss", default="max_conf", choices=["max_conf", "uniform_conf"])
    g.add_argument("--attack-eps", type=float, default=0.3)
    g.add_argument("--attack-steps", type=int, default=40)
    g.add_argument("--attack-step-size", type=float, default=None, help="default: eps / steps")
    g.add_argument("--attack-norm", default="linf", choices=["linf", "l2"])
    g.add_argument("--attack-random-start", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--oe-lambda", type=float, default=0.5)
    g.add_argument("--edl-variance", default="ccu", choices=["ccu", "paper"],
                   help="EDL variance term p(1-p)/S as CCU's code, or /(S+1) as the EDL paper")
    g.add_argument("--gmm", default=None, help="gen_gmm.py run folder (ccu, ccus)")
    g.add_argument("--gmm-lr", type=float, default=1e-5)
    g.add_argument("--loglam", type=float, default=0.0)
    return p


def resolve(args: Namespace) -> Namespace:
    """Fill None flags from the dataset's defaults and add the data shape; the result is saved as config."""
    opts = Namespace(**vars(args))
    opts.num_classes, shape = data.dataset_info(args.dataset)
    params = asdict(model_params.get_params(args.dataset, args.recipe))
    if args.arch is not None and args.arch != params["arch"]:
        params["arch_kwargs"] = {}  # the dataset's arch options belong to its default architecture
    for key in DATASET_DEFAULTS:
        if getattr(opts, key) is None:
            setattr(opts, key, params[key])
    opts.milestones = list(opts.milestones)
    # images (C, H, W) -> in_channels C, input_size H; flat vectors (D,) (moons) -> 1 channel of size D
    opts.in_channels, opts.input_size = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
    if opts.arch == "mlp":
        opts.input_size = math.prod(shape)  # the MLP flattens its input
    elif len(shape) != 3:
        raise ValueError(f"arch {opts.arch!r} takes images (C, H, W) but {args.dataset} has vectors of shape "
                         f"{tuple(shape)}; use --arch mlp")
    opts.data_shape = list(shape)
    opts.name = args.name or f"{args.method}-s{args.seed}"
    opts.data_root = resolve_data_root(args.data_root)
    get_method(opts.method)  # a clear error before anything is written
    if args.resume:
        opts = _saved_config(opts)
    return opts


# Flags that may change when a run is resumed; everything else comes from the run's saved config.
RESUME_OVERRIDES = ("resume", "epochs", "max_batches", "device", "num_workers", "progress", "data_root", "download")


def _saved_config(opts: Namespace) -> Namespace:
    path = Path(opts.runs_root) / opts.dataset / opts.name / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"--resume: no config at {path}; start the run without --resume")
    saved = json.loads(path.read_text())
    saved.pop("provenance", None)
    saved.update({key: getattr(opts, key) for key in RESUME_OVERRIDES})
    saved["runs_root"] = opts.runs_root
    return Namespace(**saved)


def build(opts: Namespace, device: torch.device):
    method = get_method(opts.method)
    model = models.build_model(vars(opts))
    if method.wrap_model is not None:
        model = method.wrap_model(model, opts, init=True)
    model = model.to(device)
    groups = method.param_groups(model, opts) if method.param_groups else [
        {"params": model.parameters(), "weight_decay": opts.weight_decay}]
    if opts.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=opts.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum)
    milestones = sorted({max(1, round(f * opts.epochs)) for f in opts.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=opts.gamma)
    return method, model, optimizer, scheduler


def main(args: Namespace) -> Path:
    opts = resolve(args)
    device = training.init_distributed(opts.device)
    rank, _ = training.world()
    run_dir = Path(opts.runs_root) / opts.dataset / opts.name
    training.seed_everything(opts.seed)
    # Adam's second-moment estimates and small gradients underflow into denormal floats, which x86 CPUs
    # process several times slower (a 6x slower LeNet step on MNIST here); flushing them to zero is harmless.
    torch.set_flush_denormal(True)
    method, model, optimizer, scheduler = build(opts, device)  # before any file is written: bad configs fail here
    # built before the run folder: an unreadable NAME=PATH set or one smaller than a batch fails with nothing written
    out_source = training.OutSource(opts, opts.data_root, opts.num_workers) if method.uses_out_data else None
    if rank == 0:
        run_dir = prepare_run_dir(opts.runs_root, opts.dataset, opts.name, opts.resume)
    train_set = data.get_dataset(opts.dataset, "train", root=opts.data_root, augment=opts.augment,
                                 download=opts.download, val_fraction=opts.val_fraction, seed=opts.seed)
    test_set = data.get_dataset(opts.dataset, "test", root=opts.data_root, download=opts.download)
    test_loader = DataLoader(test_set, batch_size=opts.test_batch_size, num_workers=opts.num_workers)
    config = {k: v for k, v in vars(opts).items() if k not in ("resume", "progress")}
    start_epoch = 0
    if opts.resume:
        start_epoch = _restore(run_dir, model, optimizer, scheduler)
    elif rank == 0:
        write_json(run_dir / "config.json", {**config, "provenance": provenance()})
    if rank == 0:
        print(f"{run_dir}: " + json.dumps(config, sort_keys=True, default=str), flush=True)
    writer = _tensorboard(run_dir) if rank == 0 else None
    for epoch in range(start_epoch, opts.epochs):
        loader = training.train_loader(train_set, opts.batch_size, opts.seed, epoch, opts.num_workers)
        make_out = out_source.for_epoch(epoch) if out_source is not None else None
        with training.EpochTimer() as timer:
            stats = training.train_epoch(model, loader, optimizer, method, opts, make_out, device,
                                         opts.max_batches, opts.progress and rank == 0)
        scheduler.step()
        if rank == 0:
            stats.update(training.evaluate_clean(model, test_loader, device))
            stats.update(epoch=epoch + 1, seconds=round(timer.seconds, 3), lr=optimizer.param_groups[0]["lr"])
            _save(run_dir, model, optimizer, scheduler, config, epoch + 1)
            _log(run_dir, writer, stats)
    if writer is not None:
        writer.close()
    return run_dir


def _save(run_dir: Path, model, optimizer, scheduler, config: dict, epoch: int) -> None:
    models.save_checkpoint(run_dir / "model.pt", {
        "model": model.state_dict(), "config": json.loads(json.dumps(config, default=str)), "epoch": epoch,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": training.rng_state()})


def _restore(run_dir: Path, model, optimizer, scheduler) -> int:
    checkpoint = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    training.set_rng_state(checkpoint["rng"])
    print(f"resuming {run_dir} after epoch {checkpoint['epoch']}")
    return int(checkpoint["epoch"])


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def _log(run_dir: Path, writer, stats: dict) -> None:
    append_jsonl(run_dir / "log.jsonl", [stats])
    for key, value in stats.items():
        if key != "epoch":
            writer.add_scalar(key, value, stats["epoch"])
    writer.flush()
    print(f"epoch {stats['epoch']:3d}  loss {stats['train_loss']:.4f}  train acc {stats['train_acc']:.4f}  "
          f"test acc {stats['test_acc']:.4f}  test MMC {stats['test_mmc']:.4f}  {stats['seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

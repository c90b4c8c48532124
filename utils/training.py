"""The one training loop shared by every method, and the pieces it is made of.

Distributed training (`torchrun`): every process trains on its shard of each epoch (DistributedSampler) and the
model is wrapped in DistributedDataParallel (`utils.distributed.wrap_ddp`), whose bucketed all-reduce overlaps
the backward pass. DDP's reducer expects exactly one backward per forward of the wrapped model, so every loss
makes one forward pass of it per step (clean and out batches concatenated), and the attacks and extra passes
that need only input gradients (ACET's PGD) run on the unwrapped module (`utils.attacks.pgd_maximize`).

Batches come from the device-side path (`data.device_loader`) for in-memory sets and from a DataLoader
otherwise; either way an epoch's order is a function of (seed, epoch). `Precision` (utils/amp.py) adds
autocast, fp16 loss scaling and channels-last inputs to each step.
"""
from __future__ import annotations

import os
import random
import time
from argparse import Namespace
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

import data
from data.base import TensorImageDataset
from data.device_loader import DeviceDataset, EpochBatches
from utils.amp import Precision
from utils.distributed import unwrap
from utils.progress import bar


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> torch.device:
    """Join the process group when launched by torchrun; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device.startswith("cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All random states a resumed run needs to continue exactly as an uninterrupted one (tensors only, so the
    checkpoint stays loadable with weights_only=True)."""
    _, np_keys, np_pos, *_ = np.random.get_state()
    _, py_words, _ = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": torch.tensor(np_keys.astype(np.int64)),
             "numpy_pos": int(np_pos), "python": torch.tensor(py_words, dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"])))
    random.setstate((3, tuple(int(w) for w in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def multistep_scheduler(optimizer: torch.optim.Optimizer, opts) -> torch.optim.lr_scheduler.MultiStepLR:
    """x`opts.gamma` at the epochs `opts.milestones` name as fractions of `opts.epochs` (1-indexed: the lr drops
    before that epoch trains); train.py's classifier and a method's auxiliary networks share it."""
    milestones = sorted({max(1, round(f * opts.epochs)) for f in opts.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=opts.gamma)


def default_workers(dataset: Dataset) -> int:
    """`--num-workers` None: no workers for in-memory sets (nothing to decode), up to 4 for file-based sets."""
    return 0 if isinstance(dataset, (TensorImageDataset, _Indices)) else min(4, os.cpu_count() or 1)


def train_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int,
                 num_workers: Optional[int]) -> DataLoader:
    """A loader whose order (and worker seeds) depend only on (seed, epoch), so a resumed run sees the same data.
    Batches are pinned when CUDA is present, so their copy to the GPU can overlap compute."""
    num_workers = default_workers(dataset) if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    rank, size = world()
    if size > 1:
        sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      generator=generator, persistent_workers=False,
                      pin_memory=torch.cuda.is_available() and not isinstance(dataset, _Indices))


class _Indices(Dataset):
    """Item i is i: drawing these through `train_loader` gives the per-sample path's exact order of indices."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def epoch_batches(dataset: Dataset | DeviceDataset, batch_size: int, seed: int, epoch: int,
                  num_workers: Optional[int]):
    """The training batches of one epoch: a DeviceDataset's batches gathered on its device in the order the
    per-sample loader would use (same sampler, same generator), augmented from a (seed, epoch, rank) generator;
    any other dataset through `train_loader`."""
    if not isinstance(dataset, DeviceDataset):
        return train_loader(dataset, batch_size, seed, epoch, num_workers)
    order = train_loader(_Indices(len(dataset)), batch_size, seed, epoch, 0)
    return EpochBatches(dataset, order, dataset.augment_generator(seed, epoch, world()[0]))


class OutSource:
    """Out-distribution batches for methods that train on them (ceda, acet, oe, ccu).

    `for_epoch(epoch)` returns a function mapping a clean batch x to round(out_frac * len(x)) out samples.
    ACET's noise and uniform noise are drawn fresh from the clean batch on its device at every step
    (docs/methods.md#noise-families); any other `--out-data` key is read from that dataset in an order fixed by (seed,
    epoch), so a resumed run draws the same out batches as an uninterrupted one.
    """

    def __init__(self, opts: Namespace, data_root: str, num_workers: Optional[int],
                 device: Optional[torch.device] = None) -> None:
        self.opts, self.num_workers = opts, num_workers
        self.dataset = None
        if opts.out_data not in ("acet_noise", "uniform"):
            self.dataset = data.get_dataset(opts.out_data, "train", root=data_root, like=opts.dataset,
                                            seed=opts.seed)
            batch = max(1, round(opts.out_frac * opts.batch_size))
            if len(self.dataset) < batch:  # the loader drops incomplete batches: it would yield nothing, forever
                raise ValueError(f"--out-data {opts.out_data} has {len(self.dataset)} samples, fewer than one out "
                                 f"batch ({batch}); add samples or lower --batch-size / --out-frac")
            if device is not None and isinstance(self.dataset, TensorImageDataset) and self.dataset.transform is None:
                self.dataset = DeviceDataset(self.dataset, device)  # same batches, gathered on the device

    def _n_out(self, x: torch.Tensor) -> int:
        return max(1, round(self.opts.out_frac * len(x)))

    def for_epoch(self, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.opts.out_data == "acet_noise":
            return lambda x: data.acet_noise_batch(x[: self._n_out(x)])
        if self.opts.out_data == "uniform":
            return lambda x: torch.rand_like(x[: self._n_out(x)])
        batches = self._cycle(epoch)
        return lambda x: next(batches)[0][: self._n_out(x)].to(x.device, non_blocking=True)

    def _cycle(self, epoch: int) -> Iterator:
        batch = max(1, round(self.opts.out_frac * self.opts.batch_size))
        lap = 0
        while True:
            yield from epoch_batches(self.dataset, batch, self.opts.seed + 7, epoch * 1000 + lap, self.num_workers)
            lap += 1


def average_gradients(model: nn.Module) -> None:
    """All-reduce the mean gradient of a network that is not DDP-wrapped (a method's auxiliary networks, whose
    steps run several forwards before one backward) over processes, in one flat buffer."""
    _, size = world()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, method, opts: Namespace,
                make_out: Optional[Callable], device: torch.device, max_batches: Optional[int],
                show_progress: bool, precision: Optional[Precision] = None, aux=None) -> dict[str, float]:
    """One pass over the loader; returns mean loss and accuracy on the clean batches.

    `model` is the network the loss calls (DDP-wrapped under torchrun); `precision` (default: fp32, contiguous)
    sets autocast, fp16 loss scaling and channels-last inputs. A method's auxiliary networks (`aux`, see
    `utils.methods.base.Auxiliary`) take their step first, in full precision, and may supply x_out."""
    precision = precision or Precision(device)
    model.train()
    total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    n_batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    for step, (x, y) in enumerate(bar(loader, show_progress, total=n_batches, leave=False,
                                       desc="train")):
        if step == n_batches:
            break
        x, y = precision.prepare_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        x_out = make_out(x) if make_out is not None else None
        opts.epoch_progress = step / n_batches  # ProoD's eps/kappa ramps move at every step (methods/certified.py)
        if aux is not None:
            x_out = method.aux_step(unwrap(model), aux, x, y, x_out, opts)  # its passes stay off DDP's reducer
        with precision.autocast():  # the loss and everything it runs (ACET's attack) at the --amp precision
            loss, logits = method.loss(model, x, y, x_out, opts)
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer)
        if method.after_step is not None:
            method.after_step(model, opts)
        total_loss += loss.detach() * len(x)
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen += len(x)
    return {"train_loss": float(total_loss) / max(seen, 1), "train_acc": float(correct) / max(seen, 1)}


@torch.no_grad()
def evaluate_clean(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Test accuracy and mean max-softmax confidence (MMC) of the in-distribution test set."""
    model.eval()
    correct, conf_sum, seen = 0.0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        probs = model(x).softmax(dim=1)
        conf, pred = probs.max(dim=1)
        correct += float((pred == y).sum())
        conf_sum += float(conf.sum())
        seen += len(x)
    return {"test_acc": correct / max(seen, 1), "test_mmc": conf_sum / max(seen, 1)}


class EpochTimer:
    def __enter__(self) -> "EpochTimer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start

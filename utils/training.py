"""The one training loop shared by every method, and the pieces it is made of.

Distributed training (`torchrun`): every process trains on its shard of each epoch (DistributedSampler) and
gradients are averaged with one all-reduce per step. We average gradients by hand instead of wrapping the
model in DistributedDataParallel because several methods (ACET, CCU's attacks) run extra forward/backward
passes on the input inside the loss; DDP's reducer expects exactly one backward per forward and fails there.
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
from tqdm import tqdm

import data


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


def train_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int) -> DataLoader:
    """A loader whose order (and worker seeds) depend only on (seed, epoch), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    rank, size = world()
    if size > 1:
        sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      generator=generator, persistent_workers=False)


class OutSource:
    """Out-distribution batches for methods that train on them (ceda, acet, oe, ccu).

    `for_epoch(epoch)` returns a function mapping a clean batch x to round(out_frac * len(x)) out samples.
    ACET's noise and uniform noise are drawn fresh from the clean batch on its device at every step
    (SPEC 2.2); any other `--out-data` key is read from that dataset in an order fixed by (seed, epoch), so a
    resumed run draws the same out batches as an uninterrupted one.
    """

    def __init__(self, opts: Namespace, data_root: str, num_workers: int) -> None:
        self.opts, self.num_workers = opts, num_workers
        self.dataset = None
        if opts.out_data not in ("acet_noise", "uniform"):
            self.dataset = data.get_dataset(opts.out_data, "train", root=data_root, like=opts.dataset,
                                            seed=opts.seed)
            batch = max(1, round(opts.out_frac * opts.batch_size))
            if len(self.dataset) < batch:  # the loader drops incomplete batches: it would yield nothing, forever
                raise ValueError(f"--out-data {opts.out_data} has {len(self.dataset)} samples, fewer than one out "
                                 f"batch ({batch}); add samples or lower --batch-size / --out-frac")

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
            yield from train_loader(self.dataset, batch, self.opts.seed + 7, epoch * 1000 + lap, self.num_workers)
            lap += 1


def average_gradients(model: nn.Module) -> None:
    """All-reduce the mean gradient over processes in one flat buffer (see the module docstring)."""
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
                show_progress: bool) -> dict[str, float]:
    """One pass over the loader; returns mean loss and accuracy on the clean batches."""
    model.train()
    total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    n_batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    for step, (x, y) in enumerate(tqdm(loader, total=n_batches, disable=not show_progress, leave=False,
                                       desc="train")):
        if step == n_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_out = make_out(x) if make_out is not None else None
        loss, logits = method.loss(model, x, y, x_out, opts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model)
        optimizer.step()
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

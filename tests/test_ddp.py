"""Real DistributedDataParallel: one training step on 2 CPU processes (gloo), each holding half of a batch, gives
the parameters of the single-process step on the whole batch, for every kind of loss (clean only; clean and out
concatenated; ACET's attack on the unwrapped module inside the loss; CCU's densities through the wrapper)."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import models
import test_ccu
from utils import training
from utils.distributed import unwrap, wrap_ddp
from utils.methods import METHODS
from utils.methods.ccu import clamp_out_variances

WORLD, BATCH = 2, 16
CASES = ["plain", "ceda", "oe", "acet", "ccu"]
OPTS = Namespace(out_loss="max_conf", attack_eps=0.3, attack_steps=3, attack_step_size=None, attack_norm="linf",
                 attack_random_start=False, oe_lambda=0.5)  # no random start: the attack is a function of z


def _model_and_batch(name: str):
    torch.manual_seed(0)
    if name == "ccu":
        model, shape = test_ccu.make_ccu(seed=0), test_ccu.SHAPE
        clamp_out_variances(model)
    else:
        model, shape = models.MODELS["lenet"](num_classes=10, in_channels=1, input_size=8), (1, 8, 8)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, *shape, generator=gen)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    x_out = torch.rand(BATCH, *shape, generator=gen)
    return model, x, y, x_out


def one_step(name: str, rank: int, world: int) -> dict:
    """One step of utils.training.train_epoch on this rank's share of the batch; the unwrapped state_dict."""
    model, x, y, x_out = _model_and_batch(name)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    train_model = wrap_ddp(model, torch.device("cpu"))
    assert isinstance(train_model, DistributedDataParallel) == (world > 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    method = METHODS[name]
    make_out = (lambda _: x_out[share]) if method.uses_out_data else None
    training.train_epoch(train_model, [(x[share], y[share])], optimizer, method, OPTS, make_out,
                         torch.device("cpu"), None, False)
    return {key: value.clone() for key, value in unwrap(train_model).state_dict().items()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in CASES:
            state = one_step(name, rank, world)
            if rank == 0:
                torch.save(state, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_step_on_two_processes_equals_the_single_process_step(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for name in CASES:
        single = one_step(name, 0, 1)
        distributed = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        start = _model_and_batch(name)[0].state_dict()
        moved = max(float((single[k] - start[k]).abs().max()) for k in single)
        assert moved > 1e-3, name  # the step did change the parameters
        for key in single:
            assert torch.allclose(distributed[key], single[key], atol=1e-6, rtol=0), (name, key)

"""A worker for tests/test_gan.py that torch.multiprocessing spawns: kept apart so the children import only torch
and utils.methods.base, not the whole test module."""
import torch
from torch import nn

from utils.methods.base import Auxiliary


def update_on_rank(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    """One Auxiliary.update on this rank's half of a batch inside a gloo group; saves the stepped weights."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    aux = Auxiliary({"net": net}, {"net": torch.optim.SGD(net.parameters(), lr=1.0)})
    x = torch.arange(24, dtype=torch.float32).view(8, 3) / 10
    aux.update("net", net(x[rank * 4:(rank + 1) * 4]).square().sum() / 4)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, f"{out_file}.{rank}")
    dist.destroy_process_group()


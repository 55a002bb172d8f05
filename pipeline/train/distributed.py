"""One model on several devices: torchrun + DistributedDataParallel over the device-resident loop.

Every rank holds the whole split on its own device and draws the same seeded permutation, so
all ranks agree on each global batch without communication; a rank trains on its share of that
batch (padded to a multiple of the world size, as `DistributedSampler` pads the epoch). DDP
averages the gradients, so the global batch size and the learning rate are what params say.
Augmentation is drawn for the whole global batch on every rank before sharding: the random
stream, and so the experiment, is the same as in one process. Rank 0 alone logs and writes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(devices: int, module: str, argv: list[str]) -> list[str]:
    """The command that runs `python -m <module> <argv>` as `devices` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            "-m", module, *argv]


def init() -> tuple[World, torch.device | None]:
    """Join the process group torchrun set up; (SINGLE, None) outside torchrun.

    The device is this rank's GPU (LOCAL_RANK) with NCCL, or the CPU with gloo.
    """
    if not under_torchrun():
        return SINGLE, None
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return world, device


def teardown(world: World) -> None:
    """Every rank reaches the barrier before the group goes away (no rank exits mid-collective)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(n: int, world: World, device: torch.device) -> torch.Tensor:
    """Positions in a global batch of n items that this rank trains on."""
    positions = torch.arange(n, device=device)
    if world.size == 1:
        return positions
    pad = (-n) % world.size
    if pad:   # repeat from the start, as DistributedSampler does, so every rank has as many items
        # (as often as needed: a batch smaller than the padding is repeated more than once)
        positions = torch.cat([positions, positions.repeat(-(-pad // n))[:pad]])
    return positions[world.rank::world.size]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch of all ranks, on any device.

    torch.nn.SyncBatchNorm (used on CUDA) runs only on GPUs; this is the same computation on the
    CPU with gloo, so CPU runs (and tests) train as one process would. Its all_reduce runs in a
    process group of its own: in the backward pass it would otherwise interleave with DDP's
    asynchronous gradient all_reduce on the default group, in an order that differs by rank.
    """

    group = None   # set by `wrap`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
        stats = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]), self.group)
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels:2 * channels] / total - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * total / (total - 1), self.momentum)
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]


def _convert_batch_norm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossProcessBatchNorm2d):
        new = CrossProcessBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_batch_norm(child))
    return module


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP with BatchNorm synchronised across ranks; the model itself when there is one process."""
    if world.size == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    CrossProcessBatchNorm2d.group = dist.new_group(backend="gloo")
    return nn.parallel.DistributedDataParallel(_convert_batch_norm(model))

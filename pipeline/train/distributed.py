"""One model on several devices: torchrun + DistributedDataParallel over the device-resident loop.

Every rank holds the whole split on its own device and draws the same seeded permutation, so
all ranks agree on each global batch without communication; a rank trains on its share of that
batch (padded to a multiple of the world size, as `DistributedSampler` pads the epoch). DDP
averages the gradients, so the global batch size and the learning rate are what params say.
Augmentation is drawn for the whole global batch on every rank before sharding: the random
stream, and so the experiment, is the same as in one process. Rank 0 alone logs and writes.

Two launchers, chosen from the environment by `torchrun_command`:
- one machine (`python -m pipeline.train.distributed N module ...`): N local processes around a
  rendezvous store bound to 127.0.0.1 only (torchrun's stores listen on every interface);
- a Slurm job of several tasks (SLURM_NTASKS > 1): `srun` starts one `torchrun` per task, each a
  "node" of a c10d rendezvous on the first node of the allocation, N processes per node.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import StageError


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
    """The command that runs `python -m <module> <argv>` as `devices` processes per machine.

    Inside a Slurm job of several tasks, every task is one node of the run (see `slurm_command`);
    anywhere else, the loopback-only launcher of this module.
    """
    if int(os.environ.get("SLURM_NTASKS") or 1) > 1:
        return slurm_command(devices, module, argv)
    return [sys.executable, "-m", "pipeline.train.distributed", str(devices), module, *argv]


def slurm_command(devices: int, module: str, argv: list[str]) -> list[str]:
    """srun: one torchrun per Slurm task, joined by a c10d rendezvous on the job's first node.

    `devices` is the number of processes in all (as on one machine), devices / tasks per node.
    The stage runs in the batch step, on the first node: the port is a free one there. The node
    list, the task count and the job id (the rendezvous id) are Slurm's.
    """
    nodes = int(os.environ["SLURM_NTASKS"])
    if devices % nodes:
        raise StageError(f"cnn devices={devices} processes cannot be split evenly over this job's {nodes} Slurm "
                         f"tasks (nodes); set `-S cnn.defaults.devices=` to a multiple of {nodes}")
    first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()[0]
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    srun = shutil.which("srun")
    if srun is None:
        raise StageError("SLURM_NTASKS is set but srun is not on PATH: run inside the Slurm job's environment")
    return [srun, f"--ntasks={nodes}", "--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={nodes}", f"--nproc-per-node={devices // nodes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={first}:{port}", f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'pipeline')}",
            "-m", module, *argv]


def launch_local(devices: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as `devices` ranks on this machine; the exit code of the run.

    The rendezvous store is torch's TCPStore on a socket bound to 127.0.0.1 (the ranks join it as
    torchrun's workers join torchrun's store); gloo and NCCL use the loopback interface too. A
    rank that fails, or SIGTERM/SIGINT to this process, ends every rank.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, devices + 1, True, datetime.timedelta(minutes=30),
                          wait_for_workers=False, master_listen_fd=listener.fileno())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(devices),
           "LOCAL_WORLD_SIZE": str(devices), "GROUP_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "TORCHELASTIC_RESTART_COUNT": "0", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    env.setdefault("OMP_NUM_THREADS", "1")   # as torchrun: N ranks must not each take every core
    ranks = [subprocess.Popen([sys.executable, "-m", module, *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(devices)]
    stop = []

    def forward(signum, _frame):
        stop.append(signum)
        for rank in ranks:
            if rank.poll() is None:
                rank.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    first_failure = None   # the code of the rank that failed first (the others are ended because of it)
    while None in (codes := [rank.poll() for rank in ranks]):   # every rank polled, not the first running one
        failed = [code for code in codes if code not in (None, 0)]
        if failed:   # one failed: the others would hang
            first_failure = failed[0] if first_failure is None else first_failure
            for rank, code in zip(ranks, codes):
                if code is None:
                    rank.terminate()
        time.sleep(0.2)
    del store
    if stop:
        return 128 + stop[0]
    code = first_failure if first_failure is not None else next((c for c in codes if c != 0), 0)
    return code if code >= 0 else 128 - code   # killed by a signal: 128+N


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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m pipeline.train.distributed DEVICES MODULE [ARGS...]")
    sys.exit(launch_local(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))

"""Claims about one model on several processes, checked in this process.

The shard of a global batch is DistributedSampler's; the torchrun command and environment are
read as torchrun writes them; CrossProcessBatchNorm2d computes torch's BatchNorm2d (outputs,
running statistics, gradients), run here in a real one-rank gloo group, and over "two ranks"
when a spy all_reduce doubles every sum (as a second rank with the same batch would)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from pipeline.train import distributed
from pipeline.train.distributed import CrossProcessBatchNorm2d, World

CPU = torch.device("cpu")


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    previous = CrossProcessBatchNorm2d.group
    try:
        yield
    finally:
        CrossProcessBatchNorm2d.group = previous
        if dist.is_initialized():
            dist.destroy_process_group()


def test_world_defaults_to_one_main_process():
    assert distributed.SINGLE == World() == World(0, 1, 0)
    assert World().rank == 0 and World().size == 1 and World().local_rank == 0
    assert World().is_main and World(0, 4, 2).is_main
    assert not World(1, 2, 1).is_main and not World(3, 4, 0).is_main


@pytest.mark.parametrize("n,size", [(5, 2), (8, 4), (7, 3), (2, 4), (1, 3), (1, 4), (2, 5), (3, 8), (10, 5), (9, 4)])
def test_each_rank_gets_distributedsamplers_positions(n, size):
    got = [distributed.shard(n, World(rank, size, rank), CPU).tolist() for rank in range(size)]
    want = [list(DistributedSampler(range(n), num_replicas=size, rank=rank, shuffle=False)) for rank in range(size)]
    assert got == want
    assert len({len(g) for g in got}) == 1 and sorted(set(sum(got, []))) == list(range(n))


def test_one_process_trains_on_every_position_made_on_the_given_device(monkeypatch):
    assert distributed.shard(5, World(), CPU).tolist() == [0, 1, 2, 3, 4]
    assert distributed.shard(4, World(1, 2, 1), CPU).dtype == torch.int64
    devices, arange = [], torch.arange
    monkeypatch.setattr(torch, "arange", lambda *a, **k: (devices.append(k.get("device")), arange(*a, **k))[1])
    marker = torch.device("cpu", 0)
    distributed.shard(5, World(), marker), distributed.shard(5, World(1, 2, 1), marker)
    assert devices == [marker, marker]


def test_under_torchrun_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.under_torchrun() is False
    for value, expected in (("1", False), ("2", True), ("8", True), ("0", False)):
        monkeypatch.setenv("WORLD_SIZE", value)
        assert distributed.under_torchrun() is expected


def test_torchrun_command_runs_the_module_on_n_processes_with_this_python(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert distributed.torchrun_command(3, "stages.cnn", ["resnet18", "--x"]) == [
        sys.executable, "-m", "pipeline.train.distributed", "3", "stages.cnn", "resnet18", "--x"]
    monkeypatch.setenv("SLURM_NTASKS", "1")   # one Slurm task: still one machine
    assert distributed.torchrun_command(3, "stages.cnn", [])[2] == "pipeline.train.distributed"


def test_in_a_slurm_job_of_several_tasks_each_task_is_one_torchrun_node(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    calls = []

    def scontrol(cmd, **kw):
        calls.append(cmd)
        assert kw == {"capture_output": True, "text": True, "check": True}   # its output read as text; fails loudly
        return subprocess.CompletedProcess(cmd, 0, stdout="gpu07\ngpu08\n")

    monkeypatch.setattr(subprocess, "run", scontrol)
    monkeypatch.setattr(distributed.shutil, "which", lambda name: f"/usr/bin/{name}")
    command = distributed.torchrun_command(8, "stages.cnn", ["resnet18"])   # 8 processes in all
    assert calls == [["scontrol", "show", "hostnames", "gpu[07-08]"]]
    endpoint = next(a for a in command if a.startswith("--rdzv-endpoint="))
    host, port = endpoint.split("=")[1].split(":")
    assert host == "gpu07" and 1024 <= int(port) < 65536   # a free port the kernel gave, not a fixed one
    assert command == ["/usr/bin/srun", "--ntasks=2", "--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run",
                       "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", endpoint, "--rdzv-id=4242",
                       "-m", "stages.cnn", "resnet18"]
    with pytest.raises(distributed.StageError, match="multiple of 2"):
        distributed.torchrun_command(3, "stages.cnn", ["resnet18"])
    monkeypatch.delenv("SLURM_JOB_ID")   # outside a job id (srun by hand): a fixed rendezvous id
    assert "--rdzv-id=pipeline" in distributed.torchrun_command(2, "stages.cnn", [])


def test_init_outside_torchrun_is_one_process_without_a_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    assert distributed.init() == (distributed.SINGLE, None) and calls == []


@pytest.mark.parametrize("cuda", [False, True])
def test_init_under_torchrun_joins_the_group_on_its_device(monkeypatch, cuda):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls, devices = [], []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    world, device = distributed.init()
    assert world == World(rank=3, size=4, local_rank=1)
    if cuda:
        assert device == torch.device("cuda", 1) and devices == [device]
        assert calls == [(("nccl",), {"device_id": device})]
    else:
        assert device == CPU and devices == [] and calls == [(("gloo",), {})]


def test_teardown_leaves_one_process_alone_and_ends_a_group(one_rank_group, monkeypatch):
    distributed.teardown(World())
    assert dist.is_initialized()
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k)))
    distributed.teardown(World(0, 2, 0))
    assert barriers == [1] and not dist.is_initialized()
    distributed.teardown(World(0, 2, 0))   # no group (any more): nothing to do
    assert barriers == [1]


def _pair(channels=3, momentum=0.1, **kw):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(channels, momentum=momentum, **kw)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
        plain.running_mean.uniform_(-1, 1)
        plain.running_var.uniform_(0.5, 2)
    cross = CrossProcessBatchNorm2d(channels, momentum=momentum, **kw)
    cross.load_state_dict(plain.state_dict())
    return plain, cross


def _close(a, b, rtol=1e-5, atol=1e-6):
    assert a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=rtol, atol=atol), (a, b)


def _compare(plain, cross, x, copies=1):
    """Forward and backward of a fixed weighted sum. `plain` sees `copies` copies of this rank's
    batch `x` (the global batch), `cross` sees `x`: the same outputs, statistics and input
    gradients; the parameter gradients are this rank's share (DDP sums them over the ranks)."""
    xp = torch.cat([x] * copies).requires_grad_()
    xc = x.clone().requires_grad_()
    out_p, out_c = plain(xp), cross(xc)
    n = len(x)
    _close(out_c, out_p[:n], rtol=1e-5, atol=1e-5)
    weights = torch.linspace(-1, 2, out_c.numel()).reshape(out_c.shape)
    (out_p * torch.cat([weights] * copies)).sum().backward()
    (out_c * weights).sum().backward()
    _close(xc.grad, xp.grad[:n], rtol=1e-4, atol=1e-5)
    _close(cross.weight.grad * copies, plain.weight.grad, rtol=1e-4, atol=1e-5)
    _close(cross.bias.grad * copies, plain.bias.grad, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _close(getattr(cross, name), getattr(plain, name), rtol=1e-5, atol=1e-6)
    plain.zero_grad(), cross.zero_grad()


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_cross_process_batch_norm_in_a_one_rank_group_is_batch_norm(one_rank_group, momentum):
    plain, cross = _pair(momentum=momentum)
    CrossProcessBatchNorm2d.group = dist.new_group(backend="gloo")
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 + 1
    for _ in range(2):   # twice: the running statistics move twice
        _compare(plain, cross, x)
        x = x * 0.5 - 0.3
    assert int(cross.num_batches_tracked) == 2
    # Evaluation: the running statistics, no update.
    plain.eval(), cross.eval()
    before = cross.running_mean.clone()
    _close(cross(x), plain(x))
    assert torch.equal(cross.running_mean, before) and int(cross.num_batches_tracked) == 2


def test_cross_process_batch_norm_reduces_over_the_global_batch_of_every_rank(one_rank_group, monkeypatch):
    """A spy all_reduce that doubles each tensor is what a second rank holding the same batch adds:
    the result must be torch's BatchNorm over both ranks' batches (this rank's rows), the gradient
    of the input the sum of both ranks' gradients, and the reductions in the layer's own group."""
    group = object()
    seen = []

    def all_reduce(tensor, group=None, **kw):
        seen.append(group)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    CrossProcessBatchNorm2d.group = group
    plain, cross = _pair()
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2)) - 0.5
    _compare(plain, cross, x, copies=2)
    assert seen == [group, group]    # forward statistics, backward gradient


def test_cross_process_batch_norm_without_a_group_is_torchs_own():
    plain, cross = _pair()
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(plain(x), cross(x)) and torch.equal(plain.running_var, cross.running_var)


def test_convert_replaces_every_batch_norm_and_keeps_its_state():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3, momentum=0.2), nn.ReLU())
    model = nn.Sequential(inner, nn.BatchNorm2d(4, affine=False), nn.BatchNorm1d(4), nn.Linear(4, 2))
    already = CrossProcessBatchNorm2d(4)
    model.add_module("already", already)
    model.train()
    model[1](torch.randn(2, 4, 3, 3))
    inner(torch.randn(2, 3, 3, 3) + 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv, linear, bn1d = inner[0], model[3], model[2]
    converted = distributed._convert_batch_norm(model)
    assert converted is model and model[0] is inner
    assert type(inner[1]) is CrossProcessBatchNorm2d and type(model[1]) is CrossProcessBatchNorm2d
    assert inner[0] is conv and model[3] is linear and model[2] is bn1d and model.already is already
    assert (inner[1].eps, inner[1].momentum, inner[1].affine, inner[1].track_running_stats) == (1e-3, 0.2, True, True)
    assert model[1].affine is False and model[1].weight is None
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert int(inner[1].num_batches_tracked) == 1
    untracked = distributed._convert_batch_norm(nn.BatchNorm2d(2, track_running_stats=False))
    assert type(untracked) is CrossProcessBatchNorm2d and untracked.track_running_stats is False
    assert untracked.running_mean is None


def test_wrap_returns_the_model_itself_in_one_process():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    assert distributed.wrap(model, World(), CPU) is model
    assert type(model[1]) is nn.BatchNorm2d


class FakeDDP:
    """DistributedDataParallel's constructor, recorded (the real one costs seconds on first use)."""
    calls: list = []

    def __init__(self, module, **kw):
        self.module = module
        FakeDDP.calls.append((module, kw))


@pytest.fixture
def fake_ddp(monkeypatch):
    FakeDDP.calls = []
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", FakeDDP)
    return FakeDDP.calls


def test_wrap_on_cpu_is_ddp_over_cross_process_batch_norm_in_a_group_of_its_own(one_rank_group, fake_ddp):
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    net = distributed.wrap(model, World(0, 2, 0), CPU)
    assert isinstance(net, FakeDDP) and fake_ddp == [(model, {})]
    assert type(model[1]) is CrossProcessBatchNorm2d
    group = CrossProcessBatchNorm2d.group
    assert isinstance(group, dist.ProcessGroup) and group != dist.group.WORLD


def test_wrap_on_cuda_is_ddp_over_syncbatchnorm_on_the_ranks_device(fake_ddp):
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    net = distributed.wrap(model, World(1, 2, 1), torch.device("cuda", 1))
    assert isinstance(net, FakeDDP) and len(fake_ddp) == 1
    module, kw = fake_ddp[0]
    assert kw == {"device_ids": [1]} and type(module[1]) is nn.SyncBatchNorm


def test_cross_process_batch_norm_computes_on_the_inputs_device(one_rank_group, monkeypatch):
    """Every tensor of the computation lives where the batch does (a GPU rank's statistics are not
    built on the CPU): shown on the meta device, where mixing in a CPU tensor is an error."""
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None, **kw: tensor.mul_(2))
    cross = CrossProcessBatchNorm2d(3).to("meta")
    out = cross(torch.randn(4, 3, 5, 6, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 3, 5, 6)
    assert cross.running_mean.device.type == "meta" and cross.running_var.device.type == "meta"


def test_cross_process_batch_norm_keeps_a_bfloat16_models_dtype(one_rank_group, monkeypatch):
    """A bfloat16 model stays bfloat16, as with torch's BatchNorm2d: the output, the running
    statistics and the input gradient (statistics of the global batch of two ranks, as above)."""
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None, **kw: tensor.mul_(2))
    plain, cross = _pair()
    plain, cross = plain.to(torch.bfloat16), cross.to(torch.bfloat16)
    x = (torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(3)) + 1).to(torch.bfloat16)
    xc = x.clone().requires_grad_()
    out = cross(xc)
    out.sum().backward()
    assert out.dtype == xc.grad.dtype == torch.bfloat16
    assert cross.running_mean.dtype == cross.running_var.dtype == torch.bfloat16
    want = plain(torch.cat([x, x]))[:4]
    assert torch.allclose(out.float(), want.float(), rtol=0.02, atol=0.05)
    assert torch.allclose(cross.running_var.float(), plain.running_var.float(), rtol=0.02, atol=0.02)

"""The steps of the prepared GPU check (`bench.gpu_check` runs each in its own process, with its own
time limit). Each takes the check's sizes (`gpu_check.SIZES`) and returns a dict whose numbers go
into the results file. They import only the project's stable public functions, so a rename there
fails the CPU dry run (tests/test_gpu_check.py) instead of the first GPU lease.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench import cnn_throughput, estimate, gpu_api
from pipeline import params as P
from pipeline.data import images
from pipeline.models import cnn, registry
from pipeline.train import cnn_loop

MODELS = tuple(registry.MODELS)
ROOT = Path(__file__).resolve().parent.parent


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _image_set(arrays: dict) -> images.ImageSet:
    size = arrays["train_images"].shape[1]
    return images.ImageSet({s: arrays[f"{s}_images"] for s in images.SPLITS},
                           {s: arrays[f"{s}_labels"].astype(np.int64) for s in images.SPLITS}, 9, size, "synthetic")


def _random_set(counts: dict, size: int, seed: int = 0) -> images.ImageSet:
    """Random uint8 pictures and labels: throughput does not depend on content, and
    `images.synthesize` takes minutes of CPU at 100k images."""
    rng = np.random.default_rng(seed)
    return _image_set({**{f"{s}_images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
                          for s, n in counts.items()},
                       **{f"{s}_labels": rng.permutation(np.arange(n) % 9)[:, None] for s, n in counts.items()}})


def _params(sizes: dict):
    """The project's params; in a dry run with toy image and batch sizes."""
    raw = P.load_yaml((ROOT / "params.yaml").read_text())
    if sizes["dry_run"]:
        raw["data"]["images"].update(source="synthetic", size=sizes["size"])
        raw["cnn"]["defaults"].update(batch_size=sizes["batch"], eval_batch_size=4 * sizes["batch"])
    return P.parse(raw), raw


def _train(name: str, data: images.ImageSet, cfg, device, keep_on_host: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = cnn.build(name, data.n_classes)
    splits = cnn_loop.to_device(data, device, keep_on_host=keep_on_host)
    start = time.perf_counter()
    result = cnn_loop.train(model, splits, cfg, seed=seed, log=lambda metrics, step: None)
    _sync(device)
    seconds = time.perf_counter() - start
    test, _ = cnn_loop.evaluate(model, splits["test"], cfg.eval_batch_size)
    return result, test, seconds


def api(sizes: dict, device) -> dict:
    """Every torch/torchvision name the project calls (bench/torch_api.txt) resolves in this torch."""
    names = gpu_api.listed()
    missing = gpu_api.missing(names)
    return {"checked": len(names), "missing": len(missing), "missing_names": missing}


def throughput(sizes: dict, device) -> dict:
    """images/s of this project's step, the bare forward+backward ceiling and the assignment's
    DataLoader loop, side by side (bench/cnn_throughput.py's own measurement)."""
    split = cnn_throughput.synthetic_split(sizes["throughput_train"], sizes["size"], device)
    out = {}
    for name in MODELS:
        r = cnn_throughput.bench_model(name, split, device, sizes["batch"], sizes["warmup"], sizes["steps"])
        out[name] = {"ours_images_per_s": r["ours"], "ceiling_images_per_s": r["ceiling"],
                     "original_images_per_s": r["original"], "eval_images_per_s": r["eval"],
                     "ours_over_ceiling": r["ours"] / r["ceiling"], "ours_over_original": r["ours"] / r["original"]}
        print(name, out[name], flush=True)
    return out


def epoch(sizes: dict, device) -> dict:
    """One real-size epoch of each model through `cnn_loop.train` (bf16 autocast on CUDA), with the
    default experiment's batch size, validation every log_every steps and the test pass."""
    params, _ = _params(sizes)
    start = time.perf_counter()
    data = _random_set(sizes["epoch_counts"], sizes["size"])
    out = {"make_data_seconds": time.perf_counter() - start, "train_images": sizes["epoch_counts"]["train"]}
    for name in MODELS:
        cfg = replace(params.cnn_experiment(name), epochs=1)
        result, test, seconds = _train(name, data, cfg, device)
        out[name] = {"seconds": seconds, "train_seconds": result.train_seconds,
                     "images_per_s": result.images_seen / result.train_seconds, "test_auc": test["auc"]}
        print(name, out[name], flush=True)
    return out


def bf16(sizes: dict, device) -> dict:
    """The same batch through the same weights in fp32 and under bf16 autocast (eval mode)."""
    split = cnn_throughput.synthetic_split(sizes["compare_batch"], sizes["size"], device)
    x = split.batch(torch.arange(sizes["compare_batch"], device=device))
    out = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = cnn.build(name, 9).to(device, memory_format=torch.channels_last).eval()
        with torch.no_grad():
            fp32 = model(x).float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = model(x).float()
        diff = (fp32 - low).abs().max().item()
        out[name] = {"max_abs_logit_diff": diff, "max_abs_logit": fp32.abs().max().item(),
                     "argmax_agreement": (fp32.argmax(1) == low.argmax(1)).float().mean().item()}
    return out


def determinism(sizes: dict, device) -> dict:
    """Two same-seed runs of each model: the largest difference of any metric (validation and test
    AUC/accuracy, the last train loss), the tolerance the README's determinism claim needs."""
    params, _ = _params(sizes)
    data = _image_set(images.synthesize(sizes["size"], sizes["det_counts"], 2023))
    out = {}
    for name in MODELS:
        cfg = replace(params.cnn_experiment(name), epochs=sizes["det_epochs"], log_every=sizes["det_log_every"])
        runs = []
        for _ in range(2):
            result, test, _ = _train(name, data, cfg, device)
            runs.append({**{f"val_{k}": v for k, v in result.best_val.items() if isinstance(v, float)},
                         **{f"test_{k}": v for k, v in test.items() if isinstance(v, float)},
                         "last_train_loss": result.curve[-1]["train_loss"]})
        diffs = {k: abs(runs[0][k] - runs[1][k]) for k in runs[0]}
        out[name] = {"max_metric_diff": max(diffs.values()), "test_auc": runs[0]["test_auc"], "diffs": diffs}
        print(name, out[name], flush=True)
    return out


def pinned(sizes: dict, device) -> dict:
    """The pinned-host batch path (splits too big for the device) against the device-resident one."""
    params, _ = _params(sizes)
    data = _random_set(sizes["pinned_counts"], sizes["size"])
    cfg = replace(params.cnn_experiment("resnet18"), epochs=1)
    out = {}
    for label, on_host in (("device_resident", False), ("pinned_host", True)):
        result, _, _ = _train("resnet18", data, cfg, device, keep_on_host=on_host)
        out[label] = {"images_per_s": result.images_seen / result.train_seconds}
    out["pinned_over_resident"] = out["pinned_host"]["images_per_s"] / out["device_resident"]["images_per_s"]
    return out


def stage_names(raw_dvc: dict, raw_params: dict) -> list[str]:
    """Every stage of dvc.yaml, matrix entries expanded (what a fresh `dvc repro` runs), in file
    order; without dvc, which the GPU machine does not have."""
    names = []
    for stage, spec in raw_dvc["stages"].items():
        matrix = spec.get("matrix") or {}
        if not matrix:
            names.append(stage)
            continue
        (ref,) = matrix.values()   # one key, "${section.group}"
        node = raw_params
        for part in ref.strip("${}").split("."):
            node = node[part]
        names += [f"{stage}@{entry}" for entry in node]
    return names


def projection(sizes: dict, device) -> dict:
    """The projected wall time of the whole default `dvc repro` here (bench/estimate.py's figures
    per stage: CNN stages timed on this device, MLP stages on this CPU, the rest fixed)."""
    params, raw = _params(sizes)
    stages = stage_names(P.load_yaml((ROOT / "dvc.yaml").read_text()), raw)
    if sizes["dry_run"]:   # one stage of each kind: the code path, not the figure
        stages = list({stage.split("@")[0]: stage for stage in reversed(stages)}.values())[::-1]
    cache, per_stage = {}, {}
    for stage in stages:
        if stage.startswith(("cnn@", "ablation@")):
            seconds, _ = estimate.cnn_estimate(stage, params, raw, device, sizes["projection_steps"], cache)
        elif stage.startswith("mlp@"):
            seconds, _ = estimate.mlp_estimate(stage, params, sizes["projection_steps"])
        else:
            seconds, _ = estimate.other_estimate(stage, params)
        per_stage[stage] = seconds
        print(f"{stage}: {seconds:.0f} s", flush=True)
    return {"repro_seconds": sum(per_stage.values()), "stages": len(stages), "per_stage_seconds": per_stage}


def gpu_tests(sizes: dict, device) -> dict:
    """tests/test_gpu.py (skipped without CUDA)."""
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                        cwd=ROOT).returncode
    if rc:
        raise RuntimeError(f"tests/test_gpu.py failed (pytest exit {rc})")
    return {"pytest_rc": rc}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp(sizes: dict, device) -> dict:
    """A DDP training step with several ranks on this one device, for each (backend, ranks) in
    sizes["ddp"]: NCCL may refuse two ranks on one GPU, so each attempt is recorded as it went."""
    out = {}
    for backend, ranks in sizes["ddp"]:
        port, key = _free_port(), f"{backend}_{ranks}"
        procs = [subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--ddp-rank", str(rank), str(ranks),
                                   backend, device.type, str(port), str(sizes["batch"]), str(sizes["size"])],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
                 for rank in range(ranks)]
        try:
            outputs = [p.communicate(timeout=sizes["ddp_timeout"])[0] for p in procs]
        except subprocess.TimeoutExpired:
            out[key] = {"ok": 0, "error": f"timed out after {sizes['ddp_timeout']} s"}
            continue
        finally:   # also when the step's own time limit interrupts the wait
            for p in procs:
                p.kill()
        ok = all(p.returncode == 0 for p in procs)
        lines = [line for o in outputs for line in o.splitlines() if line.startswith("DDP ")]
        if ok and lines:
            step_s, diff = max(float(line.split()[1]) for line in lines), max(float(line.split()[2]) for line in lines)
            out[key] = {"ok": 1, "step_seconds": step_s, "max_param_diff_across_ranks": diff}
        else:
            out[key] = {"ok": 0, "error": "\n".join(o[-1500:] for o in outputs)}
        print(key, {k: v for k, v in out[key].items() if k != "error"}, flush=True)
    working = [k for k, v in out.items() if v["ok"] and int(k.rsplit("_", 1)[1]) > 1]
    if not working:
        raise RuntimeError("no backend ran a DDP step with two ranks: " + repr(out))
    out["used"] = {"ranks": int(working[0].rsplit("_", 1)[1]), **out[working[0]], "backend": working[0]}
    return out


def ddp_rank(rank: int, world: int, backend: str, device_type: str, port: int, batch: int, size: int) -> None:
    """One rank of `ddp`: five timed DDP steps of ResNet-18, then how far the ranks' weights differ."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device
    dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    torch.manual_seed(0)
    model = cnn.build("resnet18", 9).to(device, memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator(device=device).manual_seed(rank)   # each rank its own batch
    x = torch.randn(batch, 3, size, size, device=device, generator=generator).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 9, (batch,), device=device, generator=generator)
    cnn_loop.train_step(net, opt, x, y)
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        cnn_loop.train_step(net, opt, x, y)
    _sync(device)
    step_s = (time.perf_counter() - start) / 5
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])   # channels_last: no view
    mean = weights.clone()
    dist.all_reduce(mean)
    diff = (weights - mean / world).abs().max().item()
    dist.barrier()
    dist.destroy_process_group()
    print(f"DDP {step_s} {diff}", flush=True)


STEPS = {"api": api, "throughput": throughput, "epoch": epoch, "bf16": bf16, "determinism": determinism,
         "ddp": ddp, "pinned": pinned, "projection": projection, "gpu_tests": gpu_tests}

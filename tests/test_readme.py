"""The README runs as written: every shell block either runs here, in README order, in one
throw-away copy of the repository with small params (as a user would type them one after the
other), or says on its first line why not: `# needs the network`, or `# tested by <file>::<test>`
(a test that runs the same commands, e.g. services or many processes)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, SHARED_DATA, env, free_port, make_repo_copy, small_params, wait_for

SHELL = {"bash", "sh", "shell"}
NETWORK = "# needs the network"
TESTED_BY = re.compile(r"# tested by (tests/\S+\.py)::(\w+)")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    """(info string, body) of every fenced block of README.md, in order."""
    return [(info.strip(), body) for info, body in FENCE.findall((REPO / "README.md").read_text())]


def shell_blocks() -> list[str]:
    return [body for info, body in blocks() if info.split(" ")[0] in SHELL]


def runnable(body: str) -> bool:
    first = body.lstrip().splitlines()[0]
    return not (first.startswith(NETWORK) or TESTED_BY.match(first))


def test_every_block_is_marked_and_every_shell_block_runs_here_or_names_its_test():
    assert all(info for info, _ in blocks()), "a fenced block without a language (use ```text for prose)"
    bodies = shell_blocks()
    assert len(bodies) >= 10 and sum(map(runnable, bodies)) >= 6
    for body in bodies:
        match = TESTED_BY.match(body.lstrip())
        if match:   # the named test exists, so the reference cannot rot silently
            path, name = match.groups()
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} not found"


def _serve_until_up(script: str, repo: Path, port: int) -> None:
    """A block that starts a server: start it, wait for its page, stop it by PID."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=repo, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def page() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                    return answer.status == 200
            except OSError:
                return False

        wait_for(page, 300, f"the README's server answering on port {port}", process=proc, every=1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_the_readme_waits_for_the_queue_before_exp_show():
    """`dvc exp show` right after `dvc queue start` races the workers (issue 17.6)."""
    for body in shell_blocks():
        if "queue start" in body and "exp show" in body:
            assert body.index("queue start") < body.index("pipeline.queue wait") < body.index("exp show"), body
            break
    else:
        raise AssertionError("no README block queues experiments and shows them")


def _user_files(repo: Path, weights: Path) -> None:
    """What the README's reader brings: their own images and series, and saved ImageNet weights
    (here a DenseNet121 state dict saved locally: the download needs the network)."""
    from pipeline.data import images

    counts = {"train": 120, "val": 40, "test": 40}
    arrays = images.synthesize(32, counts, seed=7, name="pneumoniamnist")   # grayscale, 2 classes
    np.savez(repo / "my_images.npz", **{k: v for k, v in arrays.items() if k.split("_")[0] in images.SPLITS})
    (repo / "my_data").mkdir()
    frame = pd.read_csv(SHARED_DATA / "ETTh1.csv").rename(columns={"OT": "load"})
    frame.to_csv(repo / "my_data" / "my_series.csv", index=False)
    shutil.copy(weights, repo / "densenet121_imagenet.pt")


@pytest.mark.slow
@pytest.mark.timeout(3600)   # the offline recipe is a whole small pipeline: past 1200 s on a loaded machine
def test_the_readme_runs_as_written(tmp_path, local_densenet_weights):
    params = small_params()   # smaller still: one seed, one window normalisation, short windows
    params["mlp"]["defaults"].update(seeds=1, window_norm="last", epochs=1, input_len=24, pred_len=24, kernel=5)
    params["data"]["images"].update(synthetic_train=96, synthetic_val=32, synthetic_test=32)
    params["cnn"]["defaults"].update(max_steps_per_epoch=2, eval_batch_size=32)
    (tmp_path / "repo").mkdir()
    repo = make_repo_copy(tmp_path / "repo", params)
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)   # the README's ../shared/data
    _user_files(repo, local_densenet_weights)
    exports: list[str] = []   # a user's shell keeps what earlier blocks exported
    ran = []
    for body in shell_blocks():
        if not runnable(body):
            continue
        script = "\n".join(["set -eo pipefail", *exports, body])
        if "mlflow ui" in body:
            port = free_port()
            _serve_until_up(script.replace("--port 5000", f"--port {port}"), repo, port)
        else:
            result = subprocess.run(["bash", "-c", script], cwd=repo, env=env(), capture_output=True,
                                    text=True, timeout=3000)
            assert result.returncode == 0, f"README block failed:\n{body}\nstdout:\n{result.stdout[-4000:]}" \
                                           f"\nstderr:\n{result.stderr[-4000:]}"
        exports += [line for line in body.splitlines() if line.startswith("export ")]
        ran.append(body.splitlines()[0])
        if "data.images.source=synthetic" in body:   # the offline recipe: to the end, report included
            report = (repo / "reports/report.md").read_text()
            assert "SYNTHETIC DATA" in report and (repo / "reports/report.html").exists()
            client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
            part3 = client.get_experiment_by_name("part3-classification").experiment_id
            finetune = client.search_runs([part3], "attributes.run_name = 'finetune'")
            assert finetune and finetune[0].data.params["pretrained"] == "False"   # trained from scratch
    assert len(ran) == sum(map(runnable, shell_blocks()))
    assert (repo / "dvc_plots/index.html").exists()
    assert (repo / "models/cnn/resnet18.pt").exists() and (repo / "metrics/mlp/default.json").exists()

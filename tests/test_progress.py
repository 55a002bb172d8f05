"""Progress output: bars in a terminal, plain periodic lines in a captured log, epoch lines that
always stay, the projection before the work, the download's progress over a real HTTP server,
and `bench.estimate` on a real DVC repository. Content is asserted, never timings."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import make_repo_copy, run, small_params
from pipeline import progress
from pipeline.data.fetch import fetch
from pipeline.errors import DataError


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def every_update(monkeypatch):
    """Captured output prints a line at every update (no waiting LOG_INTERVAL_S in a test)."""
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def run_epoch(stream, steps=10):
    with progress.bar(steps, "cnn@resnet18 epoch 1/3", items_per_step=32, stream=stream) as shown:
        for i in range(steps):
            shown.step(loss=1.0 + i % 2)   # running mean 1.5 after an even number of steps
    return shown


def test_captured_output_gets_plain_periodic_lines_without_carriage_returns(every_update):
    log = io.StringIO()
    shown = run_epoch(log)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) >= 5, text
    assert all(line.startswith("cnn@resnet18 epoch 1/3: ") for line in lines)
    assert "10/10 steps" in lines[-1] and "img/s" in lines[-1] and "loss 1.5000" in lines[-1]
    assert shown.mean_loss == 1.5


def test_captured_output_waits_before_its_first_line(monkeypatch):
    """Work shorter than LOG_INTERVAL_S leaves no bar lines in a log (only its epoch line)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    log = io.StringIO()
    run_epoch(log)
    assert log.getvalue() == ""


def test_terminal_gets_a_bar_redrawn_in_place(every_update):
    term = Terminal()
    run_epoch(term)
    assert "\r" in term.getvalue() and "|" in term.getvalue()


def test_tqdm_disable_silences_bars_but_keeps_epoch_lines(every_update, monkeypatch, capsys):
    # The epoch line is the run's record in the log (one line per epoch, like the stage's final
    # line), so it stays when bars are turned off; only the transient bars go.
    monkeypatch.setenv("TQDM_DISABLE", "1")
    log = io.StringIO()
    shown = run_epoch(log)
    assert log.getvalue() == ""
    assert shown.mean_loss == 1.5   # the loss is still tracked for the epoch line
    line = progress.epoch_line(2, 10, 41.25, prefix="cnn@resnet18", train_loss=shown.mean_loss, val_auc=0.97123,
                               val_acc=0.8, lr=0.000905)
    assert capsys.readouterr().out == line + "\n"
    assert line == "cnn@resnet18 epoch 2/10  train_loss 1.5000  val_auc 0.9712  val_acc 0.8000  lr 0.000905  41.2s"


def test_projection_over_an_hour_on_cpu_names_the_ways_out():
    total, per_epoch, detail = progress.cnn_projection(0.25, 0.002, steps_per_epoch=1407, epochs=10, log_every=100,
                                                       n_val=10_004, n_test=7_180)
    assert total > 3600
    message = progress.projection_message("cnn@resnet18", "cpu", total, detail, seconds_per_epoch=per_epoch,
                                          steps_per_epoch=1407, epochs=10, size=64)
    first, *ways = message.splitlines()
    assert re.fullmatch(r"projected: \d+h \d\dm for cnn@resnet18 on cpu \(10 epochs x 1407 steps .*\)", first)
    assert "over an hour on a CPU" in ways[0]
    text = "\n".join(ways)
    assert "GPU" in text
    assert "dvc exp run -S data.images.size=28" in text
    fit = int(3600 // per_epoch)
    assert f"dvc exp run -S cnn.defaults.epochs={fit}" in text
    assert re.search(r"dvc exp run -S cnn.defaults.max_steps_per_epoch=\d+", text)


def test_projection_under_an_hour_or_on_a_gpu_is_one_line():
    assert progress.projection_message("cnn@resnet18", "cpu", 1200.0) == "projected: 20m 00s for cnn@resnet18 on cpu"
    message = progress.projection_message("cnn@resnet18", "cuda", 7200.0, seconds_per_epoch=720, steps_per_epoch=1407,
                                          epochs=10, size=64, on_cpu=False)
    assert message == "projected: 2h 00m for cnn@resnet18 on cuda"


def test_step_timer_times_only_the_steps_after_the_warm_up():
    timer = progress.StepTimer(steps_per_epoch=100, warmup=2, timed=3)
    results = []
    for _ in range(8):
        timer.begin()
        results.append(timer.end())
    assert [r is not None for r in results] == [False] * 4 + [True] + [False] * 3
    short = progress.StepTimer(steps_per_epoch=1)   # a one-step epoch still gets a projection
    short.begin()
    assert short.end() is not None


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 (free port) serving a temporary folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_shows_bytes_and_verifies_the_checksum(http_folder, tmp_path, every_update, capsys):
    folder, base = http_folder
    payload = os.urandom(3 * 1024 * 1024 + 123)
    (folder / "pathmnist_64.npz").write_bytes(payload)
    dest = tmp_path / "raw" / "pathmnist_64.npz"
    origin = fetch(dest, f"{base}/pathmnist_64.npz", hashlib.md5(payload).hexdigest(), "md5")
    assert origin == "download" and dest.read_bytes() == payload
    assert not dest.with_name(dest.name + ".partial").exists()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("pathmnist_64.npz: ")]
    assert len(lines) >= 3, err   # the start, chunks, the end
    assert "0% 0.00/3.00M B" in lines[0]
    assert "100% 3.00M/3.00M B" in lines[-1] and "B/s" in lines[-1]


def test_download_with_a_wrong_checksum_keeps_nothing(http_folder, tmp_path, every_update):
    folder, base = http_folder
    (folder / "ETTh1.csv").write_bytes(b"date,OT\n")
    dest = tmp_path / "ETTh1.csv"
    with pytest.raises(DataError, match="sha256 is .* expected 0+"):
        fetch(dest, f"{base}/ETTh1.csv", "0" * 64, "sha256", way_out="set DATA_MIRROR")
    assert list(tmp_path.glob("ETTh1.csv*")) == []


def test_estimate_lists_every_stale_stage_with_a_projected_time(tmp_path):
    params = small_params()
    # One CNN configuration (the ablation differs only in its scheduler), so one measurement.
    params["cnn"]["experiments"] = {"resnet18": {"model": "resnet18"}}
    params["cnn"]["ablations"] = {"steplr": {"model": "resnet18", "scheduler": "step"}}
    repo = make_repo_copy(tmp_path, params)
    out = run([sys.executable, "-m", "bench.estimate", "--steps", "1"], repo, timeout=600).stdout
    names = ["inputs", "download_ett", "download_images", "backprop", "cnn@resnet18", "ablation@steplr", "features",
             "report", *[f"mlp@{v}" for v in params["mlp"]["variants"]]]
    assert f"{len(names)} stages `dvc repro` would run here" in out, out
    for name in names:
        assert re.search(rf"^  projected: (\d+[hms] ?)+ for {re.escape(name)}\b", out, re.M), (name, out)
    assert re.search(r"for cnn@resnet18 on cpu \(1 epochs x 6 steps at", out), out   # 180 images / batch 32
    # window_norm auto: 3 normalisations on the first seed, then 1 more seed (small_params: 2 seeds)
    assert re.search(r"for mlp@default on cpu \(at most 4 fit\(s\) x 2 epochs x 262 steps", out), out
    assert re.search(rf"^total: .* for {len(names)} stages", out, re.M), out

    # As `dvc repro cnn@resnet18` would: the target and the stale stages it needs.
    out = run([sys.executable, "-m", "bench.estimate", "--steps", "1", "cnn@resnet18"], repo, timeout=600).stdout
    listed = re.findall(r"^  projected: .*? for (\S+)", out, re.M)
    assert listed == ["inputs", "download_images", "cnn@resnet18"], out

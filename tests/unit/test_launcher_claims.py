"""Claims of distributed.launch_local, the N-ranks-on-one-machine launcher: each rank gets
torchrun's environment around a store on the loopback, one failed rank ends the others, a signal
to the launcher reaches every rank, and the exit code says what happened (128+N for a signal).
The ranks are tiny Python modules in a temporary folder (no torch import, except the one that
joins the process group through the launcher's store)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import pytest

from pipeline.train import distributed

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT",
                "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS")

RANKS = {
    # every rank writes its environment and argv, and checks that the store's port answers
    "rank_env": f"""
import json, os, pathlib, socket, sys
names = {TORCHRUN_ENV!r}
with socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=30):
    pass
pathlib.Path(os.environ["OUT"], os.environ["RANK"]).write_text(json.dumps(
    {{"env": {{n: os.environ.get(n) for n in names}}, "argv": sys.argv[1:]}}))
""",
    # rank 1 fails with 3 once rank 0 is up; rank 0 records being terminated, else ends alone in 60 s
    "rank_fails": """
import os, pathlib, signal, sys, time
out = pathlib.Path(os.environ["OUT"])
if os.environ["RANK"] == "1":
    while not (out / "waiting").exists():
        time.sleep(0.05)
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda signum, frame: ((out / "terminated").touch(), sys.exit(1)))
(out / "waiting").touch()
time.sleep(60)
""",
    "rank_killed": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    # both ranks record the signal they get, then exit 0
    "rank_signalled": """
import os, pathlib, signal, sys, time
out = pathlib.Path(os.environ["OUT"])
def record(signum, frame):
    (out / ("got" + os.environ["RANK"])).write_text(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, record)
(out / ("up" + os.environ["RANK"])).touch()
time.sleep(600)
""",
    # a real gloo group through the launcher's store: 1 + 2 summed over both ranks
    "rank_group": """
import os, pathlib, torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
pathlib.Path(os.environ["OUT"], os.environ["RANK"]).write_text(str(total.item()))
dist.destroy_process_group()
""",
}


@pytest.fixture
def ranks(tmp_path, monkeypatch):
    """The rank modules importable by the ranks, their OUT folder, and this process's signal
    handlers put back afterwards (launch_local installs its own)."""
    for name, source in RANKS.items():
        (tmp_path / f"{name}.py").write_text(source)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield out
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def test_each_rank_gets_torchruns_environment_around_a_loopback_store(ranks):
    assert distributed.launch_local(2, "rank_env", ["--flag", "x"]) == 0
    seen = {r: json.loads((ranks / str(r)).read_text()) for r in (0, 1)}
    port = seen[0]["env"]["MASTER_PORT"]
    assert int(port) > 0
    for rank, said in seen.items():
        assert said["argv"] == ["--flag", "x"]
        assert said["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                               "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                               "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
                               "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def test_a_users_omp_num_threads_is_kept(ranks, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.launch_local(1, "rank_env", []) == 0
    assert json.loads((ranks / "0").read_text())["env"]["OMP_NUM_THREADS"] == "3"


def test_the_ranks_form_a_process_group_through_the_launchers_store(ranks):
    assert distributed.launch_local(2, "rank_group", []) == 0
    assert [(ranks / str(r)).read_text() for r in (0, 1)] == ["3.0", "3.0"]


def test_one_failed_rank_ends_the_others_and_its_code_is_the_runs(ranks):
    # rank 1 (not the first) fails: the launcher used to poll only up to the first running rank
    assert distributed.launch_local(2, "rank_fails", []) == 3
    assert (ranks / "terminated").exists()   # rank 0 was ended, not waited for


def test_a_rank_killed_by_a_signal_gives_128_plus_its_number(ranks):
    assert distributed.launch_local(1, "rank_killed", []) == 128 + signal.SIGKILL


def test_sigterm_to_the_launcher_reaches_every_rank_and_gives_128_plus_15(ranks):
    def terminate_when_both_are_up():
        deadline = time.monotonic() + 120
        while not all((ranks / f"up{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    threading.Thread(target=terminate_when_both_are_up, daemon=True).start()
    assert distributed.launch_local(2, "rank_signalled", []) == 128 + signal.SIGTERM
    assert [(ranks / f"got{r}").read_text() for r in (0, 1)] == [str(int(signal.SIGTERM))] * 2


def test_the_ranks_run_this_python(ranks, monkeypatch):
    calls = []
    real = distributed.subprocess.Popen
    monkeypatch.setattr(distributed.subprocess, "Popen", lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw))
    assert distributed.launch_local(1, "rank_env", ["a"]) == 0
    assert calls == [[sys.executable, "-m", "rank_env", "a"]]

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
    # rank 0 ends at once; rank 1 runs on well past it (polls see rank 0 done), then fails with 3
    "rank_fails_late": """
import os, pathlib, sys, time
out = pathlib.Path(os.environ["OUT"])
if os.environ["RANK"] == "0":
    (out / "done0").touch()
    sys.exit(0)
deadline = time.monotonic() + 60
while not (out / "done0").exists() and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.5)
(out / "finished1").touch()
sys.exit(3)
""",
    # rank 1 fails with 3 once 0 and 2 are up; rank 0, terminated, exits 1; rank 2 ignores SIGTERM
    # and keeps running 0.5 s past rank 0's end (the launcher polls while 0 and 1 have both failed)
    "rank_fails_others_slow": """
import os, pathlib, signal, sys, time
out = pathlib.Path(os.environ["OUT"])
rank = os.environ["RANK"]
deadline = time.monotonic() + 60
if rank == "1":
    while not all((out / f"up{r}").exists() for r in (0, 2)) and time.monotonic() < deadline:
        time.sleep(0.02)
    sys.exit(3)
if rank == "0":
    signal.signal(signal.SIGTERM, lambda signum, frame: ((out / "terminated0").touch(), sys.exit(1)))
    (out / "up0").touch()
    time.sleep(60)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
(out / "up2").touch()
while not (out / "terminated0").exists() and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.5)
""",
    "rank_sleeps": "import time\ntime.sleep(0.5)\n",
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
    assert 1024 <= int(port) < 65536   # a free port the kernel gave, not a fixed one
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


def test_a_rank_that_ends_first_is_waited_for_and_a_later_failure_is_the_runs_code(ranks):
    # rank 0 exits 0 while rank 1 still works: that is no failure, rank 1 runs to its end; its 3
    # (seen only once every rank has ended) is the run's code, not rank 0's 0
    assert distributed.launch_local(2, "rank_fails_late", []) == 3
    assert (ranks / "finished1").exists()


def test_the_runs_code_is_the_first_failure_not_that_of_a_rank_ended_because_of_it(ranks):
    # rank 1 fails (3); rank 0, ended by the launcher, exits 1 while rank 2 still runs: still 3
    assert distributed.launch_local(3, "rank_fails_others_slow", []) == 3
    assert (ranks / "terminated0").exists()


def test_the_launcher_looks_at_its_ranks_every_fifth_of_a_second(ranks, monkeypatch):
    # a rank's end or failure is noticed within 0.2 s, not seconds later
    sleeps, real = [], time.sleep
    monkeypatch.setattr(distributed.time, "sleep", lambda s: (sleeps.append(s), real(s))[1])
    assert distributed.launch_local(1, "rank_sleeps", []) == 0
    assert sleeps and all(0 < s <= 0.2 for s in sleeps), sleeps


def test_the_store_counts_the_ranks_and_the_launcher_and_does_not_wait_for_them(ranks, monkeypatch):
    # torchrun's agent store: one client per rank plus the launcher itself; the ranks start after
    # the store, so waiting for them in its constructor would hang the launch
    calls, real = [], distributed.dist.TCPStore
    monkeypatch.setattr(distributed.dist, "TCPStore", lambda *a, **kw: (calls.append((a, kw)), real(*a, **kw))[1])
    assert distributed.launch_local(2, "rank_env", []) == 0
    (args, kw), = calls
    assert args[:4] == ("127.0.0.1", int(json.loads((ranks / "0").read_text())["env"]["MASTER_PORT"]), 3, True)
    assert not kw["wait_for_workers"]

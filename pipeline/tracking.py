"""The one place that talks to MLflow (output files are written by `pipeline.outputs`).

Tracking must never cost a result: every MLflow call is guarded; after the first failure the run
goes on untracked, the stage still writes its DVC metrics, and the failure is printed loudly at
the start and again at the end. The one exception is an experiment whose artifact folder lies
inside a DVC temporary copy (see `_check_artifact_location`): that would silently lose every
artifact, so the stage stops before training with the repair command.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import StageError, redact
from pipeline.paths import REPO_ROOT, main_repo_root
from pipeline.runtime import check_params

EXPERIMENTS = {"backprop": "part1-backprop", "mlp": "part2-forecasting", "cnn": "part3-classification"}

# A server that is down fails fast (seconds), a brief server error under load (5xx, 429, a dropped
# connection) is retried twice with ~1 s and ~2 s waits instead of losing the run; MLflow's own
# defaults retry for minutes. Values the user exported win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
# CPU/memory (and GPU with nvidia-ml-py) sampled every 10 s: one small write per 10 s.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "10")

# Stores reached through a server decide their own artifact location; any other store is opened
# by this process, which would put artifacts under its working directory (a DVC temp copy).
SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store at the root of the user's repository."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Where runs of a directly opened store keep their artifacts: outside DVC's temp copies."""
    return main_repo_root() / "mlartifacts"


# Set by MLflow itself on every run started with mlflow.start_run from a script inside a git
# repository (its git context provider reads the commit of sys.argv[0]'s repository: the
# checkout, or a queued run's DVC temp copy, whose HEAD is the experiment's baseline commit).
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def git_commit() -> str:
    """The commit of this checkout, for the report's header (the report is not an MLflow run)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _is_server(uri: str) -> bool:
    return urlsplit(uri).scheme in SERVER_SCHEMES


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path)


def prepare_experiment(uri: str, name: str):
    """The experiment `name`, created if needed, with the store initialised first.

    SQLite: the first use of a fresh file creates and migrates the schema; several processes doing
    that at once (`dvc queue start -j 4`) race ("duplicate column name") and can leave the file
    broken for every later writer. Store creation and experiment creation therefore happen under
    one file lock next to the database; later callers find both done and pass in milliseconds.
    """
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = _sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(db) + ".lock", timeout=300):
            if not db.exists():
                _create_store(uri)
            return _get_or_create(MlflowClient(tracking_uri=uri), uri, name)
    return _get_or_create(MlflowClient(tracking_uri=uri), uri, name)


def _create_store(uri: str) -> None:
    """A fresh SQLite store whose `Default` experiment keeps artifacts in `mlartifacts/0`.

    Left to MLflow, the first client creates `Default` with artifacts in `./mlruns` of its working
    directory, which for a queued run is a `.dvc/tmp/exps/` copy that DVC deletes.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, artifact_root().as_uri()).engine.dispose()


def _get_or_create(client, uri: str, name: str):
    experiment = client.get_experiment_by_name(name)   # the first call creates/migrates the store
    if experiment is None:
        location = None if _is_server(uri) else (artifact_root() / name).as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created meanwhile by another writer (a server store)
            pass
        experiment = client.get_experiment_by_name(name)
    _check_artifact_location(experiment, uri)
    return experiment


def _check_artifact_location(experiment, uri: str) -> None:
    """Refuse an experiment whose artifacts would go to a folder that DVC deletes.

    Older versions created experiments from inside `dvc exp run --queue/--temp` with their
    artifact location in `.dvc/tmp/exps/...`; every later run, queued or not, would write its
    models and figures there and lose them. This stops the stage (before any training) rather
    than warn, because a warning in a queued run's log is easy to miss and the loss is silent and
    permanent; the repair is one command.
    """
    location = experiment.artifact_location or ""
    if "/.dvc/tmp/" not in location.replace("\\", "/"):
        return
    raise StageError(
        f"MLflow experiment '{experiment.name}' (id {experiment.experiment_id}) keeps its artifacts in "
        f"{location}, inside a temporary DVC experiment folder that DVC deletes after each run, so "
        "the artifacts of its runs are lost. Rename it once (its runs stay visible under the new "
        "name); the next run creates a fresh experiment with artifacts in "
        f"{artifact_root() / experiment.name}:\n"
        f"  MLFLOW_TRACKING_URI='{_redact(uri)}' mlflow experiments rename "
        f"--experiment-id {experiment.experiment_id} --new-name '{experiment.name}-tmp-artifacts'")


class Tracker:
    """One MLflow run for one stage or variant; use as a context manager.

    The run ends FINISHED on success, KILLED on KeyboardInterrupt (SIGINT/SIGTERM, turned into
    one by `pipeline.runtime.run_stage`), FAILED on any other error.
    """

    def __init__(self, family: str, run_name: str, data_source: str, extra_tags: dict | None = None):
        self.experiment = EXPERIMENTS[family]
        self.run_name = run_name
        # the commit is MLflow's own tag (GIT_COMMIT_TAG)
        self.tags = {"stage": run_name, "data_source": data_source,
                     "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
                     # who runs it: a later start of the stage marks the run KILLED if that process is gone
                     "host": socket.gethostname(), "pid": str(os.getpid()), **(extra_tags or {})}
        self.failure: str | None = None
        self.run_id = ""
        self.experiment_id = ""
        self.commit = ""   # what MLflow recorded under GIT_COMMIT_TAG; "" untracked or outside git
        self._mlflow = None

    # -- guarded calls -------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        if self.failure or self._mlflow is None:
            return None
        try:
            return fn(*args, **kwargs)
        except StageError:
            raise
        except Exception as error:  # noqa: BLE001 - tracking must not stop training
            # exception texts can quote the tracking URI with its password
            self.failure = redact(f"{what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            print(f"\n*** MLflow TRACKING FAILED ({_redact(tracking_uri())}) - {self.failure}\n"
                  "*** Training continues; DVC metrics files are still written.\n", file=sys.stderr)
            return None

    def __enter__(self):
        try:
            import mlflow
        except ImportError as error:
            self.failure = f"import mlflow: {error}"
            return self
        self._mlflow = mlflow

        def start():
            uri = tracking_uri()
            mlflow.set_tracking_uri(uri)
            experiment = prepare_experiment(uri, self.experiment)
            try:   # housekeeping: never a reason to run untracked
                _mark_stale_runs(uri, experiment.experiment_id, self.run_name)
            except Exception as error:  # noqa: BLE001
                print(f"MLflow: could not check for stale runs: {redact(str(error))}", file=sys.stderr)
            # MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false in the environment turns system metrics off.
            system = None if "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING" in os.environ else True
            run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=self.run_name,
                                   tags=self.tags, log_system_metrics=system)
            self.run_id, self.experiment_id = run.info.run_id, experiment.experiment_id
            self.commit = run.data.tags.get(GIT_COMMIT_TAG, "")

        self._call("start run", start)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._mlflow is not None and self.run_id:
            if exc_type is None:
                status = "FINISHED"
            elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
                status = "KILLED"
            else:
                status = "FAILED"
                self._call("log traceback", self._mlflow.set_tag, "error",
                           redact("".join(traceback.format_exception_only(exc_type, exc)))[-5000:])
            try:
                self._mlflow.end_run(status=status)
            except Exception as error:  # noqa: BLE001
                self.failure = self.failure or redact(f"end run: {error}")
        if self.failure:
            print(f"\n*** MLflow TRACKING FAILED for {self.run_name}: {self.failure}\n"
                  f"*** Tracking URI: {_redact(tracking_uri())}. The DVC metrics files were written; the MLflow "
                  "run is missing or incomplete. Check the server (or unset MLFLOW_TRACKING_URI) and "
                  "re-run the stage with `dvc repro -f <stage>`.\n", file=sys.stderr)
        return False

    # -- what stages log -----------------------------------------------------------------------
    def params(self, params: dict) -> None:
        if self._mlflow:
            self._call("log params", self._mlflow.log_params, {k: str(v)[:6000] for k, v in _flatten(params).items()})

    def tag(self, key: str, value) -> None:
        if self._mlflow:
            self._call(f"set tag {key}", self._mlflow.set_tag, key, str(value))

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        check_params()   # params.yaml rewritten under a running stage: stop now, not after training
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._mlflow:
            self._call("log metrics", self._mlflow.log_metrics, clean, step=step)

    def dataset(self, name: str, source: str, digest: str, splits: dict[str, int], context: str = "training") -> None:
        """Record the data as an MLflow dataset input (the UI's Datasets column).

        `source`: the URL or file it came from; `digest`: its checksum (sha256, or the DVC md5);
        `splits`: split name -> number of examples. Only metadata is logged, nothing is hashed here.
        """
        if not self._mlflow:
            return

        def log():
            import warnings

            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            with warnings.catch_warnings():   # "can be interpreted in multiple ways": both are local files
                warnings.simplefilter("ignore", UserWarning)
                resolved = resolve_dataset_source(source)
            # MLflow stores at most 36 characters of digest; the full checksum goes in a tag.
            data = MetaDataset(resolved, name=name, digest=digest[:36])
            tags = {"checksum": digest, **{f"{split}_examples": str(int(n)) for split, n in splits.items()}}
            self._mlflow.log_input(data, context=context, tags=tags)
        self._call(f"log dataset {name}", log)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self._mlflow:
            self._call(f"log artifact {path}", self._whole, self._mlflow.log_artifact, str(path), folder)

    def _whole(self, fn, *args, **kwargs):
        """Run an artifact upload; if it fails (a full disk), remove what it left in a local store."""
        root = artifact_root() / self.experiment
        before = _tree(root) if not _is_server(tracking_uri()) else None
        try:
            return fn(*args, **kwargs)
        except BaseException:
            if before is not None:
                for path in sorted(_tree(root) - before, key=lambda p: len(p.parts), reverse=True):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
            raise

    def torch_model(self, model, input_example) -> None:
        if not self._mlflow:
            return
        import torch

        def log():
            import mlflow.pytorch
            # Explicit requirements: MLflow's own inference imports the world and takes minutes.
            mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        self._call("log model", self._whole, log)

    def run_info(self) -> dict:
        """What the report needs to link this run."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": self.experiment,
                "ui_path": f"#/experiments/{self.experiment_id}/runs/{self.run_id}" if self.run_id else "",
                "tracking_uri": _redact(tracking_uri()), "tracking_failed": redact(self.failure or ""),
                "data_source": self.tags["data_source"], "git_commit": self.commit}


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.is_dir() else set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark_stale_runs(uri: str, experiment_id: str, stage: str) -> None:
    """Runs of `stage` left RUNNING by a process of this machine that is gone (SIGKILL, a power cut,
    a full disk that stopped the store) are set KILLED, so the UI never shows them running for good.
    Runs of other machines are left alone: their process cannot be checked from here."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    host = socket.gethostname()
    stage_filter = stage.replace("'", "")
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.stage = '{stage_filter}'"):
        tags = run.data.tags
        if tags.get("host") == host and tags.get("pid", "").isdigit() and not _alive(int(tags["pid"])):
            client.set_tag(run.info.run_id, "stale", f"process {tags['pid']} ended without closing the run")
            client.set_terminated(run.info.run_id, status="KILLED")
            print(f"MLflow: run {run.info.run_id} of {stage} was left RUNNING by a process that is gone; "
                  "marked KILLED", file=sys.stderr)


def _redact(uri: str) -> str:
    """Drop user:password from an http(s) URI before it is written anywhere (other URIs, such as
    a SQLite path that contains '@', are left as they are)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

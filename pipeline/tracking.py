"""The one place that talks to MLflow (output files are written by `pipeline.outputs`).

Tracking must never cost a result: every MLflow call is guarded; after the first failure the run
goes on untracked, the stage still writes its DVC metrics, and the failure is printed loudly at
the start and again at the end.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from pipeline.paths import REPO_ROOT, main_repo_root

EXPERIMENTS = {"backprop": "part1-backprop", "mlp": "part2-forecasting", "cnn": "part3-classification"}

# Fail fast when a tracking server is down, instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store at the root of the user's repository."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Tracker:
    """One MLflow run for one stage or variant; use as a context manager.

    The run ends FINISHED on success, KILLED on SIGINT/SIGTERM, FAILED on any other error.
    """

    def __init__(self, family: str, run_name: str, data_source: str, extra_tags: dict | None = None):
        self.experiment = EXPERIMENTS[family]
        self.run_name = run_name
        self.tags = {"stage": run_name, "data_source": data_source, "git_commit": git_commit(),
                     "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **(extra_tags or {})}
        self.failure: str | None = None
        self.run_id = ""
        self.experiment_id = ""
        self._mlflow = None

    # -- guarded calls -------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        if self.failure or self._mlflow is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - tracking must not stop training
            self.failure = f"{what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"\n*** MLflow TRACKING FAILED ({_redact(tracking_uri())}) - {self.failure}\n"
                  "*** Training continues; DVC metrics files are still written.\n", file=sys.stderr)
            return None

    def __enter__(self):
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            import mlflow
        except ImportError as error:
            self.failure = f"import mlflow: {error}"
            return self
        self._mlflow = mlflow

        def start():
            mlflow.set_tracking_uri(tracking_uri())
            experiment = mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.run_name, tags=self.tags)
            self.run_id, self.experiment_id = run.info.run_id, experiment.experiment_id

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
                           "".join(traceback.format_exception_only(exc_type, exc))[-5000:])
            try:
                self._mlflow.end_run(status=status)
            except Exception as error:  # noqa: BLE001
                self.failure = self.failure or f"end run: {error}"
        if self.failure:
            print(f"\n*** MLflow TRACKING FAILED for {self.run_name}: {self.failure}\n"
                  f"*** Tracking URI: {_redact(tracking_uri())}. The DVC metrics files were written; the MLflow "
                  "run is missing or incomplete. Check the server (or unset MLFLOW_TRACKING_URI) and "
                  "re-run the stage with `dvc repro -f <stage>`.\n", file=sys.stderr)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return False

    # -- what stages log -----------------------------------------------------------------------
    def params(self, params: dict) -> None:
        if self._mlflow:
            self._call("log params", self._mlflow.log_params, {k: str(v)[:6000] for k, v in _flatten(params).items()})

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._mlflow:
            self._call("log metrics", self._mlflow.log_metrics, clean, step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self._mlflow:
            self._call(f"log artifact {path}", self._mlflow.log_artifact, str(path), folder)

    def torch_model(self, model, input_example) -> None:
        if not self._mlflow:
            return
        import torch

        def log():
            import mlflow.pytorch
            # Explicit requirements: MLflow's own inference imports the world and takes minutes.
            mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        self._call("log model", log)

    def run_info(self) -> dict:
        """What the report needs to link this run."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": self.experiment,
                "ui_path": f"#/experiments/{self.experiment_id}/runs/{self.run_id}" if self.run_id else "",
                "tracking_uri": _redact(tracking_uri()), "tracking_failed": self.failure or "",
                "data_source": self.tags["data_source"], "git_commit": self.tags["git_commit"]}


def _redact(uri: str) -> str:
    """Drop user:password from a URI before it is written anywhere."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

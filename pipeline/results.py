"""The output contract of the result-writing stages: which files each run writes, which keys each
must hold, and the one `write_results()` every stage calls.

Each run writes four JSON files beside each other:
- `<run>.json`, the headline: git-tracked (`cache: false`), what `dvc exp show` compares. It holds
  one number under a key that names the run (`backprop`: test accuracy, `default`: test MSE,
  `resnet18`: test AUC), so no two files share a key and DVC never prefixes a column with its file
  path: the whole headline of all three parts fits the first 200 columns of `dvc exp show`. A
  tiny number (the gradient check's 1e-09 error) stays in the details: `dvc metrics show` rounds
  to 5 decimals and would print it as 0.0.
- `<run>.details.json`: every number of the run (the headline's too, under its plain name: test_mse,
  test_auc, ...), what the report reads; `<run>.timing.json`: seconds and throughput (apart, so the
  results stay bit-identical between runs); `<run>.run.json`: the MLflow run and the data's identity.

dvc.yaml types the same paths (DVC needs them there); tests/unit/test_results_contract.py checks
that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.outputs import write_json
from pipeline.paths import METRICS, MODELS

# What the report reads from each family's details file: one lacking a key is a missing result.
DETAILS_KEYS = {
    "backprop": ("test_accuracy", "majority_baseline", "fd_threshold",
                 "autograd_threshold", "fd_max_rel_error", "autograd_max_rel_error", "epochs", "classes", "window",
                 "n_test"),
    "mlp": ("test_mse", "test_mae", "test_mse_std", "test_mae_std", "skill", "n_seeds", "window_norm",
            "n_test_windows"),
    "cnn": ("test_auc", "test_acc", "best_epoch"),
}
# The details key each family's headline holds, under the run's name.
HEADLINE_OF = {"backprop": "test_accuracy", "mlp": "test_mse", "cnn": "test_auc"}
# Keys of the data's identity in every run.json (`data`) and MLflow run (tags `data.<key>`).
DATA_KEYS = ("name", "title", "source", "size", "task", "channels", "sha256")

@dataclass(frozen=True)
class Results:
    """One run's result files: family `backprop` (run `backprop`), `mlp` (a variant) or `cnn` (an
    experiment or ablation)."""
    family: str
    run: str

    @property
    def _stem(self) -> Path:
        return METRICS / "backprop" if self.family == "backprop" else METRICS / self.family / self.run

    def _file(self, suffix: str) -> Path:
        return self._stem.with_name(self._stem.name + suffix)

    headline = property(lambda self: self._file(".json"))
    details = property(lambda self: self._file(".details.json"))
    timing = property(lambda self: self._file(".timing.json"))
    run_info = property(lambda self: self._file(".run.json"))

    @property
    def figures(self) -> Path:
        return Path("figures") / self.family / ("" if self.family == "backprop" else self.run)

    @property
    def model(self) -> Path | None:
        return {"mlp": MODELS / "mlp" / f"{self.run}.npz", "cnn": MODELS / "cnn" / f"{self.run}.pt"}.get(self.family)

    @property
    def curves(self) -> dict[str, Path]:
        """The plot files (DVC plots, one chart each)."""
        if self.family == "backprop":
            return {"train_loss": METRICS / "backprop" / "train_loss.csv",
                    "val_accuracy": METRICS / "backprop" / "val_accuracy.csv"}
        found = {"curves": METRICS / self.family / "curves" / f"{self.run}.csv"}
        if self.family == "cnn":
            found["confusion"] = METRICS / "cnn" / "confusion" / f"{self.run}.csv"
        return found

    @property
    def details_keys(self) -> tuple[str, ...]:
        return DETAILS_KEYS[self.family]

    def headline_of(self, details: dict) -> dict:
        """The headline, taken from the details (so the two never disagree)."""
        return {self.run: details[HEADLINE_OF[self.family]]}

    @property
    def headline_keys(self) -> tuple[str, ...]:
        return (self.run,)


def backprop() -> Results:
    return Results("backprop", "backprop")


def mlp(variant: str) -> Results:
    return Results("mlp", variant)


def cnn(name: str) -> Results:
    return Results("cnn", name)


def write_results(results: Results, details: dict, timing: dict, run_info: dict, data: dict) -> dict:
    """Write the run's four files (headline last: a file DVC compares exists only beside its
    details). `data`: the data's identity (DATA_KEYS). Returns the headline."""
    missing = [k for k in results.details_keys if k not in details]
    if missing:
        raise ValueError(f"{results.details}: the stage did not compute {', '.join(missing)} "
                         "(pipeline/results.py DETAILS_KEYS lists what the report reads)")
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"data identity: unknown keys {unknown}; pipeline/results.py DATA_KEYS lists them")
    headline = results.headline_of(details)   # its key is one of details_keys, checked above
    for key, value in headline.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{results.headline}: {key} is {value!r}, not a number")
    write_json(results.run_info, {**run_info, "data": data})
    write_json(results.timing, timing)
    write_json(results.details, details)
    write_json(results.headline, headline)
    return headline


def data_tags(data: dict) -> dict[str, str]:
    """The data's identity as MLflow tags: data.name, data.source, ... (searchable in the UI)."""
    return {f"data.{k}": str(v) for k, v in data.items()}

"""The write-up, rebuilt from the pipeline's own files: metrics/*.json, plot CSVs, figures/.

Every number comes from a file; the only typed-in numbers are the references in
references.yaml. Output: reports/report.md and a self-contained reports/report.html.
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import yaml

from pipeline import figures
from pipeline.data import images
from pipeline.params import Params

REFERENCES = Path(__file__).with_name("references.yaml")
OUT = Path("reports")
IMG = OUT / "img"

# What the tables read from each stage's files: a file lacking one of these is a missing result.
BACKPROP_HEADLINE = ("test_accuracy", "majority_baseline")
BACKPROP_DETAILS = ("fd_threshold", "autograd_threshold", "fd_max_rel_error", "autograd_max_rel_error", "epochs",
                    "classes", "window", "n_test")
MLP_HEADLINE = ("test_mse", "test_mae", "test_mse_std", "test_mae_std")   # seed means and spreads
MLP_DETAILS = ("n_seeds", "window_norm", "n_test_windows")
CNN_HEADLINE = ("test_auc", "test_acc")
CNN_DETAILS = ("best_epoch",)


def _skill(values: dict) -> str:
    """The MSE relative to the best naive forecast, as the MLP stage writes it."""
    return f"{values['skill']:.3f}" if isinstance(values.get("skill"), (int, float)) else "n/a"


class MissingResults(RuntimeError):
    """Some experiments have no metrics file (partial `dvc repro`)."""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def _img(src: Path, name: str) -> str:
    """Copy a figure next to the report and return its relative link."""
    IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, IMG / name)
    return f"img/{name}"


def _fmt(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _diff(ours, ref, digits=4) -> str:
    return "n/a" if ours is None or ref is None else f"{ours - ref:+.{digits}f}"


def _spread(mean, std, digits=4) -> str:
    """A seed mean with its spread: "0.4485 ± 0.0086" (the mean alone when the spread is unknown)."""
    return _fmt(mean, digits) + ("" if mean is None or std is None else f" ± {std:.{digits}f}")


def image_title(spec) -> str:
    """The image set's name as headings and tags spell it (ChestMNIST), as the CNN stage names it."""
    return images.ImageSet({}, {}, 0, spec.size, spec.source, spec.name).title


def image_task(spec) -> str:
    return spec.task or images.default_task(spec.name)


def ui_address(tracking_uri: str) -> str:
    """The MLflow UI's address: $MLFLOW_UI_URL, else the tracking server itself when it is one."""
    ui = os.environ.get("MLFLOW_UI_URL") or (tracking_uri if re.match(r"https?://", tracking_uri) else "")
    return re.sub(r"//[^/@]*@", "//", ui).rstrip("/")      # never a (redacted) login in a link


class Report:
    def __init__(self, params: Params):
        self.params = params
        self.refs = yaml.safe_load(REFERENCES.read_text())
        self.lines: list[str] = []
        self.missing: list[str] = []
        self.sources: dict[str, set[str]] = {}   # part -> the data sources its runs name
        self.devices: set[str] = set()
        self.synthetic: set[str] = set()

    def load(self, metrics: Path, part: str, headline=(), details=(), numbers=True) -> tuple[dict | None, dict]:
        """A stage's metrics (headline, details and timing merged) and run info. A missing file, or
        one lacking a key the tables read (`headline` in the file itself, `details` in it or its
        .details.json), goes into `missing`; a headline value that is not a number is an error
        (`numbers`: the headline holds only numbers)."""
        values = _read_json(metrics)
        run = _read_json(metrics.with_suffix(".run.json")) or {}
        if values is None:
            self.missing.append(str(metrics))
        else:
            self._require(metrics, values, headline, numbers)
            for extra in (".details.json", ".timing.json"):   # the stage's non-headline numbers
                values.update(_read_json(metrics.with_suffix(extra)) or {})
            self._require(metrics.with_suffix(".details.json"), values, details)
        if run.get("device"):
            self.devices.add(run["device"])
        if run.get("data_source"):
            self.sources.setdefault(part, set()).add(run["data_source"])
            if "synthetic" in run["data_source"]:
                self.synthetic.add(run["data_source"])
        return values, run

    def _require(self, path: Path, values: dict, keys, numbers=False) -> None:
        for key in keys:
            value = values.get(key)
            if value is None:
                self.missing.append(f"{path} (no {key})")
            elif numbers and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}: {key} is {value!r}, not a number; rerun the stage that writes it")

    @staticmethod
    def run_link(run: dict) -> str:
        """A link to the run in the MLflow UI when its address is known, else the run id and UI path."""
        if not run.get("run_id"):
            return "no MLflow run" + (f" ({run['tracking_failed']})" if run.get("tracking_failed") else "")
        ui = ui_address(run.get("tracking_uri", ""))
        if ui:
            return f"[`{run['run_id'][:8]}`]({ui}/{run['ui_path']})"
        return f"`{run['run_id'][:8]}` (`{run['ui_path']}`)"

    @staticmethod
    def mark(run: dict, dataset: str = "") -> str:
        """⚠ on a row whose run used synthetic data, or another data set than params name (stale files)."""
        source = run.get("data_source", "")
        if source and dataset and not source.startswith(dataset):
            return f" ⚠ ran on {source}"
        return " ⚠ synthetic" if "synthetic" in source else ""

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    # -- part 1 --------------------------------------------------------------------------------
    def part1(self) -> None:
        self.add("## Part 1: backpropagation, made executable", "")
        values, run = self.load(Path("metrics/backprop.json"), "part 1", BACKPROP_HEADLINE, BACKPROP_DETAILS)
        if values is None or any(values.get(k) is None for k in (*BACKPROP_HEADLINE, *BACKPROP_DETAILS)):
            self.add("*Missing: `metrics/backprop.json` or some of its numbers (stage `backprop`).*", "")
            return
        self.add("Largest relative error of the hand-written gradients, per parameter "
                 f"(finite differences in float64, threshold {values['fd_threshold']:g}; torch autograd, "
                 f"threshold {values['autograd_threshold']:g}):", "",
                 "| parameter | finite differences | torch autograd |", "|---|---|---|")
        for name, fd in values["fd_max_rel_error"].items():
            self.add(f"| {name} | {fd:.2e} | {values['autograd_max_rel_error'][name]:.2e} |")
        self.add("", f"Training with plain SGD ({values['epochs']} epochs, K = {values['classes']} classes, "
                 f"L = {values['window']}): test accuracy **{values['test_accuracy']:.4f}** against the "
                 f"majority-class baseline {values['majority_baseline']:.4f} "
                 f"(margin {values['test_accuracy'] - values['majority_baseline']:+.4f}; "
                 f"{values['n_test']} test windows). MLflow run: {self.run_link(run)}.", "")
        loss_csv = Path("metrics/backprop/train_loss.csv")
        if loss_csv.exists():
            data = _read_csv(loss_csv)
            path = figures.curves({"train loss": (data["step"], data["train_loss"])}, "Part 1: training loss",
                                  "step", "cross-entropy", IMG / "backprop_loss.png", smoothing=0.6)
            self.add(f"![Part 1 training loss]({path.relative_to(OUT)})", "")

    # -- part 2 --------------------------------------------------------------------------------
    def part2(self) -> None:
        refs = self.refs["mlp"]
        ett = self.params.data.ett
        has_refs = ett.name == refs["dataset"]   # the reference numbers are ETTh1's
        self.add(f"## Part 2: MLP forecaster on {ett.name} (numpy, hand-written backprop)", "")
        variants = self.params.mlp_variants()
        results = {v: self.load(Path(f"metrics/mlp/{v}.json"), "part 2", MLP_HEADLINE, MLP_DETAILS) for v in variants}
        self.add(f"Test MSE and MAE on {ett.name} (target {ett.target}, standardised): the mean ± sample std over "
                 "`seeds` training seeds; `window_norm` is the per-window normalisation chosen on validation. "
                 + (f"References ({refs['dataset']}): {refs['source']}; Δ = our mean − reference." if has_refs else
                    f"No reference values exist for {ett.name}: our numbers alone."), "")
        naive = next((values for values, _ in results.values() if values and "repeat_last_mse" in values), None)
        self.add("skill = the model's test MSE / the best naive forecast's (repeat-last or window mean) on the "
                 "same windows: below 1 the model beats both."
                 + (" Baselines on the test windows (MSE / MAE): " + "; ".join(
                     f"{label} {naive[f'{key}_mse']:.4f} / {naive[f'{key}_mae']:.4f}"
                     for key, label in (("repeat_last", "repeat-last"), ("window_mean", "window mean"),
                                        ("linear", "least-squares linear")) if f"{key}_mse" in naive) + "."
                    if naive else ""), "")
        ours = "our " if has_refs else ""
        for title, key in (("Table 1: learning rate", "learning_rate"), ("Table 2: hidden size", "hidden_size")):
            head = ["variant", "our lr / hidden", "assignment setting", "seeds", "window_norm", f"{ours}MSE",
                    f"{ours}MAE", "skill"] + (["ref MSE", "ref MAE", "ΔMSE", "ΔMAE"] if has_refs else []) + \
                   ["test windows", "MLflow run"]
            self.add(f"### {title} on {ett.name}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|")
            for variant, ref in refs[key].items():
                if variant not in results:
                    continue
                values, run = results[variant]
                cfg, v = self.params.mlp_variant(variant), values or {}
                cells = [f"mlp@{variant}{self.mark(run, ett.name + ' ')}", f"{cfg.lr:g} / {cfg.hidden}", ref["label"],
                         str(v.get("n_seeds", "n/a")), str(v.get("window_norm", "n/a")),
                         _spread(v.get("test_mse"), v.get("test_mse_std")),
                         _spread(v.get("test_mae"), v.get("test_mae_std")), _skill(v)]
                if has_refs:
                    cells += [f"{ref['mse']:.4f}", f"{ref['mae']:.4f}", _diff(v.get("test_mse"), ref["mse"]),
                              _diff(v.get("test_mae"), ref["mae"])]
                cells += [str(v.get("n_test_windows", "n/a")), self.run_link(run)]
                self.add("| " + " | ".join(cells) + " |")
            self.add("")
        others = [v for v in variants if v not in refs["learning_rate"] and v not in refs["hidden_size"]]
        if others:
            self.add("Other variants (see params.yaml):", "", "| variant | seeds | window_norm | MSE | MAE | skill | "
                     "best epoch | seconds | MLflow run |", "|---" * 9 + "|")
            for variant in others:
                values, run = results[variant]
                v = values or {}
                self.add(f"| mlp@{variant}{self.mark(run, ett.name + ' ')} | {v.get('n_seeds', 'n/a')} | {v.get('window_norm', 'n/a')} | "
                         f"{_spread(v.get('test_mse'), v.get('test_mse_std'))} | "
                         f"{_spread(v.get('test_mae'), v.get('test_mae_std'))} | {_skill(v)} | "
                         f"{v.get('best_epoch', 'n/a')} | "
                         f"{v.get('train_seconds', 'n/a')} | {self.run_link(run)} |")
            self.add("")
        losses = {v: (values or {}).get("window_norm_val_loss") for v, (values, _) in results.items()}
        if any(losses.values()):
            self.add("Window normalisation per variant: the one kept, and each candidate's best validation loss "
                     "(first seed; the lowest is kept when `window_norm: auto`):", "")
            for variant, loss in losses.items():
                if loss:
                    chosen = (results[variant][0] or {}).get("window_norm", "n/a")
                    self.add(f"- mlp@{variant}: **{chosen}** ("
                             + ", ".join(f"{norm} {value:.4f}" for norm, value in loss.items()) + ")")
            self.add("")
        if has_refs:
            pub = refs["published"]
            self.add(f"Published results ({pub['source']}): "
                     + "; ".join(f"{r['model']} {r['mse']:.3f} / {r['mae']:.3f}" for r in pub["rows"]) + ".", "")
        self.add("### Loss curves", "", "Raw (faint) and smoothed with factor 0.6 (solid).", "")
        for variant in variants:
            curve = Path(f"metrics/mlp/curves/{variant}.csv")
            if not curve.exists():
                continue
            data = _read_csv(curve)
            path = figures.curves({k: (data["epoch"], data[k]) for k in ("train_loss", "valid_loss")},
                                  f"mlp@{variant} on {ett.name}: train / valid loss", "epoch", "MSE",
                                  IMG / f"mlp_{variant}_loss.png", smoothing=0.6)
            self.add(f"![mlp@{variant} loss]({path.relative_to(OUT)})")
        self.add("", f"### Test predictions ({ett.name}, {ett.target} channel, default variant)", "")
        for label in ("good", "median", "bad"):
            src = Path(f"figures/mlp/default/prediction_{label}.png")
            if src.exists():
                self.add(f"![{label} prediction]({_img(src, f'mlp_default_{label}.png')})")
            else:
                self.missing.append(str(src))
        self.add("")

    # -- part 3 --------------------------------------------------------------------------------
    def part3(self) -> None:
        refs = self.refs["cnn"]
        spec = self.params.data.images
        title, size = image_title(spec), spec.size
        has_refs = spec.name == refs["dataset"]   # the reference numbers are PathMNIST's
        self.add(f"## Part 3: CNNs on {title} ({size} px)", "")
        names = self.params.cnn_experiments()
        results = {n: self.load(Path(f"metrics/cnn/{n}.json"), "part 3", CNN_HEADLINE, CNN_DETAILS) for n in names}
        multi_label = image_task(spec) == images.MULTI_LABEL or \
            any("per_label" in (values or {}) for values, _ in results.values())
        note = f"Test AUC and ACC on {title} at {size} px, as MedMNIST's evaluator scores a " \
               f"{'multi-label' if multi_label else image_task(spec)} set. "
        if has_refs:
            note += f"References ({refs['dataset']}, {refs['size']} px): {refs['source']}; Δ = ours − reference."
            if size != refs["size"]:
                note += f" The references were measured at {refs['size']} px, these runs at {size} px."
        else:
            note += f"No reference values exist for {title}: our numbers alone."
        self.add(note, "")

        def row(name, ref, published):
            values, run = results.get(name, (None, {}))
            v = values or {}
            label = ref["label"]
            if "ImageNet" in label and not self.params.cnn_experiment(name).pretrained:   # e.g. offline
                label += " ⚠ trained from scratch here (pretrained: false)"
            cells = [f"{name}{self.mark(run, f'{title} {size}px ')}", label, _fmt(v.get("test_auc"), 3), _fmt(v.get("test_acc"), 3)]
            if has_refs:
                cells += [f"{ref['auc']:.3f}", f"{ref['acc']:.3f}", _diff(v.get("test_auc"), ref["auc"], 3),
                          _diff(v.get("test_acc"), ref["acc"], 3)]
                if published:
                    cells.append(ref.get("published") or "—")
            cells += [str(v.get("best_epoch", "n/a")), _fmt(v.get("train_seconds"), 1),
                      _fmt(v.get("images_per_second"), 0), self.run_link(run)]
            self.add("| " + " | ".join(cells) + " |")

        def head(published):
            cols = ["run", "experiment"] + (["our AUC", "our ACC", "ref AUC", "ref ACC", "ΔAUC", "ΔACC"]
                                            if has_refs else ["AUC", "ACC"])
            cols += ["published (AUC / ACC)"] if has_refs and published else []
            cols += ["best epoch", "train s", "images/s", "MLflow run"]
            return ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]

        for table, key, published in (("Table 3: training strategies (model B)", "strategies", False),
                                      ("Table 4: from scratch vs fine-tuned", "models", True)):
            self.add(f"### {table} on {title} {size} px", "", *head(published))
            for name, ref in refs[key].items():
                if name in results:
                    row(name, ref, published)
            self.add("")
        self.add("### Curves (train loss, validation AUC, validation ACC against iterations)", "")
        base = "densenet121"
        groups = {"Model A vs model B": ["resnet18", base]}
        groups.update({f"{name} vs B": [base, name] for name in names if name not in ("resnet18", base)})
        for group, members in groups.items():
            curves = {m: _read_csv(Path(f"metrics/cnn/curves/{m}.csv")) for m in members
                      if Path(f"metrics/cnn/curves/{m}.csv").exists()}
            if not curves:
                continue
            for key, label in (("train_loss", "train loss"), ("val_auc", "validation AUC"), ("val_acc", "validation ACC")):
                series = {m: (c["step"][~np.isnan(c[key])], c[key][~np.isnan(c[key])]) for m, c in curves.items()}
                slug = re.sub(r"\W+", "_", f"{group}_{key}").lower()
                path = figures.curves(series, f"{group} ({title} {size} px): {label}", "iteration", label,
                                      IMG / f"cnn_{slug}.png")
                self.add(f"![{group} {label}]({path.relative_to(OUT)})")
            self.add("")
        src = Path("figures/features/feature_maps.png")
        self.add("### Feature maps of ResNet-18", "")
        if src.exists():
            self.add(f"![feature maps]({_img(src, 'feature_maps.png')})", "")
        else:
            self.missing.append(str(src))
        if multi_label:   # a confusion matrix over label sets would mean nothing
            self.add("### Per-label test outcomes (multi-label)", "",
                     f"{title} is multi-label, so there is no confusion matrix: each run's per-label positives, "
                     "predicted positives, AUC and ACC are in `metrics/cnn/<run>.details.json` (`per_label`) and "
                     "drawn in `figures/cnn/<run>/confusion.png`:", "")
        else:
            self.add("### Confusion matrices (test split)", "")
        for name in names:
            src = Path(f"figures/cnn/{name}/confusion.png")
            if src.exists():
                alt = "per-label outcomes" if multi_label else "confusion"
                self.add(f"![{name} {alt}]({_img(src, f'confusion_{name}.png')})")
        self.add("")

    # -- whole document ------------------------------------------------------------------------
    def build(self, commit: str) -> str:
        if OUT.exists():
            shutil.rmtree(OUT)
        IMG.mkdir(parents=True)
        self.part1()
        self.part2()
        self.part3()
        body = self.lines
        self.lines = []
        self.add("# Deep-learning assignment, reproduced", "")
        if self.synthetic:
            self.add("> **⚠ SYNTHETIC DATA.** Some results below come from a generated stand-in ("
                     + "; ".join(sorted(self.synthetic)) + "), not the real data set; rows marked ⚠ synthetic "
                     "are not comparable to the reference values.", "")
        if self.missing:
            self.add("> **Missing results:** " + ", ".join(f"`{m}`" for m in self.missing), "")
        self.add(f"- git commit: `{commit}`", f"- built: {datetime.date.today().isoformat()}",
                 f"- devices: {', '.join(sorted(self.devices)) or 'cpu (numpy)'}")
        for part, sources in self.sources.items():
            self.add(f"- data, {part}: {'; '.join(sorted(sources))}")
        self.add("- reference values: `pipeline/report/references.yaml` (with their sources)", "")
        return "\n".join(self.lines + body) + "\n"


def to_html(markdown_text: str, base: Path) -> str:
    """One self-contained HTML file: images inlined as data URIs, no external resources."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])

    def inline(match):
        data = base64.b64encode((base / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(img/[^"]+\.png)"', inline, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #bbb;padding:3px 7px}"
             "th{background:#eee}img{max-width:100%;margin:4px 0}blockquote{background:#fff3cd;border-left:5px solid "
             "#e0a800;margin:1em 0;padding:0.5em 1em}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Assignment report</title>'
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")

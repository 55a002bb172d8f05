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
from pipeline.params import Params

REFERENCES = Path(__file__).with_name("references.yaml")
OUT = Path("reports")
IMG = OUT / "img"


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
        self.sources: dict[str, str] = {}
        self.devices: set[str] = set()
        self.synthetic = False

    def load(self, metrics: Path) -> tuple[dict | None, dict]:
        """A stage's metrics and run info; records missing files and synthetic sources."""
        values = _read_json(metrics)
        run = _read_json(metrics.with_suffix(".run.json")) or {}
        if values is None:
            self.missing.append(str(metrics))
        else:
            for extra in (".details.json", ".timing.json"):   # the stage's non-headline numbers
                values.update(_read_json(metrics.with_suffix(extra)) or {})
        if run.get("device"):
            self.devices.add(run["device"])
        if "synthetic" in run.get("data_source", ""):
            self.synthetic = True
        return values, run

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
    def mark(run: dict) -> str:
        return " ⚠ synthetic" if "synthetic" in run.get("data_source", "") else ""

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    # -- part 1 --------------------------------------------------------------------------------
    def part1(self) -> None:
        self.add("## Part 1: backpropagation, made executable", "")
        values, run = self.load(Path("metrics/backprop.json"))
        if values is None:
            self.add("*Missing: `metrics/backprop.json` (stage `backprop` has not run).*", "")
            return
        self.sources["ETT windows (part 1)"] = run.get("data_source", "?")
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
        self.add("## Part 2: MLP forecaster on ETT (numpy, hand-written backprop)", "")
        variants = self.params.mlp_variants()
        results = {v: self.load(Path(f"metrics/mlp/{v}.json")) for v in variants}
        for v, (_, run) in results.items():
            if run.get("data_source"):
                self.sources["ETT (part 2)"] = run["data_source"]
        for title, key in (("Table 1: learning rate", "learning_rate"), ("Table 2: hidden size", "hidden_size")):
            self.add(f"### {title}", "", "| variant | our lr / hidden | reference setting | our MSE | our MAE | "
                     "ref MSE | ref MAE | ΔMSE | ΔMAE | test windows | MLflow run |", "|---|---|---|---|---|---|---|---|---|---|---|")
            for variant, ref in refs[key].items():
                values, run = results.get(variant, (None, {}))
                if variant not in results:
                    continue
                cfg = self.params.mlp_variant(variant)
                v = values or {}
                self.add(f"| mlp@{variant}{self.mark(run)} | {cfg.lr:g} / {cfg.hidden} | {ref['label']} | "
                         f"{_fmt(v.get('test_mse'))} | {_fmt(v.get('test_mae'))} | {ref['mse']:.4f} | "
                         f"{ref['mae']:.4f} | {_diff(v.get('test_mse'), ref['mse'])} | "
                         f"{_diff(v.get('test_mae'), ref['mae'])} | {v.get('n_test_windows', 'n/a')} | "
                         f"{self.run_link(run)} |")
            self.add("")
        others = [v for v in variants if v not in refs["learning_rate"] and v not in refs["hidden_size"]]
        if others:
            self.add("Other variants (see params.yaml):", "", "| variant | MSE | MAE | best epoch | seconds | MLflow run |",
                     "|---|---|---|---|---|---|")
            for variant in others:
                values, run = results[variant]
                v = values or {}
                self.add(f"| mlp@{variant}{self.mark(run)} | {_fmt(v.get('test_mse'))} | {_fmt(v.get('test_mae'))} | "
                         f"{v.get('best_epoch', 'n/a')} | {v.get('train_seconds', 'n/a')} | {self.run_link(run)} |")
            self.add("")
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
                                  f"mlp@{variant}: train / valid loss", "epoch", "MSE", IMG / f"mlp_{variant}_loss.png",
                                  smoothing=0.6)
            self.add(f"![mlp@{variant} loss]({path.relative_to(OUT)})")
        self.add("", "### Test predictions (OT channel, default variant)", "")
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
        self.add("## Part 3: CNNs on PathMNIST", "")
        names = self.params.cnn_experiments()
        results = {n: self.load(Path(f"metrics/cnn/{n}.json")) for n in names}
        for n, (_, run) in results.items():
            if run.get("data_source"):
                self.sources["PathMNIST (part 3)"] = run["data_source"]

        def row(name, ref, published=None):
            values, run = results.get(name, (None, {}))
            v = values or {}
            cells = [f"{name}{self.mark(run)}", ref["label"], _fmt(v.get("test_auc"), 3), _fmt(v.get("test_acc"), 3),
                     f"{ref['auc']:.3f}", f"{ref['acc']:.3f}", _diff(v.get("test_auc"), ref["auc"], 3),
                     _diff(v.get("test_acc"), ref["acc"], 3)]
            if published is not None:
                cells.append(published or "—")
            cells += [str(v.get("best_epoch", "n/a")), _fmt(v.get("train_seconds"), 1),
                      _fmt(v.get("images_per_second"), 0), self.run_link(run)]
            self.add("| " + " | ".join(cells) + " |")

        head = "| run | experiment | our AUC | our ACC | ref AUC | ref ACC | ΔAUC | ΔACC |"
        tail = " best epoch | train s | images/s | MLflow run |"
        self.add("### Table 3: training strategies (model B)", "", head + tail, "|---" * 12 + "|")
        for name, ref in refs["strategies"].items():
            if name in results:
                row(name, ref)
        self.add("", "### Table 4: from scratch vs fine-tuned", "", head + " published (AUC / ACC) |" + tail,
                 "|---" * 13 + "|")
        for name, ref in refs["models"].items():
            if name in results:
                row(name, ref, ref.get("published", ""))
        self.add("")
        self.add("### Curves (train loss, validation AUC, validation ACC against iterations)", "")
        base = "densenet121"
        groups = {"Model A vs model B": ["resnet18", base]}
        groups.update({f"{name} vs B": [base, name] for name in names if name not in ("resnet18", base)})
        for title, members in groups.items():
            curves = {m: _read_csv(Path(f"metrics/cnn/curves/{m}.csv")) for m in members
                      if Path(f"metrics/cnn/curves/{m}.csv").exists()}
            if not curves:
                continue
            for key, label in (("train_loss", "train loss"), ("val_auc", "validation AUC"), ("val_acc", "validation ACC")):
                series = {m: (c["step"][~np.isnan(c[key])], c[key][~np.isnan(c[key])]) for m, c in curves.items()}
                slug = re.sub(r"\W+", "_", f"{title}_{key}").lower()
                path = figures.curves(series, f"{title}: {label}", "iteration", label, IMG / f"cnn_{slug}.png")
                self.add(f"![{title} {label}]({path.relative_to(OUT)})")
            self.add("")
        src = Path("figures/features/feature_maps.png")
        self.add("### Feature maps of ResNet-18", "")
        if src.exists():
            self.add(f"![feature maps]({_img(src, 'feature_maps.png')})", "")
        else:
            self.missing.append(str(src))
        self.add("### Confusion matrices (test split)", "")
        for name in names:
            src = Path(f"figures/cnn/{name}/confusion.png")
            if src.exists():
                self.add(f"![{name} confusion]({_img(src, f'confusion_{name}.png')})")
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
            self.add("> **⚠ SYNTHETIC DATA.** Some results below come from the generated stand-in for "
                     "PathMNIST, not the real data set; rows marked ⚠ synthetic are not comparable to the "
                     "reference values.", "")
        if self.missing:
            self.add("> **Missing results:** " + ", ".join(f"`{m}`" for m in self.missing), "")
        self.add(f"- git commit: `{commit}`", f"- built: {datetime.date.today().isoformat()}",
                 f"- devices: {', '.join(sorted(self.devices)) or 'cpu (numpy)'}")
        for name, source in self.sources.items():
            self.add(f"- data, {name}: {source}")
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

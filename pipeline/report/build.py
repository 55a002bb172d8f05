"""The write-up, rebuilt from the pipeline's own files: metrics/*.json, plot CSVs, figures/.

Every number comes from a file; the only typed-in numbers are the references in
references.yaml. Output: reports/report.md and a self-contained reports/report.html. The files and
keys each stage writes are pipeline/results.py's; the data a run used is read from its run.json
(`data`: name, source, size, task, ...), never parsed from a display string.

Nothing here reads the environment: the stage may be restored from DVC's run-cache, so anything
that depends on where the report is viewed (the MLflow UI's address) is settled in the browser.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline import figures, results as R
from pipeline.models.registry import MODEL_A, MODEL_B, MODELS
from pipeline.outputs import copy_file, fresh_dir
from pipeline.params import Params
from pipeline.paths import REPORTS

REFERENCES = Path(__file__).with_name("references.yaml")
OUT = REPORTS
IMG = OUT / "img"
# Where run links point unless the page is opened as report.html?mlflow=<the UI's address> (or the
# run was logged to an http tracking server): `mlflow ui`'s default address.
DEFAULT_UI = "http://127.0.0.1:5000"


def _skill(values: dict) -> str:
    """The MSE relative to the best naive forecast, as the MLP stage writes it."""
    return f"{values['skill']:.3f}" if isinstance(values.get("skill"), (int, float)) else "n/a"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """A curve file's columns as float arrays (an empty cell is NaN: a metric not logged that step)."""
    frame = pd.read_csv(path)
    return {k: frame[k].to_numpy(dtype=float) for k in frame.columns}


def _img(src: Path, name: str) -> str:
    """Copy a figure next to the report and return its relative link."""
    copy_file(src, IMG / name)
    return f"img/{name}"


def _fmt(value, digits=4) -> str:
    """Fixed decimals, but significant digits for a small number (0.00032, not 0.0003 or 0.0000)."""
    if value is None:
        return "n/a"
    if value and abs(value) < 10 ** -(digits - 2):
        return f"{value:.{max(digits - 2, 2)}g}"
    return f"{value:.{digits}f}"


def _diff(ours, ref, digits=4) -> str:
    return "n/a" if ours is None or ref is None else f"{ours - ref:+.{digits}f}"


def _spread(mean, std, digits=4) -> str:
    """A seed mean with its spread in two significant digits: "0.4485 ± 0.0086", "0.4485 ± 0.00032"
    (the mean alone when the spread is unknown)."""
    return _fmt(mean, digits) + ("" if mean is None or std is None else f" ± {std:.2g}")


def ui_address(tracking_uri: str) -> str:
    """The MLflow UI's address: the tracking server itself when it is one, else `mlflow ui`'s default
    (the page rewrites it when opened as report.html?mlflow=<address>)."""
    ui = tracking_uri if re.match(r"https?://", tracking_uri) else DEFAULT_UI
    return re.sub(r"//[^/@]*@", "//", ui).rstrip("/")      # never a (redacted) login in a link


def data_label(data: dict) -> str:
    """A run's data for people: "ETTh1 (real)", "PathMNIST 64px (synthetic)"."""
    if not data:
        return ""
    size = f" {data['size']}px" if data.get("size") else ""
    return f"{data.get('title') or data.get('name', '?')}{size} ({data.get('source', '?')})"


class Report:
    def __init__(self, params: Params):
        self.params = params
        self.refs = yaml.safe_load(REFERENCES.read_text())
        self.lines: list[str] = []
        self.missing: list[str] = []
        self.sources: dict[str, set[str]] = {}   # part -> the data sources its runs name
        self.devices: set[str] = set()
        self.synthetic: set[str] = set()

    def load(self, out: R.Results, part: str) -> tuple[dict | None, dict]:
        """A run's numbers (details and timing) and run info. A missing headline file, or details
        lacking a key the tables read (pipeline/results.py), goes into `missing`; a headline or
        details value the tables read that is not a number is an error."""
        headline = _read_json(out.headline)
        run = _read_json(out.run_info) or {}
        values = None
        if headline is None:
            self.missing.append(str(out.headline))
        else:
            self._require(out.headline, headline, out.headline_keys, numbers=True)
            values = {**(_read_json(out.details) or {}), **(_read_json(out.timing) or {})}
            self._require(out.details, values, out.details_keys,
                          numbers=[k for k in out.details_keys if k.startswith("test_")])
        if run.get("device"):
            self.devices.add(run["device"])
        data = run.get("data") or {}
        if data:
            self.sources.setdefault(part, set()).add(data_label(data))
            if data.get("source") == "synthetic":
                self.synthetic.add(data_label(data))
        return values, run

    def _require(self, path: Path, values: dict, keys, numbers) -> None:
        for key in keys:
            value = values.get(key)
            if value is None:
                self.missing.append(f"{path} (no {key})")
            elif (numbers is True or key in (numbers or ())) and \
                    (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}: {key} is {value!r}, not a number; rerun the stage that writes it")

    @staticmethod
    def run_link(run: dict) -> str:
        """A link to the run in the MLflow UI (see DEFAULT_UI; report.html?mlflow=<address> repoints it)."""
        if not run.get("run_id"):
            return "no MLflow run" + (f" ({run['tracking_failed']})" if run.get("tracking_failed") else "")
        return f"[`{run['run_id'][:8]}`]({ui_address(run.get('tracking_uri', ''))}/{run['ui_path']})"

    @staticmethod
    def mark(run: dict, expected: dict | None = None) -> str:
        """⚠ on a row whose run used synthetic data, or another data set than params name (stale
        files): `expected` holds the identity fields params fix (name, size)."""
        data = run.get("data") or {}
        if data and any(data.get(k) != v for k, v in (expected or {}).items()):
            return f" ⚠ ran on {data_label(data)}"
        return " ⚠ synthetic" if data.get("source") == "synthetic" else ""

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    # -- part 1 --------------------------------------------------------------------------------
    def part1(self) -> None:
        self.add("## Part 1: backpropagation, made executable", "")
        out = R.backprop()
        values, run = self.load(out, "part 1")
        if values is None or any(values.get(k) is None for k in out.details_keys):
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
        loss_csv = out.curves["train_loss"]
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
        results = {v: self.load(R.mlp(v), "part 2") for v in variants}
        self.add(f"Test MSE and MAE on {ett.name} (target {ett.target}, standardised): the mean ± sample std over "
                 "`seeds` training seeds; `window_norm` is the per-window normalisation chosen on validation. "
                 + (f"References ({refs['dataset']}): {refs['source']}; Δ = our mean − reference." if has_refs else
                    f"No reference values exist for {ett.name}: our numbers alone."), "")
        naive = next((values for values, _ in results.values() if values and "repeat_last_mse" in values), None)
        self.add("skill = the model's test MSE / the best naive forecast's (repeat-last or window mean) on the "
                 "same windows: below 1 the model beats both."
                 + (" Baselines on the test windows (MSE / MAE): " + "; ".join(
                     f"{label} {_fmt(naive[f'{key}_mse'])} / {_fmt(naive[f'{key}_mae'])}"
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
                cells = [f"mlp@{variant}{self.mark(run, {'name': ett.name})}", f"{cfg.lr:g} / {cfg.hidden}", ref["label"],
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
                self.add(f"| mlp@{variant}{self.mark(run, {'name': ett.name})} | {v.get('n_seeds', 'n/a')} | {v.get('window_norm', 'n/a')} | "
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
                             + ", ".join(f"{norm} {_fmt(value)}" for norm, value in loss.items()) + ")")
            self.add("")
        checks = {v: (values or {}).get("cross_check") for v, (values, _) in results.items()}
        if any(checks.values()):
            self.add("Trained MLPs or their ridge base, per variant (`cross_check`): early stopping's pick on each "
                     "half of the validation windows scored on the other half, seed mean; the MLPs are kept only "
                     "when that beats the base scored the same way:", "")
            for variant, check in checks.items():
                if check:
                    self.add(f"- mlp@{variant}: **{check['kept']}** (trained MLPs {_fmt(check['trained'])}, "
                             f"base {_fmt(check['base'])})")
            self.add("")
        if has_refs:
            pub = refs["published"]
            self.add(f"Published results ({pub['source']}): "
                     + "; ".join(f"{r['model']} {r['mse']:.3f} / {r['mae']:.3f}" for r in pub["rows"]) + ".", "")
        self.add("### Loss curves", "", "Raw (faint) and smoothed with factor 0.6 (solid).", "")
        for variant in variants:
            curve = R.mlp(variant).curves["curves"]
            if not curve.exists():
                continue
            data = _read_csv(curve)
            path = figures.curves({k: (data["epoch"], data[k]) for k in ("train_loss", "valid_loss")},
                                  f"mlp@{variant} on {ett.name}: train / valid loss", "epoch", "MSE",
                                  IMG / f"mlp_{variant}_loss.png", smoothing=0.6)
            self.add(f"![mlp@{variant} loss]({path.relative_to(OUT)})")
        self.add("", f"### Test predictions ({ett.name}, {ett.target} channel, default variant)", "")
        for label in ("good", "median", "bad"):
            src = R.mlp("default").figures / f"prediction_{label}.png"
            if src.exists():
                self.add(f"![{label} prediction]({_img(src, f'mlp_default_{label}.png')})")
            else:
                self.missing.append(str(src))
        self.add("")

    # -- part 3 --------------------------------------------------------------------------------
    def part3(self) -> None:
        refs = self.refs["cnn"]
        spec = self.params.data.images
        size = spec.size
        has_refs = spec.name == refs["dataset"]   # the reference numbers are PathMNIST's
        names = self.params.cnn_experiments()
        results = {n: self.load(R.cnn(n), "part 3") for n in names}
        # The set's spelling (ChestMNIST) and task, as the runs on the data params name recorded them.
        ran = [run["data"] for _, run in results.values()
               if (run.get("data") or {}).get("name") == spec.name and run["data"].get("size") == size]
        title = next((d["title"] for d in ran if d.get("title")), spec.name)
        task = spec.task or next((d["task"] for d in ran if d.get("task")), "")
        self.add(f"## Part 3: CNNs on {title} ({size} px)", "")
        multi_label = task.startswith("multi-label") or \
            any("per_label" in (values or {}) for values, _ in results.values())
        note = f"Test AUC and ACC on {title} at {size} px, as MedMNIST's evaluator scores a " \
               f"{'multi-label' if multi_label else task or 'classification'} set. "
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
            cells = [f"{name}{self.mark(run, {'name': spec.name, 'size': size})}", label, _fmt(v.get("test_auc"), 3),
                     _fmt(v.get("test_acc"), 3)]
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
        groups = {"Model A vs model B": [MODEL_A, MODEL_B]}
        groups.update({f"{name} vs B": [MODEL_B, name] for name in names if name not in (MODEL_A, MODEL_B)})
        for group, members in groups.items():
            curves = {m: _read_csv(R.cnn(m).curves["curves"]) for m in members if R.cnn(m).curves["curves"].exists()}
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
        self.add(f"### Feature maps of {MODELS[MODEL_A].title}", "")   # what stages/features.py draws
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
            src = R.cnn(name).figures / "confusion.png"
            if src.exists():
                alt = "per-label outcomes" if multi_label else "confusion"
                self.add(f"![{name} {alt}]({_img(src, f'confusion_{name}.png')})")
        self.add("")

    # -- whole document ------------------------------------------------------------------------
    def build(self, commit: str) -> str:
        fresh_dir(IMG.parent)   # nothing stale from an earlier build survives
        IMG.mkdir()
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


# Run links are settled where the report is viewed, not when it is built (a run-cache restore
# rebuilds nothing): report.html?mlflow=http://host:port points every MLflow run link there.
VIEW_TIME_LINKS = (
    "(function(){var ui=new URLSearchParams(location.search).get('mlflow');"
    "if(!ui||!/^https?:\\/\\//.test(ui))return;ui=ui.replace(/\\/+$/,'');"
    "document.querySelectorAll('a[href*=\"#/experiments/\"]').forEach(function(a){"
    "var h=a.getAttribute('href');a.href=ui+'/'+h.slice(h.indexOf('#/experiments/'));});})();")


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
            f"<style>{style}</style></head><body>\n{body}\n<script>{VIEW_TIME_LINKS}</script>\n</body></html>\n")

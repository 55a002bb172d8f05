"""Progress for long work, readable in a terminal and in a captured log (DVC, CI).

- `bar(...)`: a tqdm bar. In a terminal it redraws in place (throttled); when stderr is not a
  terminal it prints a plain line every `LOG_INTERVAL_S` seconds instead (no carriage returns).
  `TQDM_DISABLE=1` turns every bar off.
- `epoch_line(...)`: one summary line per epoch on stdout, flushed. It stays even with
  `TQDM_DISABLE=1`: it is the log's record of the run (one short line per epoch), not a bar.
- `project(...)` / `projection_message(...)`: the projected wall time of a stage, printed before
  the work, with the ways out when it is over an hour on a CPU.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

LOG_INTERVAL_S = 30.0     # captured output: one plain line per bar at most this often
TERMINAL_INTERVAL_S = 0.5
ONE_HOUR_S = 3600.0


def bars_disabled() -> bool:
    """tqdm's own switch, read when a bar is made (tqdm reads it only once, at import)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


class _Lines:
    """tqdm's file when output is captured: each refresh becomes one plain line. (tqdm redraws
    with '\\r' + status + padding; a log file wants neither the '\\r' nor the padding.)"""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", "utf-8")

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress(tqdm):
    """A tqdm bar that can also show a running loss and a per-item rate (e.g. images/s).

    The loss is kept as given (a device tensor is fine) and read only when the bar is drawn, so a
    CUDA loop is not synchronised at every step.
    """

    monitor_interval = 0   # no monitor thread: drawing happens only in update/close

    def __init__(self, *args, items_per_step: int = 0, item_unit: str = "img", **kwargs):
        self._items_per_step, self._item_unit = items_per_step, item_unit
        self._loss_sum, self._loss_n = None, 0
        super().__init__(*args, **kwargs)

    def step(self, loss=None, n: int = 1) -> None:
        """One (or n) steps done; `loss` (float or tensor) joins the running mean."""
        if loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        self.update(n)

    @property
    def mean_loss(self) -> float | None:
        """Mean of the losses given to `step` (kept even when the bar is turned off)."""
        return float(self._loss_sum) / self._loss_n if self._loss_n else None

    def display(self, msg=None, pos=None):
        if msg is None:
            self.postfix = self._stats()
        return super().display(msg, pos)

    def _stats(self) -> str:
        parts = []
        if self._items_per_step and self.n:
            elapsed = self._time() - self.start_t
            if elapsed > 0:
                parts.append(f"{self.n * self._items_per_step / elapsed:.1f} {self._item_unit}/s")
        if self._loss_n:
            parts.append(f"loss {self.mean_loss:.4f}")
        return ", ".join(parts)


def bar(total: int | None, desc: str, unit: str = "step", *, items_per_step: int = 0, item_unit: str = "img",
        leave: bool = False, quiet_start: bool = True, stream=None, **tqdm_kwargs) -> Progress:
    """A progress bar on stderr (or `stream`): in place in a terminal, plain periodic lines otherwise.

    `quiet_start`: in captured output, the first line comes only after LOG_INTERVAL_S, so work
    shorter than that (an MLP epoch) leaves no bar lines, only its summary line. `leave`: keep the
    final state as a last line. Extra keyword arguments go to tqdm (e.g. unit_scale=True).
    """
    stream = stream or sys.stderr
    units = unit if unit == "B" else unit + "s"
    rate = "" if items_per_step else ", {rate_fmt}"   # per-item rates are in the postfix
    interactive = getattr(stream, "isatty", lambda: False)()
    if interactive:
        fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + units + " [{elapsed}<{remaining}" + rate + "{postfix}]"
        file, interval = stream, TERMINAL_INTERVAL_S
    else:
        fmt = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} " + units + " [{elapsed}<{remaining}" + rate + "{postfix}]"
        file, interval = _Lines(stream), LOG_INTERVAL_S
        if quiet_start:
            tqdm_kwargs.setdefault("delay", LOG_INTERVAL_S)
    if total is None:   # unknown size (no Content-Length): count and rate only
        fmt = "{desc}: {n_fmt} " + units + " [{elapsed}, {rate_fmt}{postfix}]"
    options = dict(total=total, desc=desc, unit=unit, bar_format=fmt, file=file, mininterval=interval,
                   miniters=1, leave=leave, disable=bars_disabled(), dynamic_ncols=interactive)
    options.update(tqdm_kwargs)
    return Progress(items_per_step=items_per_step, item_unit=item_unit, **options)


def epoch_line(epoch: int, epochs: int, seconds: float, *, prefix: str = "", **values) -> str:
    """Print and return one summary line: `[prefix] epoch i/N  key value ...  12.3s`.

    Values are printed in the order given; floats with 4 significant decimals (lr in %.3g).
    """
    parts = [f"{prefix} " if prefix else "", f"epoch {epoch}/{epochs}"]
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.3g}" if key == "lr" else f"{value:.4f}"
        parts.append(f"  {key} {value}")
    parts.append(f"  {seconds:.1f}s")
    line = "".join(parts)
    print(line, flush=True)
    return line


def format_seconds(seconds: float) -> str:
    """3h 05m, 14m 12s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class StepTimer:
    """Times a few steps of the real loop after a warm-up (the first steps pay for memory
    allocation and kernel selection). Call `begin()` before a step's work and `end()` after it;
    `end()` returns the mean seconds per timed step once, at the last timed step, else None. Work
    between `end()` and the next `begin()` (validation) is not counted."""

    def __init__(self, steps_per_epoch: int, warmup: int = 2, timed: int = 5, sync=lambda: None):
        # Short epochs (smoke runs) still get a projection: fewer warm-up and timed steps.
        self.warmup = min(warmup, max(0, steps_per_epoch - 1))
        self.timed = max(1, min(timed, steps_per_epoch - self.warmup))
        self.sync, self.done, self.seconds, self._start = sync, 0, 0.0, 0.0

    def _timing(self) -> bool:
        return self.warmup <= self.done < self.warmup + self.timed

    def begin(self) -> None:
        if self._timing():
            self.sync()
            self._start = time.perf_counter()

    def end(self) -> float | None:
        if not self._timing():
            self.done += 1
            return None
        self.sync()
        self.seconds += time.perf_counter() - self._start
        self.done += 1
        return self.seconds / self.timed if self.done == self.warmup + self.timed else None


def say(text: str) -> None:
    """Print a line on stdout without breaking a bar being drawn in the terminal."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def project(seconds_per_step: float, steps_per_epoch: int, epochs: int, eval_seconds_per_epoch: float = 0.0,
            fixed_seconds: float = 0.0) -> float:
    """Projected wall time: every training step, every epoch's evaluation, plus fixed costs
    (final test pass, start-up, saving)."""
    return epochs * (steps_per_epoch * seconds_per_step + eval_seconds_per_epoch) + fixed_seconds


def cnn_projection(seconds_per_step: float, eval_seconds_per_image: float, steps_per_epoch: int, epochs: int,
                   log_every: int, n_val: int, n_test: int) -> tuple[float, float, str]:
    """(total seconds, seconds per epoch, detail) of a CNN stage as `cnn_loop.train` runs it: the
    training steps, a validation pass every `log_every` steps and at every epoch's end, the test pass."""
    val_passes = steps_per_epoch / log_every + 1
    eval_per_epoch = val_passes * n_val * eval_seconds_per_image
    test = (n_val + n_test) * eval_seconds_per_image   # the curve's last point and the test split
    total = project(seconds_per_step, steps_per_epoch, epochs, eval_per_epoch, test)
    detail = (f"{epochs} epochs x {steps_per_epoch} steps at {seconds_per_step:.3g} s/step"
              f" + validation {format_seconds(eval_per_epoch)}/epoch + test {format_seconds(test)}")
    return total, steps_per_epoch * seconds_per_step + eval_per_epoch, detail


def ways_out(seconds: float, seconds_per_epoch: float, steps_per_epoch: int, epochs: int, size: int,
             epochs_key: str = "cnn.defaults.epochs",
             steps_key: str = "cnn.defaults.max_steps_per_epoch") -> list[str]:
    """The ways to bring a CPU run under an hour, each with the exact command to type."""
    fit_epochs = max(1, int(ONE_HOUR_S // max(seconds_per_epoch, 1e-9)))
    fit_steps = max(1, int(steps_per_epoch * ONE_HOUR_S / max(seconds, 1e-9)))
    ways = ["a CUDA GPU (base.device: auto uses it when present)"]
    smaller = [s for s in (28, 64, 128) if s < size]
    if smaller:   # compute scales with the pixel count
        ways.append(f"smaller images (~{format_seconds(seconds * (smaller[0] / size) ** 2)} at {smaller[0]}px): "
                    f"dvc exp run -S data.images.size={smaller[0]}")
    if fit_epochs < epochs:
        ways.append(f"fewer epochs ({fit_epochs} fit in an hour): dvc exp run -S {epochs_key}={fit_epochs}")
    if fit_steps < steps_per_epoch:
        ways.append(f"fewer steps per epoch (about {fit_steps} of {steps_per_epoch} fit in an hour): "
                    f"dvc exp run -S {steps_key}={fit_steps}")
    return ways


def projection_message(stage: str, device: str, seconds: float, detail: str = "", *, on_cpu: bool = True,
                       seconds_per_epoch: float = 0.0, steps_per_epoch: int = 0, epochs: int = 0, size: int = 0,
                       epochs_key: str = "cnn.defaults.epochs",
                       steps_key: str = "cnn.defaults.max_steps_per_epoch") -> str:
    """`projected: 1h 14m for cnn@resnet18 on cpu (detail)`, plus the ways out when a CPU run
    exceeds an hour."""
    message = f"projected: {format_seconds(seconds)} for {stage} on {device}" + (f" ({detail})" if detail else "")
    if on_cpu and seconds > ONE_HOUR_S and steps_per_epoch:
        ways = ways_out(seconds, seconds_per_epoch, steps_per_epoch, epochs, size, epochs_key, steps_key)
        message += "\n  over an hour on a CPU. Ways out:\n" + "\n".join(f"  - {w}" for w in ways)
    return message

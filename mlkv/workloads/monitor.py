"""Per-step training metrics: JSON lines, TensorBoard scalars, and a plot (`mlkv train --log-dir/--plot`).

`StepMonitor.step` runs after every training step (from the loop's thread, or from any trainer thread:
it takes its own lock). It reads the store's counters and records the step's loss, samples/s, hit rate,
disk stall and staleness waits; `epoch` records the evaluation after each epoch. With a log directory
every record is appended at once to DIR/metrics.jsonl (one JSON object per line, flushed per line, so a
crashed or resumed run keeps what it wrote), and, when the `tensorboard` package is importable, written as
TensorBoard scalars to DIR too. `close` draws the plot (matplotlib, optional dependency `mlkv[plot]`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from ..errors import MissingDependencyError, PathNotFoundError

METRICS_FILE = "metrics.jsonl"
#: store counters whose per-step change each step record carries
_COUNTERS = ("hits", "misses", "stall_seconds", "staleness_waits", "staleness_wait_seconds")


def tensorboard_writer(log_dir: str):
    """A torch SummaryWriter on `log_dir`, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the separate `tensorboard` package
        return None
    return SummaryWriter(log_dir=log_dir)


def check_plot_target(path: str) -> None:
    """Fail before training, not after it, when --plot cannot be drawn (no matplotlib, no directory)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'mlkv[plot]'") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PathNotFoundError(f"--plot {path}: directory {folder} does not exist")


class StepMonitor:
    """Records per-step and per-epoch metrics of one training run (see the module docstring).

    Args:
        store: the run's mlkv Store, or None for the in-memory baseline (then no hit rate, stall or waits).
        log_dir: directory for metrics.jsonl and TensorBoard events (created if missing), or None.
        plot: a .png (or any matplotlib format) path drawn by `close`, or None.
    """

    def __init__(self, store, log_dir: str | None = None, plot: str | None = None):
        self.store, self.log_dir, self.plot = store, log_dir, plot
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._file = self._tb = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self._file = open(os.path.join(log_dir, METRICS_FILE), "a", buffering=1)  # noqa: SIM115
            self._tb = tensorboard_writer(log_dir)
        self._last = self._counters()
        self._t0 = self._t = time.perf_counter()

    def _counters(self) -> dict[str, float]:
        if self.store is None:
            return {}
        s = self.store.stats()
        return {k: s.get(k, 0) for k in _COUNTERS}

    def _emit(self, record: dict[str, Any], step: int) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            group = "train" if record["kind"] == "step" else "eval"
            for key, value in record.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{group}/{key}", value, step)

    def step(self, global_step: int, epoch: int, samples: int, loss: float) -> None:
        """Record the step that just ended: `global_step` counts steps from the start of training."""
        with self._lock:
            now, counters = time.perf_counter(), self._counters()
            delta = {k: counters[k] - self._last[k] for k in counters}
            seconds = max(now - self._t, 1e-9)
            self._last, self._t = counters, now
            record: dict[str, Any] = {
                "kind": "step",
                "step": global_step,
                "epoch": epoch,
                "time": now - self._t0,
                "loss": loss,
                "samples": samples,
                "samples_per_s": samples / seconds,
            }
            if delta:
                looked = delta["hits"] + delta["misses"]
                record.update(
                    hit_rate=delta["hits"] / looked if looked else None,
                    stall_seconds=delta["stall_seconds"],
                    stall_fraction=min(delta["stall_seconds"] / seconds, 1.0),
                    staleness_waits=delta["staleness_waits"],
                    staleness_wait_seconds=delta["staleness_wait_seconds"],
                )
            self._emit(record, global_step)

    def epoch(self, global_step: int, epoch: int, loss: float, metrics: dict[str, float]) -> None:
        """Record the evaluation after `epoch` (1-based) ended at `global_step`."""
        with self._lock:
            self._emit(
                {"kind": "epoch", "step": global_step, "epoch": epoch, "loss": loss, **metrics}, global_step
            )
            self._t = time.perf_counter()  # evaluation time is no step's time

    def close(self) -> None:
        """Flush and close the log files; draw the plot, from the whole metrics.jsonl when there is one
        (a resumed run's plot then shows the steps before the resume too)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            if self.plot is not None:
                records = self.records
                if self.log_dir is not None:
                    records = read_metrics(self.log_dir)
                draw(records, self.plot)


def read_metrics(log_dir: str) -> list[dict[str, Any]]:
    """Every record of DIR/metrics.jsonl, in order."""
    with open(os.path.join(log_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (hit rate and stall of single steps are noisy)."""
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def draw(records: list[dict[str, Any]], path: str) -> None:
    """Two panels over training steps: loss (and the evaluation metric per epoch), hit rate and stall."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    window = max(1, len(steps) // 50)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x = [r["step"] for r in steps]
    top.plot(x, [r["loss"] for r in steps], color="tab:blue", alpha=0.35, lw=0.8, label="loss (step)")
    top.plot(x, _smooth([r["loss"] for r in steps], window), color="tab:blue", label="loss (mean)")
    top.set_ylabel("training loss")
    metric = next((m for m in ("mrr", "auc", "hits@10") if epochs and m in epochs[0]), None)
    if metric:
        right = top.twinx()
        right.plot(
            [r["step"] for r in epochs], [r[metric] for r in epochs], "o-", color="tab:red", label=metric
        )
        right.set_ylabel(f"{metric} (after each epoch)", color="tab:red")
    top.legend(loc="upper left")
    with_store = [r for r in steps if r.get("hit_rate") is not None]
    if with_store:
        xs = [r["step"] for r in with_store]
        bottom.plot(xs, _smooth([100 * r["hit_rate"] for r in with_store], window), label="hit rate %")
        bottom.plot(
            xs, _smooth([100 * r["stall_fraction"] for r in with_store], window), label="stall % of step"
        )
        bottom.set_ylim(0, 105)
        bottom.legend(loc="center right")
    else:
        bottom.text(
            0.5, 0.5, "no store (in-memory run)", ha="center", va="center", transform=bottom.transAxes
        )
    bottom.set_xlabel(f"step (hit rate and stall: mean of {window} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["METRICS_FILE", "StepMonitor", "check_plot_target", "draw", "read_metrics", "tensorboard_writer"]

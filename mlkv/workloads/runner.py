"""The training loop every workload shares: store, optimizers, look-ahead, checkpoints, progress, report.

One step: the Prefetcher has produced the batch and announced its keys `lookahead` batches ago; forward,
backward, the dense optimizer (Adam) steps, then the sparse optimizer pushes the row gradients to the
tables (Adagrad inside the store). After each epoch the workload evaluates; every `checkpoint_every` steps
and at each epoch end the rows and the dense state are checkpointed together (mlkv.torch.save_checkpoint),
with the loop's own position in the checkpoint metadata, so `resume=True` continues exactly where the last
checkpoint was taken: at staleness 0 the resumed run ends with the same rows as an uninterrupted one.

`backend="torch"` runs the same loop on the in-memory PyTorch baseline (no store, no look-ahead).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import mlkv
import mlkv.distributed
import mlkv.torch

from ..errors import InvalidArgumentError, MlkvError
from . import trainers
from .monitor import StepMonitor
from .naive_tables import RocksNaiveTables
from .tables import MlkvTables, TorchTables, dense_parameters
from .warmup import compile_kernels
from .workload import Workload

BACKENDS = ("mlkv", "torch", "rocksdb-naive")
LOSS_WINDOW = 10  # final_loss is the mean training loss of the last LOSS_WINDOW steps


@dataclass
class TrainConfig:
    path: str | None = None  # store directory; None: a temporary one, removed afterwards
    epochs: int = 1
    seed: int = 0
    cache_bytes: int | str = "64MiB"
    staleness_bound: int = 0
    lookahead: int = 8  # batches the Prefetcher runs ahead; 0 reads the loader directly
    engine: str = "slab"
    resume: bool = False  # continue the run whose last checkpoint is in `path`
    overwrite: bool = False  # delete this workload's tables and dense checkpoints in `path`, start again
    dense_lr: float = 1e-3
    checkpoint_every: int = 0  # steps; 0: only at the end of each epoch
    threads: int = 1
    dtype: str = "float32"  # embedding storage of the store's tables: float32, float16 or bfloat16
    trainers: int = 1  # concurrent trainer threads over one store (mlkv backend; see trainers.py)
    max_steps: int | None = None  # per epoch, for smoke tests
    progress: bool = True
    log: Any = None  # a file for the per-epoch lines; None: stdout
    log_dir: str | None = None  # per-step metrics: DIR/metrics.jsonl, and TensorBoard events if installed
    plot: str | None = None  # an image of loss/metric and hit rate/stall over the steps, drawn at the end
    distributed: bool = False  # under torchrun: tables sharded over the ranks, each rank 1/N of every batch
    dist_timeout: float = 300.0  # seconds a collective waits for a peer before failing (--distributed)


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint's metadata."""

    epoch: int = 0  # epochs finished
    step: int = 0  # batches finished in the current epoch
    global_step: int = 0
    samples: int = 0
    losses: list[float] = field(default_factory=list)  # the last LOSS_WINDOW training losses
    history: list[dict] = field(default_factory=list)  # per-epoch loss and metrics


def make_deterministic(seed: int, threads: int) -> None:
    """Same seed, same numbers: seeded torch, deterministic kernels, a fixed number of threads."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads)


# ---- the store ------------------------------------------------------------------------------------------
def _open_store(workload: Workload, cfg: TrainConfig, path: str) -> mlkv.Store:
    opener = mlkv.open
    if cfg.distributed:  # this rank's shard, PATH/rank-R-of-N, opened collectively
        opener = mlkv.distributed.open
    store = opener(
        path,
        cache_bytes=cfg.cache_bytes,
        engine=cfg.engine,
        staleness_bound=cfg.staleness_bound,
        create=not cfg.resume,
    )
    if cfg.resume:
        return store
    try:  # a fresh run: an earlier run of this workload is replaced only when asked (`overwrite`)
        earlier = sorted(set(workload.tables()).intersection(store.tables()))
        dense = dense_dir(workload, store.path)
        if earlier or os.path.exists(dense):
            if not cfg.overwrite:
                what = f"tables {', '.join(earlier)}" if earlier else f"dense checkpoints in {dense}"
                raise MlkvError(
                    f"{path} already holds a {workload.name} run ({what}); nothing was changed. Pass "
                    "--resume to continue it from its last checkpoint, or --overwrite to delete it and start "
                    "again (Python: TrainConfig(resume=True) or TrainConfig(overwrite=True))"
                )
            # the earlier run stays whole until the new run's first checkpoint commits these drops (and
            # save_checkpoint then deletes the older dense files): a crash before that leaves it resumable
            for name in earlier:
                store.drop_table(name)
    except BaseException:
        store.close(checkpoint=False)
        raise
    return store


def dense_dir(workload: Workload, path: str) -> str:
    """Where the dense checkpoints (model and Adam state) go: inside the store directory."""
    return os.path.join(path, f"{workload.name}-dense")


def _resume(workload: Workload, store: mlkv.Store, model, dense_opt, path: str) -> LoopState:
    last = store.last_checkpoint()
    if last is None or not isinstance(last[1], dict) or "loop" not in last[1]:
        raise MlkvError(f"nothing to resume: store {path} has no training checkpoint")
    meta = last[1]
    if meta.get("identity") != workload.identity():
        raise MlkvError(
            f"cannot resume: the checkpoint in {path} is of {meta.get('identity')}, "
            f"this run is {workload.identity()}"
        )
    mlkv.torch.load_checkpoint(store, model, dense_opt, dense_dir(workload, path))
    return LoopState(**meta["loop"])


def cache_budget(value: int | str, specs, dtype: str = "float32") -> int | str:
    """`cache_bytes` as mlkv.open takes it; "P%" means P percent of the tables' bytes with their Adagrad
    state (the workloads train with Adagrad), so a default such as "50%" stays below every dataset's size.
    `dtype`: the tables' embedding dtype (2 bytes per weight for float16/bfloat16)."""
    if not (isinstance(value, str) and value.strip().endswith("%")):
        return value
    try:
        share = float(value.strip()[:-1]) / 100
    except ValueError:
        share = -1.0
    if not 0 < share <= 10:
        raise InvalidArgumentError(
            f"cache_bytes as a share of the tables must be in (0%, 1000%], got {value!r}"
        )
    total = 0
    for spec in specs.values():
        rows = spec.rows if spec.rows is not None else len(spec.keys())
        weight = 4 if dtype == "float32" else 2
        total += rows * (weight * spec.dim + 4 * mlkv.optim.Adagrad(lr=spec.lr).state_width(spec.dim))
    return max(int(share * total), 1)


def table_footprint(store: mlkv.Store, names) -> tuple[int, int]:
    """(rows, bytes) of the tables `names`, counting optimizer state (it lives in the row)."""
    rows = nbytes = 0
    for name in names:
        t = store.table(name)
        n = len(t)
        rows += n
        nbytes += n * t.row_bytes  # as stored: 16-bit embeddings take 2 bytes per weight
    return rows, nbytes


# ---- progress -------------------------------------------------------------------------------------------
class _Progress:
    """One tqdm bar per epoch: samples/s, loss, and from the store the hit rate and the stall share."""

    def __init__(self, store: mlkv.Store | None, total: int | None, desc: str, enabled: bool, on_step=None):
        self.store = store
        self.on_step = on_step  # called with (samples, loss) after every step (the StepMonitor)
        # disable=None: no bar when stderr is not a terminal (a log file would get one line per refresh)
        self.bar = tqdm(total=total, desc=desc, unit="sample", unit_scale=True, file=sys.stderr,
                        disable=None if enabled else True, dynamic_ncols=True, leave=True)  # fmt: skip
        self.start_stats = store.stats() if store else None
        self.start = time.perf_counter()
        self.updates = 0

    def stats(self) -> dict[str, float]:
        if self.store is None:
            return {}
        now, s0 = self.store.stats(), self.start_stats
        hits, misses = now["hits"] - s0["hits"], now["misses"] - s0["misses"]
        stall = now["stall_seconds"] - s0["stall_seconds"]
        wall = max(time.perf_counter() - self.start, 1e-9)
        return {
            "hits": hits,
            "misses": misses,
            "lookahead_rows": now["lookahead_rows"] - s0["lookahead_rows"],
            "bytes_read": now["bytes_read"] - s0["bytes_read"],
            "hit_rate": hits / max(hits + misses, 1),
            "stall_seconds": stall,
            "stall_fraction": stall / wall,
        }

    def update(self, samples: int, loss: float) -> None:
        self.bar.update(samples)
        self.updates += 1
        if self.on_step is not None:
            self.on_step(samples, loss)
        if self.updates % 20 == 1 and not self.bar.disable:
            post = {"loss": f"{loss:.4f}"}
            s = self.stats()
            if s:
                post["hit"] = f"{100 * s['hit_rate']:.1f}%"
                post["stall"] = f"{100 * s['stall_fraction']:.1f}%"
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


# ---- the loop -------------------------------------------------------------------------------------------
def _evaluate(workload: Workload, model, split: str) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            return workload.evaluate(model, split)
    finally:
        model.train()


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(workload: Workload, cfg: TrainConfig, backend: str = "mlkv") -> dict[str, Any]:
    """Train `workload` for cfg.epochs on mlkv tables (`backend="mlkv"`), in memory (`"torch"`), or on rows
    glued to RocksDB by hand (`"rocksdb-naive"`, naive_tables.py; pooled-lookup workloads only).

    Returns the report: final_loss, samples_per_s, the final metrics, per-epoch history, and for mlkv the
    store's hit rate, stall time and the tables' size beside the memory budget.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if cfg.resume and (cfg.path is None or cfg.engine == "memory"):
        raise MlkvError("--resume needs --path of an on-disk store (engine slab or rocksdb)")
    if cfg.resume and cfg.overwrite:
        raise MlkvError("--resume and --overwrite contradict each other: continue the run, or replace it")
    if isinstance(cfg.trainers, bool) or not isinstance(cfg.trainers, int) or cfg.trainers < 1:
        raise InvalidArgumentError(f"trainers must be an int >= 1, got {cfg.trainers!r}")
    if cfg.trainers > 1 and cfg.distributed:
        raise InvalidArgumentError(
            "--trainers > 1 and --distributed do not combine yet: run one trainer per rank (more ranks)"
        )
    make_deterministic(cfg.seed, cfg.threads)
    cfg = replace(cfg, cache_bytes=cache_budget(cfg.cache_bytes, workload.tables(), cfg.dtype))
    specs = workload.tables()
    leave_group = False
    if cfg.distributed:
        if backend != "mlkv":
            raise MlkvError("distributed training shards mlkv tables: backend must be 'mlkv'")
        leave_group = mlkv.distributed.init(timeout=cfg.dist_timeout)
    path = cfg.path if cfg.path is not None else tempfile.mkdtemp(prefix=f"mlkv-{workload.name}-")
    try:
        store = _open_store(workload, cfg, path) if backend == "mlkv" else None
    except BaseException:
        if leave_group:
            mlkv.distributed.shutdown()
        raise
    naive = None
    try:
        if store is not None:
            tables = MlkvTables(store, specs, cfg.seed, cfg.dtype)
        elif backend == "rocksdb-naive":
            tables = naive = RocksNaiveTables(specs, cfg.seed, os.path.join(path, "rocksdb-naive"))
        else:
            tables = TorchTables(specs, cfg.seed)
        torch.manual_seed(cfg.seed)  # the dense layers start alike in both backends
        model = workload.build_model(tables)
        model.train()
        sparse_opt = tables.sparse_optimizer(model)
        dense = dense_parameters(model, tables.sparse_parameters())
        dense_opt = torch.optim.Adam(dense, lr=cfg.dense_lr) if dense else None
        run = _Run(workload, cfg, store, model, dense_opt, sparse_opt, store.path if store else path)
        if cfg.resume:
            run.state = _resume(workload, store, model, dense_opt, store.path)
            print(f"resumed at epoch {run.state.epoch + 1}, step {run.state.step}", file=run.log)
        if cfg.trainers > 1 and store is not None:
            run.tables = tables
            run.replicas = trainers.make_replicas(workload, tables, model, cfg.trainers, cfg.seed)
        if store is not None:  # numba's first-call compiles happen here, not inside the timed steps
            secs = compile_kernels(cfg.dtype, cfg.engine)
            if secs > 1.0:
                print(
                    f"compiled mlkv's kernels in {secs:.1f} s (once per install; not in the timings)",
                    file=run.log,
                )
        run.epochs()
        report = {"backend": backend, **run.finish()}
        if store is not None:
            rows, nbytes = table_footprint(store, specs)
            report.update(table_rows=rows, table_bytes=nbytes, cache_bytes=store.cache_bytes)
        if cfg.distributed:
            report.update(rank=store.rank, world_size=store.world_size)
        return report
    finally:
        if naive is not None:
            with contextlib.suppress(Exception):  # the directory below goes all the same
                naive.close()
        if store is not None:  # what should last is checkpointed with its dense state (_Run._checkpoint)
            store.close(checkpoint=False)
        if cfg.path is None:
            shutil.rmtree(path, ignore_errors=True)
        if leave_group:
            mlkv.distributed.shutdown()


class _StepBoundary:
    """Ctrl-C during a step takes effect when the step is done, so the checkpoint taken on the way out is a
    consistent cut (a second Ctrl-C interrupts at once). `inside` says whether a step is half applied."""

    def __init__(self):
        self.inside = False
        self.interrupted = False
        self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> _StepBoundary:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)


class _Run:
    """The epochs of one train() call: the loop, its checkpoints, and the report."""

    def __init__(self, workload: Workload, cfg: TrainConfig, store, model, dense_opt, sparse_opt, path: str):
        self.w, self.cfg, self.store, self.model, self.path = workload, cfg, store, model, path
        self.dense_opt, self.sparse_opt = dense_opt, sparse_opt
        self.state = LoopState()
        self.replicas: list[trainers.Replica] = []  # concurrent trainers (cfg.trainers > 1)
        self.tables = None
        self.loss_window = LOSS_WINDOW
        self.log = cfg.log or sys.stdout
        self.monitor = StepMonitor(store, cfg.log_dir, cfg.plot) if cfg.log_dir or cfg.plot else None
        self.train_seconds = 0.0
        self.samples = 0
        self.store_stats = {
            "hits": 0,
            "misses": 0,
            "lookahead_rows": 0,
            "bytes_read": 0,
            "stall_seconds": 0.0,
        }

    def _loader(self, epoch: int):
        batches = itertools.islice(self.w.batches(epoch), self.state.step, self.cfg.max_steps)
        if self.cfg.distributed:  # every rank reads the global batch and keeps its share
            rank, size = self.store.rank, self.store.world_size
            batches = (self.w.shard(b, rank, size) for b in batches)
        if self.store is None or self.cfg.lookahead <= 0:
            return batches
        return mlkv.torch.Prefetcher(batches, keys=self.w.keys, tables=self.store, depth=self.cfg.lookahead)

    def _on_step(self, samples: int, loss: float) -> None:
        self.monitor.step(self.state.global_step, self.state.epoch + 1, samples, loss)

    def _checkpoint(self) -> None:
        if self.store is not None:
            meta = {"identity": self.w.identity(), "loop": asdict(self.state)}
            mlkv.torch.save_checkpoint(
                self.store, self.model, self.dense_opt, dense_dir(self.w, self.path), meta
            )

    def _step(self, batch, boundary: _StepBoundary) -> None:
        st = self.state
        loss = self.w.loss(self.model, batch)
        value = float(loss.detach())
        if self.cfg.distributed:  # scaled by this rank's share: summed over ranks, the global batch's mean
            loss = loss * (batch["size"] / batch["global_size"])
            value = float(mlkv.distributed.group.all_reduce([float(loss.detach())], "sum", "loss")[0])
        if not math.isfinite(value):  # raised before anything is applied: the state stays consistent
            raise MlkvError(f"training diverged: loss {value} at step {st.global_step}")
        boundary.inside = True
        for opt in (self.dense_opt, self.sparse_opt):
            if opt is not None:
                opt.zero_grad()
        loss.backward()
        if self.cfg.distributed and self.dense_opt is not None:
            params = [p for g in self.dense_opt.param_groups for p in g["params"]]
            mlkv.distributed.all_reduce_gradients(params, self.store.world_size)
        for opt in (self.dense_opt, self.sparse_opt):
            if opt is not None:
                opt.step()
        st.losses = [*st.losses[-(LOSS_WINDOW - 1) :], value]
        st.step += 1
        st.global_step += 1
        st.samples += batch.get("global_size", batch["size"])
        self.samples += batch.get("global_size", batch["size"])
        boundary.inside = False

    def _train_epoch(self, boundary: _StepBoundary, bar: _Progress) -> None:
        cfg, st = self.cfg, self.state
        loader = self._loader(st.epoch)
        try:
            if self.replicas:  # concurrent trainers share the loader; each takes the next batch
                trainers.train_epoch(self, loader, boundary, bar)
            else:
                for batch in loader:
                    self._step(batch, boundary)
                    bar.update(batch.get("global_size", batch["size"]), st.losses[-1])
                    if boundary.interrupted:
                        raise KeyboardInterrupt
                    if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0:
                        self._checkpoint()
        except BaseException as e:
            # between steps: keep everything done so far for --resume (not after a failed collective: the
            # checkpoint is one too, and would only replace the error that names the failure)
            if not boundary.inside and not isinstance(e, mlkv.distributed.DistributedError):
                self._checkpoint()
                if self.store is not None and self.cfg.path is not None:
                    why = (
                        "interrupted"
                        if isinstance(e, KeyboardInterrupt)
                        else f"stopped by {type(e).__name__}"
                    )
                    where = f"epoch {st.epoch + 1}, step {st.step}"
                    print(f"{why} at {where}: checkpoint saved in {self.cfg.path}; the same command with "
                          "--resume continues", file=self.log, flush=True)  # fmt: skip
            raise
        finally:
            if hasattr(loader, "close"):
                loader.close()

    def epochs(self) -> None:
        st, cfg = self.state, self.cfg
        with _StepBoundary() as boundary:
            while st.epoch < cfg.epochs:
                total = self.w.samples_per_epoch() if cfg.max_steps is None else None
                desc = f"{self.w.name} epoch {st.epoch + 1}/{cfg.epochs}"
                on_step = self._on_step if self.monitor else None
                bar = _Progress(self.store, total, desc, cfg.progress, on_step)
                start = time.perf_counter()
                try:
                    self._train_epoch(boundary, bar)
                finally:
                    bar.close()
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                window = bar.stats()
                for k in self.store_stats:
                    self.store_stats[k] += window.get(k, 0)
                metrics = _evaluate(self.w, self.model, self.w.epoch_split)
                st.history.append({"epoch": st.epoch + 1, "loss": float(np.mean(st.losses)), **metrics})
                if self.monitor is not None:
                    self.monitor.epoch(st.global_step, st.epoch + 1, float(np.mean(st.losses)), metrics)
                st.epoch += 1
                st.step = 0
                line = f"epoch {st.epoch}/{cfg.epochs}  loss {np.mean(st.losses):.4f}  {self.w.epoch_split}: "
                line += _fmt_metrics(metrics) + f"  ({elapsed:.1f} s)"
                if window:
                    hit, stall = 100 * window["hit_rate"], 100 * window["stall_fraction"]
                    line += f"  hit rate {hit:.1f}%  stall {stall:.1f}%"
                print(line, file=self.log, flush=True)
                if st.epoch < cfg.epochs:
                    self._checkpoint()

    def finish(self) -> dict[str, Any]:
        """Evaluate on the final split, checkpoint (evaluation may create rows of unseen keys: they belong
        in the last training checkpoint, so that --resume still finds it), and build the report."""
        final = _evaluate(self.w, self.model, self.w.final_split)
        self._checkpoint()
        if self.monitor is not None:
            self.monitor.close()  # draws the plot
        st = self.state
        out: dict[str, Any] = {
            "workload": self.w.name,
            "final_loss": float(np.mean(st.losses)) if st.losses else None,
            "samples_per_s": self.samples / self.train_seconds if self.train_seconds else None,
            **final,
            "split": self.w.final_split,
            "epochs": st.epoch,
            "steps": st.global_step,
            "samples": st.samples,
            "train_seconds": self.train_seconds,
            "seed": self.cfg.seed,
            "history": st.history,
            **self.w.describe(),
        }
        if self.store is not None:
            s = self.store_stats
            looked = s["hits"] + s["misses"]
            out.update(
                engine=self.cfg.engine,
                staleness_bound=self.cfg.staleness_bound,
                lookahead=self.cfg.lookahead,
                hit_rate=s["hits"] / looked if looked else None,
                lookahead_rows=s["lookahead_rows"],
                bytes_read=s["bytes_read"],
                stall_seconds=s["stall_seconds"],
                stall_fraction=s["stall_seconds"] / self.train_seconds if self.train_seconds else None,
            )
            whole = self.store.stats()  # the staleness figures of the whole run (the store opened with it)
            out.update(
                trainers=self.cfg.trainers,
                staleness_waits=whole["staleness_waits"],
                staleness_wait_seconds=whole["staleness_wait_seconds"],
                async_updates=whole["async_updates"],
                staleness_lag_hist=whole["staleness_lag_hist"],
            )
        return out


__all__ = ["LOSS_WINDOW", "LoopState", "TrainConfig", "make_deterministic", "table_footprint", "train"]

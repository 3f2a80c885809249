"""Concurrent trainers: N threads train one model over one store, Hogwild-style on the sparse tables.

How the work is shared:
- Batches: the epoch's batches come from one iterator (the Prefetcher, which announces them ahead) handed
  out under a lock, so the trainers take disjoint batches and together see each batch once.
- Sparse tables: each trainer has its own replica of the model, i.e. its own embedding modules over the
  same mlkv tables and its own SparseOptimizer, which is its own staleness reader. The store's gate bounds
  what any read may miss (the other trainers' updates not yet applied, and asynchronous updates still
  queued) by `staleness_bound`; at 0 every read sees every earlier update, so trainers whose batches share
  rows take turns on those rows. Deadlock-free because every forward reads each table once, in the same
  table order (ordered lock acquisition); a workload that breaks this rule gets StalenessTimeout, not a hang.
- Dense parameters: **shared**, not synchronised. One master copy and one dense optimizer; after its
  backward a trainer hands its dense gradients to the master under a lock, the dense optimizer steps, and a
  trainer copies the master weights into its replica before each forward. Dense layers are small next to
  the tables and cheap to copy, so this keeps one set of Adam moments and one update per batch, exactly as
  one trainer does; averaging replicas every k steps (synchronised) would change the effective learning
  rate and add a knob, for no saving on one machine.
- Checkpoints: a checkpoint pauses every trainer between steps (a consistent cut): every batch handed out
  before it is finished, so the loop position counts them all and `--resume` continues after them.
- Stopping: Ctrl-C (main thread) or an error in any trainer stops all trainers after their current step;
  the first error is raised in the caller's thread once every trainer thread has ended.

Threads, not processes: torch kernels, mlkv's numba kernels and its disk reads release the GIL, so two
trainers overlap their heavy work; the Python glue of a step does not, which bounds the speed-up on few
cores (measured in docs/staleness.md).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import MlkvError
from ..store.rwlock import RWLock
from .tables import dense_parameters

if TYPE_CHECKING:
    from .runner import _Run


class Replica:
    """One trainer's model: its own embedding modules (over the shared tables), its own SparseOptimizer,
    and dense parameters that mirror the master's."""

    def __init__(self, model: nn.Module, sparse_opt, dense: list[nn.Parameter]):
        self.model = model
        self.sparse_opt = sparse_opt
        self.dense = dense


def make_replicas(workload, tables, master: nn.Module, n: int, seed: int) -> list[Replica]:
    """`n` replicas of `master` (built by `workload` over `tables`), each with its own SparseOptimizer."""
    out = []
    for _ in range(n):
        torch.manual_seed(seed)
        model = workload.build_model(tables)
        model.load_state_dict(master.state_dict())
        model.train()
        dense = dense_parameters(model, tables.sparse_parameters())
        out.append(Replica(model, tables.sparse_optimizer(model), dense))
    return out


class _Shared:
    """What the trainers of one epoch share, and the locks that guard it."""

    def __init__(self, batches: Iterable):
        self.batches: Iterator = iter(batches)
        self.lock = threading.Lock()  # the batch iterator, the loop state, the progress bar
        self.dense_lock = threading.Lock()  # the master dense parameters and the dense optimizer
        self.steps = RWLock()  # steps share it; a checkpoint takes it alone (a cut between steps)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.half_done = False  # an error struck inside a step: no checkpoint on the way out

    def next_batch(self):
        with self.lock:
            if self.stop.is_set():
                return None
            return next(self.batches, None)


def _copy_from_master(replica: Replica, master: list[nn.Parameter]) -> None:
    with torch.no_grad():
        for mine, theirs in zip(replica.dense, master, strict=True):
            mine.copy_(theirs)


def _step(run: _Run, replica: Replica, master: list[nn.Parameter], shared: _Shared, batch, bar) -> None:
    with shared.dense_lock:
        _copy_from_master(replica, master)
    for p in replica.dense:
        p.grad = None
    replica.sparse_opt.zero_grad()
    loss = run.w.loss(replica.model, batch)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise MlkvError(f"training diverged: loss {value} at step {run.state.global_step}")
    loss.backward()
    replica.sparse_opt.step()
    if master:
        with shared.dense_lock:
            for theirs, mine in zip(master, replica.dense, strict=True):
                theirs.grad = mine.grad
            run.dense_opt.step()
            run.dense_opt.zero_grad()
    with shared.lock:
        st = run.state
        st.losses = [*st.losses[-(run.loss_window - 1) :], value]
        st.step += 1
        st.global_step += 1
        st.samples += batch["size"]
        run.samples += batch["size"]
        bar.update(batch["size"], value)


def _trainer(run: _Run, replica: Replica, master, shared: _Shared, bar) -> None:
    every = run.cfg.checkpoint_every
    try:
        while not shared.stop.is_set():
            with shared.steps.read():
                batch = shared.next_batch()
                if batch is None:
                    return
                try:
                    _step(run, replica, master, shared, batch, bar)
                except BaseException:
                    shared.half_done = True
                    raise
                due = every and run.state.global_step % every == 0
            if due:
                with shared.steps.write():
                    run._checkpoint()
    except BaseException as e:
        with shared.lock:
            shared.errors.append(e)
        shared.stop.set()


def train_epoch(run: _Run, batches: Iterable, boundary, bar) -> None:
    """Train one epoch of `batches` with the run's replicas, one thread each; returns when the batches are
    used up, or raises the first trainer error (KeyboardInterrupt on Ctrl-C) after every trainer stopped."""
    shared = _Shared(batches)
    master = dense_parameters(run.model, run.tables.sparse_parameters())
    threads = [
        threading.Thread(
            target=_trainer, args=(run, r, master, shared, bar), name=f"mlkv-trainer-{i}", daemon=True
        )
        for i, r in enumerate(run.replicas)
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)
                if boundary.interrupted:
                    shared.stop.set()
    except BaseException:  # Ctrl-C before the handler took it: stop the trainers, then re-raise
        shared.stop.set()
        for t in threads:
            t.join()
        raise
    boundary.inside = shared.half_done
    if shared.errors:
        raise shared.errors[0]
    if boundary.interrupted:
        raise KeyboardInterrupt


__all__ = ["Replica", "make_replicas", "train_epoch"]

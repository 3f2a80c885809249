"""SparseOptimizer: turns the row gradients of mlkv.torch modules into one `table.update` per table per step.

The update rule itself (SGD, Adagrad, Adam, ...) is the table's own optimizer, applied inside the store; this
class only collects gradients and keeps the staleness books. Gradients mirror what `torch.optim` sees from a
`sparse=True` nn.Embedding(Bag): every key a forward looked up (padding excluded) gets a gradient row, zero
or not, and when one step reads a table several times (several forwards, several modules sharing a table)
the rows of one key are summed, so each table gets exactly one update per step — as accumulated `.grad`.

Every tracked read is resolved for the optimizer's reader handle: keys with a gradient by the update, keys
read by a forward that never got a gradient by `table.release`. A forward whose graph died without a
backward is released at the next forward, `step()` or `zero_grad()`, so no hold outlives its usefulness.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError
from .modules import _TableModule


class ReaderHandle:
    """The staleness reader that every tracked read and update of one SparseOptimizer is made for."""

    __slots__ = ("__weakref__", "label")

    def __init__(self, label: str):
        self.label = label

    def __repr__(self) -> str:
        return f"<mlkv reader {self.label}>"


class _Read:
    """One forward's rows of one table: the distinct keys it read and the leaf tensor W it gathered them in.

    W is held weakly: once its graph is gone without a backward, the forward can never produce a gradient
    and its reads are released. The gradient is captured by a hook when autograd accumulates it, so a
    backward keeps working after the graph (and W) are freed."""

    __slots__ = ("_weight", "grad", "keys", "table")

    def __init__(self, table, keys: np.ndarray, weight: torch.Tensor):
        self.table = table
        self.keys = keys
        self.grad: torch.Tensor | None = None
        self._weight = weakref.ref(weight)
        weight.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, weight: torch.Tensor) -> None:
        self.grad = weight.grad

    @property
    def alive(self) -> bool:
        """A backward may still reach W."""
        return self._weight() is not None

    def clear_grad(self) -> None:
        self.grad = None
        w = self._weight()
        if w is not None:
            w.grad = None


def _mlkv_modules(modules) -> list[_TableModule]:
    if isinstance(modules, nn.Module):
        modules = [modules]
    found: list[_TableModule] = []
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"SparseOptimizer takes mlkv.torch modules or models holding them, got {type(m)}")
        for sub in m.modules():
            if isinstance(sub, _TableModule) and all(sub is not f for f in found):
                found.append(sub)
    if not found:
        raise InvalidArgumentError("SparseOptimizer found no mlkv.torch Embedding or EmbeddingBag module")
    return found


def _unique_int64(keys: np.ndarray) -> np.ndarray:
    return np.unique(keys) if len(keys) else keys


class SparseOptimizer:
    """Pushes the row gradients of mlkv.torch modules to their tables: ``step()``, ``zero_grad()``.

    Args:
        modules: mlkv.torch Embedding/EmbeddingBag modules, or models containing them (searched with
            ``.modules()``). A module belongs to one SparseOptimizer. Modules that share a table must share
            the SparseOptimizer too: two optimizers are two staleness readers, and under ``staleness_bound=0``
            one would wait for the other's step.

    Learning rates and other hyperparameters belong to each table's ``mlkv.optim`` optimizer.
    """

    def __init__(self, modules: Iterable[nn.Module] | nn.Module):
        self.modules = _mlkv_modules(modules)
        for m in self.modules:
            other = m.optimizer
            if other is not None and other is not self:
                raise InvalidArgumentError(
                    f"{type(m).__name__}(table {m.table.name!r}) already belongs to another SparseOptimizer"
                )
        self.reader = ReaderHandle(f"SparseOptimizer@{id(self):#x}")
        self._pending: list[_Read] = []
        for m in self.modules:
            m._owner = weakref.ref(self)

    def __repr__(self) -> str:
        tables = sorted({m.table.name for m in self.modules})
        return f"SparseOptimizer(tables={tables}, pending_reads={len(self._pending)})"

    # ---- called by the modules ---------------------------------------------------------------------
    def _record(self, table, keys: np.ndarray, weight: torch.Tensor) -> None:
        self._pending.append(_Read(table, keys, weight))

    def _release_unrecorded(self, table, keys: np.ndarray) -> None:
        """A forward failed after its read: give back what no pending read of the table still needs."""
        keep = [r.keys for r in self._pending if r.table is table]
        if keep:
            keys = keys[np.isin(keys, np.concatenate(keep), invert=True)]
        if len(keys):
            table.release(keys, reader=self.reader)

    def _sweep(self) -> None:
        """Release the reads of forwards whose graph died without a backward."""
        dead = [r for r in self._pending if r.grad is None and not r.alive]
        if dead:
            self._pending = [r for r in self._pending if r.grad is not None or r.alive]
            self._release(dead, updated={})

    def _release(self, done: list[_Read], updated: dict[int, np.ndarray]) -> None:
        """Release the keys of finished reads `done`, but not keys updated or needed by pending reads."""
        by_table: dict[int, tuple[object, list[np.ndarray]]] = {}
        for r in done:
            by_table.setdefault(id(r.table), (r.table, []))[1].append(r.keys)
        for tid, (table, parts) in by_table.items():
            keys = _unique_int64(np.concatenate(parts))
            still = [r.keys for r in self._pending if r.table is table]
            if tid in updated:
                still.append(updated[tid])
            if still:
                keys = keys[np.isin(keys, np.concatenate(still), invert=True)]
            if len(keys):
                table.release(keys, reader=self.reader)

    # ---- the torch.optim-like surface ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Apply every gradient since the last step: one ``table.update`` per table, then release the rows
        read without gradient. Forwards that have not been backpropagated yet (graph still alive, no grad)
        stay pending for the next step, as their ``.grad`` would in torch.

        Non-finite gradients raise ``ValueError`` naming the table before anything is written to any
        table; the step stays pending (call ``zero_grad()`` to discard it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ready = [r for r in self._pending if r.grad is not None]
        dead = [r for r in self._pending if r.grad is None and not r.alive]
        groups: dict[int, tuple[object, list[_Read]]] = {}
        for r in ready:
            groups.setdefault(id(r.table), (r.table, []))[1].append(r)
        batches = []
        for tid, (table, reads) in groups.items():
            keys, grads = self._coalesce(reads)
            finite = torch.isfinite(grads).all(dim=1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()
                raise InvalidArgumentError(
                    f"non-finite gradient (NaN or inf) for table {table.name!r} in {len(bad)} rows (first "
                    f"key {int(keys[int(bad[0])])}); nothing was written to any table; call zero_grad() to "
                    "discard this step"
                )
            batches.append((tid, table, keys, grads))
        self._pending = [r for r in self._pending if r.grad is None and r.alive]
        updated: dict[int, np.ndarray] = {}
        try:
            for tid, table, keys, grads in batches:
                table.update(keys, grads.numpy(), reader=self.reader)
                updated[tid] = keys
        finally:  # after a failed update, the reads of the tables not updated are still given back
            self._release(ready + dead, updated)
        return loss

    @staticmethod
    def _coalesce(reads: list[_Read]) -> tuple[np.ndarray, torch.Tensor]:
        """(distinct keys, their summed float32 CPU gradients) over several reads of one table."""
        grads = [r.grad.detach().to("cpu", torch.float32) for r in reads]
        if len(reads) == 1:
            return reads[0].keys, grads[0].contiguous()
        keys = np.concatenate([r.keys for r in reads])
        uniq, inv = np.unique(keys, return_inverse=True)
        summed = torch.zeros(len(uniq), grads[0].shape[1], dtype=torch.float32)
        summed.index_add_(0, torch.from_numpy(inv.reshape(-1)), torch.cat(grads))
        return uniq, summed

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients gathered since the last step. Reads whose forward can no longer get a gradient
        (backward done or graph gone) are released; forwards still awaiting their backward stay pending, so
        ``zero_grad()`` between forward and backward works as in torch. ``set_to_none`` is accepted for
        torch.optim compatibility; gradients are always dropped."""
        done = [r for r in self._pending if not r.alive]
        self._pending = [r for r in self._pending if r.alive]
        for r in self._pending:
            r.clear_grad()
        self._release(done, updated={})

    @property
    def pending_reads(self) -> int:
        """Forwards whose rows are read but not yet updated or released."""
        return len(self._pending)

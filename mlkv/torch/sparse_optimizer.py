"""SparseOptimizer: a torch.optim.Optimizer that turns the row gradients of mlkv.torch modules into one
`table.update` per table per step.

The update rule itself (SGD, Adagrad, Adam, ...) is the table's own `mlkv.optim` optimizer, applied inside the
store to the rows and the optimizer state stored beside them. This class collects gradients, keeps the
staleness books and holds the *runtime* hyper-parameters: one param group per table, seeded from the table's
optimizer (``lr``, ``eps``, ``weight_decay``, ``betas``...). Torch's LR schedulers change a group's ``lr``;
`step()` applies the table's rule with the group's current values (`table.update(..., optimizer=...)`),
and leaves the table's own optimizer and its persisted schema as they were. The learning rate is therefore
state of this optimizer (saved by its ``state_dict()``, with the scheduler's), not of the store.

Gradients mirror what `torch.optim` sees from a `sparse=True` nn.Embedding(Bag): every key a forward looked
up (padding excluded) gets a gradient row, zero or not, and when one step reads a table several times
(several forwards, several modules sharing a table) the rows of one key are summed, so each table gets
exactly one update per step — as accumulated `.grad`.

Every tracked read is resolved for the optimizer's reader handle: keys with a gradient by the update, keys
read by a forward that never got a gradient by `table.release`. A forward whose graph died without a
backward is released at the next forward, `step()` or `zero_grad()`, so no hold outlives its usefulness;
an optimizer dropped altogether releases its holds when its reader handle is garbage-collected (the
staleness gate keeps readers weakly).

Thread-safety: one SparseOptimizer and its modules are driven by one thread (the training loop), as a torch
optimizer is; the tables it writes are thread-safe.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidTypeError, UnsupportedError
from ..optim import Optimizer as RowOptimizer
from ..optim import optimizer_from_config
from .modules import _TableModule


class ReaderHandle:
    """The staleness reader that every tracked read and update of one SparseOptimizer is made for."""

    __slots__ = ("__weakref__", "label")

    def __init__(self, label: str):
        self.label = label

    def __repr__(self) -> str:
        return f"<mlkv reader {self.label}>"


class _Read:
    """One forward's rows of one table: the module, the distinct keys it read and the leaf tensor W holding
    them.

    W is held weakly: once its graph is gone without a backward, the forward can never produce a gradient
    and its reads are released. The gradient is captured by a hook when autograd accumulates it, so a
    backward keeps working after the graph (and W) are freed."""

    __slots__ = ("_weight", "grad", "keys", "module", "table")

    def __init__(self, module: _TableModule, keys: np.ndarray, weight: torch.Tensor):
        self.module = module
        self.table = module.table
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


class _TableGrad:
    """What one step applies to one table: distinct keys, their summed float32 CPU gradients, and the
    optimizer built from the table's param group (None: the table's own)."""

    __slots__ = ("grads", "keys", "optimizer", "table")

    def __init__(self, table, keys: np.ndarray, grads: torch.Tensor, optimizer: RowOptimizer | None):
        self.table = table
        self.keys = keys
        self.grads = grads
        self.optimizer = optimizer


def _mlkv_modules(modules) -> list[_TableModule]:
    if isinstance(modules, nn.Module):
        modules = [modules]
    found: list[_TableModule] = []
    for m in modules:
        if not isinstance(m, nn.Module):
            raise InvalidTypeError(
                f"SparseOptimizer takes mlkv.torch modules or models holding them, got {type(m).__name__}"
            )
        for sub in m.modules():
            if isinstance(sub, _TableModule) and all(sub is not f for f in found):
                found.append(sub)
    if not found:
        raise InvalidArgumentError("SparseOptimizer found no mlkv.torch Embedding or EmbeddingBag module")
    return found


def _unique_int64(keys: np.ndarray) -> np.ndarray:
    return np.unique(keys) if len(keys) else keys


def _forget_reader(tables: list, reader: ReaderHandle) -> None:
    """Finalizer of a SparseOptimizer: the holds of its reader in the tables' staleness gates go (a dropped
    optimizer never calls step() or zero_grad() again). Never blocks: see StalenessGate.forget."""
    for table in tables:
        gate = getattr(table, "_gate", None)
        if gate is not None:
            gate.forget(reader)


def _plain(value: Any) -> Any:
    """A group value as the JSON-like value an optimizer config holds (tensor lr -> float, tuple -> list)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _hyperparameters(table) -> dict[str, Any]:
    """The param group entries of a table: its optimizer's config without the kind (tuples for betas,
    as torch keeps them)."""
    cfg = table.optimizer.config()
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k != "kind"}


class SparseOptimizer(torch.optim.Optimizer):
    r"""A :class:`torch.optim.Optimizer` for the rows of mlkv.torch modules: one param group per table.

    ``step()`` pushes the gradients gathered since the last step to the tables, one ``table.update`` per
    table, applying the table's own ``mlkv.optim`` rule with its param group's current hyper-parameters;
    ``zero_grad()`` drops them. Torch's LR schedulers (``StepLR``, ``LambdaLR``, ``OneCycleLR``, ...) work
    on it as on any torch optimizer.

    Args:
        modules: mlkv.torch Embedding/EmbeddingBag modules, or models containing them (searched with
            ``.modules()``). A module belongs to one SparseOptimizer. Modules that share a table must share
            the SparseOptimizer too: two optimizers are two staleness readers, and under ``staleness_bound=0``
            one would wait for the other's step.

    Attributes:
        param_groups (list[dict]): one per table that has an optimizer, in the order the modules were
            found: ``{"params": [], "table": name, "lr": ..., <the optimizer's other hyper-parameters>}``
            (e.g. ``eps``, ``weight_decay`` for Adagrad; ``betas``, ``eps`` for Adam). Seeded from the
            table's optimizer when the SparseOptimizer is made; from then on the group's values are the
            ones used (the table's optimizer object and the store's schema are not changed).
            ``initial_accumulator_value`` is listed but only the table's own value initialises new rows.
            ``params`` is empty: the rows live in the table, not in tensors. ``weight_decay`` (SGD,
            Adagrad) decays the rows of each update only (torch refuses weight decay with sparse gradients).
        modules (list): the mlkv.torch modules found. reader: the staleness reader handle of this optimizer.

    Raises:
        InvalidTypeError (a TypeError): ``modules`` holds something that is not an ``nn.Module``.
        InvalidArgumentError (a ValueError): no mlkv.torch module found, a module already belongs to another
            SparseOptimizer, or no table of the modules has an optimizer (nothing to train).

    Example::

        >>> sparse_opt = SparseOptimizer(model)
        >>> sched = torch.optim.lr_scheduler.StepLR(sparse_opt, step_size=1000, gamma=0.5)
        >>> for batch in loader:
        ...     loss_fn(model(batch)).backward()
        ...     sparse_opt.step(); sparse_opt.zero_grad(); sched.step()
    """

    def __init__(self, modules: Iterable[nn.Module] | nn.Module):
        found = _mlkv_modules(modules)
        for m in found:
            other = m.optimizer
            if other is not None:
                raise InvalidArgumentError(
                    f"{type(m).__name__}(table {m.table.name!r}) already belongs to another SparseOptimizer"
                )
        tables: list = []
        for m in found:
            if m.table.optimizer is not None and all(m.table is not t for t in tables):
                tables.append(m.table)
        if not tables:
            names = sorted({m.table.name for m in found})
            raise InvalidArgumentError(
                f"no table of these modules has an optimizer (tables {names}): nothing to train; create the "
                "table with optimizer=mlkv.optim...., or use the modules frozen without a SparseOptimizer"
            )
        groups = [{"params": [], "table": t.name, **_hyperparameters(t)} for t in tables]
        shared = set.intersection(*(set(g) for g in groups)) - {"params", "table"}
        super().__init__(groups, defaults={k: v for k, v in groups[0].items() if k in shared})
        self.modules = found
        self._tables = tables  # parallel to self.param_groups
        self._built: dict[int, tuple[Any, RowOptimizer]] = {}  # group index -> (its values, optimizer)
        self.reader = ReaderHandle(f"SparseOptimizer@{id(self):#x}")
        self._pending: list[_Read] = []
        for m in self.modules:
            m._owner = weakref.ref(self)
        read_tables = list({id(m.table): m.table for m in found}.values())
        weakref.finalize(self, _forget_reader, read_tables, self.reader).atexit = False

    def __repr__(self) -> str:
        groups = ", ".join(f"{g['table']}: lr={_plain(g['lr']):g}" for g in self.param_groups)
        return f"SparseOptimizer({groups}; pending_reads={len(self._pending)})"

    # ---- called by the modules ---------------------------------------------------------------------
    def _record(self, module: _TableModule, keys: np.ndarray, weight: torch.Tensor) -> None:
        self._pending.append(_Read(module, keys, weight))

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
            if all(p is updated.get(tid) for p in parts):
                continue  # the common step: one read, every key of it updated (and so resolved) already
            keys = _unique_int64(np.concatenate(parts))
            still = [r.keys for r in self._pending if r.table is table]
            if tid in updated:
                still.append(updated[tid])
            if still:
                keys = keys[np.isin(keys, np.concatenate(still), invert=True)]
            if len(keys):
                table.release(keys, reader=self.reader)

    # ---- hyper-parameters ------------------------------------------------------------------------------
    def _group_optimizer(self, table) -> RowOptimizer | None:
        """The table's rule with its group's current values; None when they are the table's own (or the
        table has no group: no optimizer, which its update reports)."""
        index = next((i for i, t in enumerate(self._tables) if t is table), None)
        if index is None:
            return None
        group, own = self.param_groups[index], table.optimizer
        cfg = own.config()
        values = {k: _plain(group[k]) for k in cfg if k != "kind" and k in group}
        if all(values[k] == cfg[k] for k in values):
            return None
        key = tuple(sorted((k, repr(v)) for k, v in values.items()))
        built = self._built.get(index)
        if built is None or built[0] != key or built[1].kind != own.kind:
            try:
                opt = optimizer_from_config({**cfg, **values})
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"param group of table {table.name!r}: {e}") from None
            built = self._built[index] = (key, opt)
        return built[1]

    # ---- the torch.optim surface ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Apply every gradient since the last step: one ``table.update`` per table with its param group's
        hyper-parameters, then release the rows read without gradient. Forwards that have not been
        backpropagated yet (graph still alive, no grad) stay pending for the next step, as their ``.grad``
        would in torch. Reads of a module frozen since its forward are released, not applied.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled), as in torch.

        Returns:
            The closure's loss, or None.

        Raises:
            InvalidArgumentError (a ValueError): a non-finite gradient (the message names the table; nothing
                is written to any table and the step stays pending: call ``zero_grad()`` to discard it), or
                a param group value the table's optimizer rejects (e.g. ``lr < 0``).
            MlkvError: from ``table.update`` (e.g. a table created with ``optimizer=None``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches, done = self._gather()
        self._apply(batches, done)
        return loss

    def _gather(self) -> tuple[list[_TableGrad], list[_Read]]:
        """Per table, the distinct keys and summed gradients of the reads that got one, checked finite and
        paired with the group's optimizer; the pending list keeps only forwards still awaiting backward.
        Returns (batches, reads that are finished). Raises before changing anything."""
        ready = [r for r in self._pending if r.grad is not None and r.module.requires_grad]
        finished = [r for r in self._pending if r.grad is not None or not r.alive]
        groups: dict[int, tuple[object, list[_Read]]] = {}
        for r in ready:
            groups.setdefault(id(r.table), (r.table, []))[1].append(r)
        batches = []
        for table, reads in groups.values():
            keys, grads = self._coalesce(reads)
            if not np.isfinite(grads.numpy()).all():  # numpy: torch's threaded reduction is ~10x slower here
                finite = torch.isfinite(grads).all(dim=1)
                bad = (~finite).nonzero().flatten()
                raise InvalidArgumentError(
                    f"non-finite gradient (NaN or inf) for table {table.name!r} in {len(bad)} rows (first "
                    f"key {int(keys[int(bad[0])])}); nothing was written to any table; call zero_grad() to "
                    "discard this step"
                )
            batches.append(_TableGrad(table, keys, grads, self._group_optimizer(table)))
        self._pending = [r for r in self._pending if r.grad is None and r.alive]
        return batches, finished

    def _apply(self, batches: list[_TableGrad], done: list[_Read]) -> None:
        """One update per table, then the release of every finished read's keys that got no update."""
        updated: dict[int, np.ndarray] = {}
        try:
            for b in batches:
                # staleness bound >= 1: the store's applier applies it in the background (update_async);
                # at 0 it is applied here, synchronously
                apply = b.table.update_async if b.table.effective_staleness_bound else b.table.update
                if b.optimizer is None:
                    apply(b.keys, b.grads.numpy(), reader=self.reader)
                else:
                    apply(b.keys, b.grads.numpy(), reader=self.reader, optimizer=b.optimizer)
                updated[id(b.table)] = b.keys
        finally:  # after a failed update, the reads of the tables not updated are still given back
            self._release(done, updated)

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
        ``zero_grad()`` between forward and backward works as in torch.

        Args:
            set_to_none: accepted for torch.optim compatibility; gradients are always dropped.
        """
        done = [r for r in self._pending if not r.alive]
        self._pending = [r for r in self._pending if r.alive]
        for r in self._pending:
            r.clear_grad()
        self._release(done, updated={})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported after construction: the groups are the tables of the modules (one each).

        Raises:
            UnsupportedError (a NotImplementedError): always, once the SparseOptimizer is made.
        """
        if hasattr(self, "_tables"):  # torch.optim.Optimizer.__init__ adds the initial groups through here
            raise UnsupportedError(
                "SparseOptimizer has one param group per table of its modules; make a new SparseOptimizer "
                "for other modules, or change a group's values in param_groups"
            )
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the param groups (learning rates and other hyper-parameters) saved by ``state_dict()``.

        Args:
            state_dict: from ``state_dict()`` of a SparseOptimizer over the same tables (same order).

        Raises:
            InvalidArgumentError (a ValueError): the state is not a SparseOptimizer's, or is for other tables.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise InvalidArgumentError(
                f"not an optimizer state_dict (no 'param_groups' list): {state_dict!r}"
            )
        saved = [g.get("table") for g in groups]
        mine = [g["table"] for g in self.param_groups]
        if saved != mine:
            raise InvalidArgumentError(
                f"state_dict is for tables {saved}, but this SparseOptimizer has tables {mine}"
            )
        super().load_state_dict(state_dict)
        self._built.clear()

    @property
    def pending_reads(self) -> int:
        """Forwards whose rows are read but not yet updated or released."""
        return len(self._pending)

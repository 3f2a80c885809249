"""EmbeddingBagCollection: several mlkv tables of one width looked up by one forward, as TorchRec's
EmbeddingBagCollection looks up its features.

A model with many categorical features (DLRM: 26 tables) would otherwise run one EmbeddingBag module per
table per step, and pay per table the module's Python glue, one autograd node and one backward call. Here
the forward deduplicates each table's keys (taking the Prefetcher's result from the memo, as EmbeddingBag
does), reads each table's distinct rows with one ``table.get`` into its own leaf tensor ``W_t``, and then
pools every (sample, table) bag with ONE ``embedding_bag`` over the concatenated rows; its backward
scatters the output gradients of all tables in one GIL-free pass and hands each ``W_t`` its slice. What
each table's SparseOptimizer sees is exactly what one EmbeddingBag per table would give it: one read of
the table's distinct keys and their summed gradients.

The collection IS a ``nn.ModuleList`` of :class:`~mlkv.torch.EmbeddingBag` modules, one per table, in the
order given: ``collection[t]`` is table t's module (its own ``requires_grad_``, state_dict entry and
SparseOptimizer param group), and ``collection[t](keys)`` is the same lookup for one table alone.

Thread-safety: as EmbeddingBag, a collection is called from one thread at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling
from torch import Tensor, nn

from ..errors import InvalidArgumentError, InvalidTypeError
from .modules import EmbeddingBag, bag_grad, check_key_tensor, dedup_keys, prepare_reads

_POOLING = ("sum", "mean")


def _pool(idx: Tensor, weight: Tensor, mode: str) -> Tensor:
    """Bags of L indices (idx (N, L)) pooled: a gather when L == 1 (a third faster than embedding_bag for
    the one-key-per-feature layout; the same values), embedding_bag otherwise."""
    if idx.shape[1] == 1:
        return F.embedding(idx.reshape(-1), weight)
    return F.embedding_bag(idx, weight, mode=mode)


class _PooledLookup(torch.autograd.Function):
    """``embedding_bag(idx, cat(W_0, .., W_T-1), mode)`` for bags of L indices (idx (N, L)); the backward
    scatters grad_out into one gradient of the concatenated rows (bag_grad) and returns each W_t its rows."""

    @staticmethod
    def forward(ctx, idx: Tensor, mode: str, *ws: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.mode, ctx.sizes = mode, [len(w) for w in ws]
        return _pool(idx, torch.cat(ws) if len(ws) > 1 else ws[0], mode)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (idx,) = ctx.saved_tensors
        n, per_bag = idx.shape
        starts = torch.arange(0, n * per_bag, per_bag, device=idx.device)
        if ctx.mode == "mean":
            grad_out = grad_out / per_bag
        grad = bag_grad(sum(ctx.sizes), idx.reshape(-1), starts, starts + per_bag, grad_out, None)
        parts = grad.split(ctx.sizes)
        return (None, None, *(g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(parts)))


class EmbeddingBagCollection(nn.ModuleList):
    r"""Bags of keys from several mlkv tables of one ``dim``, pooled by one forward: TorchRec's
    ``EmbeddingBagCollection`` for tables that live in mlkv.

    Input ``(B, T)`` holds one key per sample per table (table t's keys are ``input[:, t]``, the DLRM
    layout); ``(B, T, L)`` holds bags of L keys (table t's keys ``input[:, t, :]``). The output row
    ``[b, t]`` is the pooled embedding of sample b's bag in table t: what ``collection[t]`` (an
    :class:`EmbeddingBag` with the same mode) returns for the bags ``input[:, t:t+1]`` (or
    ``input[:, t, :]``), with the same gradients.

    Args:
        tables: the mlkv Tables, one per feature, all of the same ``dim`` (a table may appear twice: two
            features sharing rows).
        mode: ``"sum"`` or ``"mean"``; how each bag is pooled. Default ``"sum"``, as TorchRec's pooling.
        device: where outputs go (also follows ``module.to(device)``); rows are gathered on the CPU.

    Shape:
        - Input: :math:`(B, T)` or :math:`(B, T, L)` with :math:`L \geq 1`, int64 or int32 keys; T is the
          number of tables.
        - Output: :math:`(B, T, D)` float32, where D is the tables' ``dim``.

    Raises:
        InvalidTypeError (a TypeError): a table is not an mlkv Table; input not an int64/int32 tensor.
        InvalidArgumentError (a ValueError): no tables, tables of different ``dim``, unknown mode, input
            not :math:`(B, T)` or :math:`(B, T, L)` for this collection's T (nothing is read).

    Example::

        >>> tables = [store.table(f"C{i}", dim=16, optimizer=mlkv.optim.Adagrad(0.05)) for i in range(26)]
        >>> ebc = EmbeddingBagCollection(tables)
        >>> pooled = ebc(cats)  # cats (B, 26) int64 -> (B, 26, 16)
        >>> sparse_opt = SparseOptimizer(ebc)  # one param group per table
    """

    def __init__(self, tables: Sequence, mode: str = "sum", *, device=None):
        if mode not in _POOLING:
            raise InvalidArgumentError(f"mode must be one of {_POOLING}, got {mode!r}")
        if isinstance(tables, (str, bytes)) or not isinstance(tables, Sequence):
            raise InvalidTypeError(f"tables must be a sequence of mlkv Tables, got {type(tables).__name__}")
        if not tables:
            raise InvalidArgumentError("tables must name at least one mlkv Table, got an empty sequence")
        super().__init__(EmbeddingBag(t, mode=mode, device=device) for t in tables)
        dims = {m.table.dim for m in self}
        if len(dims) > 1:
            got = ", ".join(f"{m.table.name!r}: {m.table.dim}" for m in self)
            raise InvalidArgumentError(f"the tables of a collection must share one dim, got {got}")
        self.mode = mode

    @property
    def embedding_dim(self) -> int:
        return self[0].table.dim

    def requires_grad_(self, requires_grad: bool = True) -> EmbeddingBagCollection:
        """Train (True) or freeze (False) every table of the collection: ``requires_grad_`` of each member
        (a member alone: ``collection[t].requires_grad_(...)``).

        Returns:
            self
        """
        for m in self:
            m.requires_grad_(requires_grad)
        return self

    def _keys(self, keys_in: Tensor) -> Tensor:
        """input as int64 (B, T, L), checked before any row is read."""
        check_key_tensor(keys_in)
        bags = keys_in.unsqueeze(2) if keys_in.dim() == 2 else keys_in
        if bags.dim() != 3 or bags.shape[1] != len(self) or bags.shape[2] == 0:
            raise InvalidArgumentError(
                f"input must be (B, {len(self)}) or (B, {len(self)}, L) with L >= 1 for a collection of "
                f"{len(self)} tables, got shape {tuple(keys_in.shape)}"
            )
        return bags.to(torch.int64)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        keys = self._keys(input)
        n, n_tables, per_bag = keys.shape
        # table t's keys, contiguous, in the order the Prefetcher's keys(batch)[t] would list them
        cols = keys.cpu().permute(1, 0, 2).reshape(n_tables, n * per_bag).numpy()
        idx = np.empty((n, n_tables, per_bag), dtype=np.int64)
        reads: list[tuple[EmbeddingBag, np.ndarray, Tensor, object]] = []
        # here <- forward <- Module._call_impl <- Module._wrapped_call_impl <- collection(...)
        prepare_reads(list(self), "EmbeddingBagCollection", stacklevel=5)
        try:
            offset = 0
            for t, module in enumerate(self):
                uk, inv = dedup_keys(cols[t])
                _, w, owner = module._read(uk, None)
                reads.append((module, uk, w, owner))
                np.add(inv.reshape(n, per_bag), offset, out=idx[:, t, :])
                offset += len(uk)
            flat = torch.from_numpy(idx.reshape(n * n_tables, per_bag)).to(self[0].device)
            ws = [w for _, _, w, _ in reads]
            if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
                out = _PooledLookup.apply(flat, self.mode, *ws)
            else:
                out = _pool(flat, torch.cat(ws), self.mode)
        except BaseException:
            for module, uk, _, owner in reads:
                if owner is not None and len(uk):
                    owner._release_unrecorded(module.table, uk)
            raise
        for module, uk, w, owner in reads:
            if owner is not None and len(uk):
                owner._record(module, uk, w)
        return out.view(n, n_tables, self.embedding_dim)


__all__ = ["EmbeddingBagCollection"]

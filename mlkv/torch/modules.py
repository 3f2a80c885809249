"""Embedding and EmbeddingBag: torch modules whose rows live in an mlkv Table instead of a weight Parameter.

A forward deduplicates its keys, reads the distinct rows with ONE `table.get`, makes them a small leaf tensor
`W` (distinct keys, dim) and runs `torch.nn.functional.embedding` / `embedding_bag` on the remapped indices,
so outputs and gradients are torch's own. The module then hands (table, keys, W) to its SparseOptimizer,
whose `step()` turns `W.grad` into one `table.update` per table. Input keys are int64 tensors; a hashed id
of 2**63 or more is passed as its two's-complement int64, which is how the table reads int64 keys.

`padding_idx` is a key, not a row number. Its positions behave like nn.Embedding's padding row (which that
module fills with zeros and never trains): they read as zeros in Embedding and are left out of their bag in
EmbeddingBag, and the key itself is never read from or written to the table.

Staleness: in training mode with grad enabled, a forward reads tracked on behalf of its SparseOptimizer's
reader handle, so every key it reads stays outstanding until that optimizer's `step()` (update, or release
for rows that got no gradient) or `zero_grad()`. `module.eval()` and `torch.no_grad()` read untracked.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling
from torch import Tensor, nn

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from .sparse_optimizer import SparseOptimizer

_MODES = ("sum", "mean", "max")


def table_store(table) -> Any:
    """The Store a Table belongs to (None for a table-like object without one)."""
    store = getattr(table, "store", None)
    return store if store is not None else getattr(table, "_store", None)


class _TableModule(nn.Module):
    """What Embedding and EmbeddingBag share: the table, the device, the padding key, reading rows."""

    def __init__(self, table, padding_idx: int | None, device: torch.device | str | None):
        super().__init__()
        for attr in ("get", "update", "release", "dim", "name"):
            if not hasattr(table, attr):
                raise TypeError(f"table must be an mlkv Table (store.table(...)), got {type(table).__name__}")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
                raise TypeError(f"padding_idx must be an int key or None, got {type(padding_idx).__name__}")
            if not -(2**63) <= int(padding_idx) < 2**63:
                raise InvalidArgumentError(f"padding_idx must be an int64 key, got {padding_idx}")
            padding_idx = int(padding_idx)
        self.table = table
        self.padding_idx = padding_idx
        # no parameters: this empty buffer tells forward where outputs go, and follows model.to(device)
        self.register_buffer("_device_anchor", torch.empty(0, device=device), persistent=False)
        self._owner: weakref.ReferenceType[SparseOptimizer] | None = None
        self._warned_unowned = False

    @property
    def embedding_dim(self) -> int:
        return self.table.dim

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @property
    def optimizer(self) -> SparseOptimizer | None:
        """The SparseOptimizer this module belongs to, if any."""
        return self._owner() if self._owner is not None else None

    def _remap(self, keys_in: Tensor) -> tuple[Tensor, Tensor, int | None]:
        """(distinct non-padding keys, keys_in as indices into them, padding row index or None)."""
        if keys_in.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"input must be an int64 or int32 tensor of keys (torch.long, torch.int), got {keys_in.dtype}"
            )
        flat = keys_in.reshape(-1).to(torch.int64)
        if self.padding_idx is None:
            keys, idx = torch.unique(flat, return_inverse=True)
            return keys, idx.reshape(keys_in.shape), None
        is_pad = flat == self.padding_idx
        keys, inv = torch.unique(flat[~is_pad], return_inverse=True)
        idx = torch.full_like(flat, len(keys))  # the padding row sits after the table's rows
        idx[~is_pad] = inv
        return keys, idx.reshape(keys_in.shape), len(keys)

    def _read(self, keys: np.ndarray, pad: int | None) -> tuple[Tensor, Tensor, SparseOptimizer | None]:
        """(weight to index: W plus a zero padding row if any, the leaf W itself, the recording optimizer)."""
        owner = self.optimizer
        train = self.training and torch.is_grad_enabled()
        if train and owner is None and not self._warned_unowned:
            warnings.warn(
                f"{type(self).__name__}(table {self.table.name!r}) runs in training mode but belongs to no "
                "SparseOptimizer: its rows are read untracked and its gradients are never applied",
                stacklevel=6,  # the caller of module(...), through forward and nn.Module.__call__
            )
            self._warned_unowned = True
        if not (train and owner is not None):
            owner = None
        if owner is not None:
            owner._sweep()
        if len(keys):
            rows = self.table.get(keys, track=owner is not None, reader=owner.reader if owner else None)
            rows = np.require(rows, np.float32, ["C", "W", "O"])  # never a view of the table's memory
        else:
            rows = np.zeros((0, self.table.dim), dtype=np.float32)
        w = torch.from_numpy(rows)
        if self.device.type == "cuda":
            w = w.pin_memory().to(self.device, non_blocking=True)
        elif w.device != self.device:
            w = w.to(self.device)
        w.requires_grad_(train)
        weight = w if pad is None else torch.cat([w, w.new_zeros(1, w.shape[1])])
        return weight, w, owner

    def _run(self, keys_in: Tensor, compute) -> Tensor:
        """Dedup, read once, compute(weight, indices, padding row) with torch, record for the optimizer."""
        keys, idx, pad = self._remap(keys_in)
        keys = keys.cpu().numpy()
        weight, w, owner = self._read(keys, pad)
        try:
            out = compute(weight, idx.to(self.device), pad)
        except BaseException:
            if owner is not None and len(keys):
                owner._release_unrecorded(self.table, keys)
            raise
        if owner is not None and len(keys):
            owner._record(self.table, keys, w)
        return out

    # ---- state_dict: where the rows are, not the rows ----------------------------------------------
    def get_extra_state(self) -> dict:
        store = table_store(self.table)
        last = store.last_checkpoint() if store is not None else None
        return {
            "store_path": getattr(store, "path", None),
            "table": self.table.name,
            "last_checkpoint_id": last[0] if last else None,
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "table" not in state:
            raise InvalidArgumentError(f"not an mlkv.torch module state: {state!r}")
        if state["table"] != self.table.name:
            raise InvalidArgumentError(
                f"state_dict is for table {state['table']!r} (store {state.get('store_path')!r}), but this "
                f"{type(self).__name__} is backed by table {self.table.name!r}"
            )
        saved = state.get("last_checkpoint_id")
        store = table_store(self.table)
        last = store.last_checkpoint() if store is not None else None
        if saved is not None and (last is None or last[0] < saved):
            warnings.warn(
                f"state_dict of table {self.table.name!r} was taken after checkpoint {saved}, but the store "
                f"is at checkpoint {last[0] if last else None}: its rows are older than this state",
                stacklevel=2,
            )


class Embedding(_TableModule):
    r"""Like :class:`torch.nn.Embedding`, with rows in an mlkv Table (keys are any int64 values).

    Args:
        table: the mlkv Table holding the rows (``store.table(name, dim=..., optimizer=...)``).
        padding_idx: a key whose positions output zeros and get no gradient; never read or trained.
        max_norm: not supported (renormalising would write rows during forward); must be None.
        device: where outputs go (also follows ``module.to(device)``); rows are gathered on the CPU.

    Shape:
        - Input: :math:`(*)`, int64 or int32 keys.
        - Output: :math:`(*, D)` float32, where D is ``table.dim``.
    """

    def __init__(self, table, padding_idx: int | None = None, max_norm: float | None = None, device=None):
        if max_norm is not None:
            raise NotImplementedError(
                "mlkv.torch.Embedding does not support max_norm: renormalising rows in forward would write "
                "the table outside the optimizer; clip or normalise the output instead"
            )
        super().__init__(table, padding_idx, device)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's name
        return self._run(input, lambda weight, idx, pad: F.embedding(idx, weight, padding_idx=pad))

    def extra_repr(self) -> str:
        s = f"table={self.table.name!r}, embedding_dim={self.embedding_dim}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class EmbeddingBag(_TableModule):
    r"""Like :class:`torch.nn.EmbeddingBag`, with rows in an mlkv Table (keys are any int64 values).

    Args:
        table: the mlkv Table holding the rows.
        mode: ``"sum"``, ``"mean"`` or ``"max"``; how each bag is reduced.
        include_last_offset: offsets has one more element, equal to ``len(input)`` (CSR format).
        padding_idx: a key left out of its bag (it does not count towards ``mean``); never read or trained.
        device: where outputs go (also follows ``module.to(device)``); rows are gathered on the CPU.

    ``forward(input, offsets=None, per_sample_weights=None)``:
        - input 2-D :math:`(B, N)`: B bags of N keys each; offsets must be None.
        - input 1-D :math:`(S,)` with offsets 1-D :math:`(B,)` (or :math:`(B+1,)` with include_last_offset):
          bag i is ``input[offsets[i]:offsets[i+1]]``; an empty bag gives zeros.
        - per_sample_weights: same shape as input, float32, mode ``"sum"`` only.
        - Output: :math:`(B, D)` float32.

    Gradients: every key of the input except padding gets a gradient row (zero if it did not contribute,
    as in max mode), exactly the rows a ``sparse=True`` nn.EmbeddingBag would put in its sparse gradient.
    """

    def __init__(
        self,
        table,
        mode: str = "sum",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        device=None,
    ):
        if mode not in _MODES:
            raise InvalidArgumentError(f"mode must be one of {_MODES}, got {mode!r}")
        super().__init__(table, padding_idx, device)
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)

    def _check(self, keys_in: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None) -> None:
        """nn.EmbeddingBag's argument rules, checked before any row is read."""
        if keys_in.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D (B bags of N keys each)")
        elif keys_in.dim() == 1:
            if offsets is None or offsets.dim() != 1:
                got = None if offsets is None else tuple(offsets.shape)
                raise ValueError(f"a 1-D input needs 1-D offsets (one start per bag), got offsets {got}")
            if self.include_last_offset and (offsets.numel() == 0 or int(offsets[-1]) != keys_in.numel()):
                last = int(offsets[-1]) if offsets.numel() else None
                raise ValueError(
                    f"with include_last_offset=True the last offset must equal len(input) = "
                    f"{keys_in.numel()}, got {last}"
                )
        else:
            raise ValueError(f"input must be 1-D (with offsets) or 2-D, got shape {tuple(keys_in.shape)}")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise NotImplementedError(
                    f"per_sample_weights is only supported for mode='sum' (as in torch), got {self.mode!r}"
                )
            if per_sample_weights.shape != keys_in.shape:
                raise ValueError(
                    f"per_sample_weights must have the shape of input {tuple(keys_in.shape)}, "
                    f"got {tuple(per_sample_weights.shape)}"
                )

    def forward(
        self,
        input: Tensor,  # noqa: A002 - nn.EmbeddingBag's name
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        self._check(input, offsets, per_sample_weights)
        dev = self.device
        if offsets is not None:
            offsets = offsets.to(dev, torch.int64)  # the remapped indices are int64
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.to(dev)

        def compute(weight: Tensor, idx: Tensor, pad: int | None) -> Tensor:
            return F.embedding_bag(
                idx,
                weight,
                offsets,
                mode=self.mode,
                per_sample_weights=per_sample_weights,
                include_last_offset=self.include_last_offset,
                padding_idx=pad,
            )

        return self._run(input, compute)

    def extra_repr(self) -> str:
        s = f"table={self.table.name!r}, embedding_dim={self.embedding_dim}, mode={self.mode!r}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")

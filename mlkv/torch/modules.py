"""Embedding and EmbeddingBag: torch modules whose rows live in an mlkv Table instead of a weight Parameter.

A forward deduplicates its keys, reads the distinct rows with ONE `table.get`, makes them a small leaf tensor
`W` (distinct keys, dim) and runs `torch.nn.functional.embedding` / `embedding_bag` on the remapped indices,
so outputs are torch's own (`max_norm`, `scale_grad_by_freq`, `per_sample_weights` included). Gradients are
torch's too; in the common cases (no `max_norm` or `scale_grad_by_freq`; mode "sum" for bags) `W.grad` is
one GIL-free scatter of the output gradients (a numba kernel; `index_add_` off the CPU) instead of torch's
sort-based dense backward: the same sums, up to the order in which a key's occurrences are added.
The module then hands (table, keys, W) to its SparseOptimizer, whose `step()` turns `W.grad` into one
`table.update` per table. Input keys are int64 tensors; a hashed id of 2**63 or more is passed as its
two's-complement int64, which is how the table reads int64 keys.

`padding_idx` is a key, not a row number. Its positions behave like nn.Embedding's padding row (which that
module fills with zeros and never trains): they read as zeros in Embedding and are left out of their bag in
EmbeddingBag, and the key itself is never read from or written to the table.

Staleness: in training mode with grad enabled, a forward of a trainable module (``requires_grad``, the
default) reads tracked on behalf of its SparseOptimizer's reader handle, so every key it reads stays
outstanding until that optimizer's `step()` (update, or release for rows that got no gradient) or
`zero_grad()`. `module.eval()`, `torch.no_grad()` and a frozen module (`requires_grad_(False)`,
`from_pretrained(freeze=True)`) read untracked, hold nothing and are never trained.

`max_norm`: as torch renormalises the weight rows a forward looks up in place, a forward here writes the
renormalised rows back with `table.put` (only rows whose norm exceeded `max_norm`; skipped on a readonly
store), so outputs and the stored rows both match torch. The write does not give back the module's own
staleness hold. It is a read-modify-write outside the table's lock: an update of the same row by another
thread between the read and the write is lost, as it would be for torch's in-place renorm.

Thread-safety: a module may be called from one thread at a time (as a torch module with in-place renorm);
all row traffic goes through the Table, which is thread-safe.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling
from torch import Tensor, nn

from ..engine.kernel import kernel
from ..engine.key_index import unique_inverse
from ..errors import InvalidArgumentError, InvalidTypeError, UnsupportedError
from .dedup_memo import MEMO

if TYPE_CHECKING:
    from .sparse_optimizer import SparseOptimizer

_MODES = ("sum", "mean", "max")
_INT_DTYPES = (torch.int64, torch.int32)


class _RenormWriter:
    """The reader in whose name max_norm writes renormalised rows: it holds nothing, so the write leaves the
    module's own staleness holds in place until its optimizer's step()."""

    __slots__ = ("__weakref__",)

    def __repr__(self) -> str:
        return "<mlkv max_norm writer>"


_RENORM_WRITER = _RenormWriter()


def dedup_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct int64 keys, inverse) of 1-D int64 keys, like ``np.unique(keys, return_inverse=True)`` but
    in uint64 order (the store's): the store's hashed, GIL-free dedup, ~50x faster than torch.unique on a
    CPU batch, and the store finds its keys already sorted and distinct. A batch that a Prefetcher
    announced was deduplicated on its worker thread already: that result is taken from the memo."""
    got = MEMO.take(keys)
    uk, inv = got if got is not None else unique_inverse(keys)[:2]
    return uk.view(np.int64), inv


def _dedup(flat: Tensor) -> tuple[np.ndarray, Tensor]:
    """dedup_keys of a 1-D int64 tensor: the distinct keys as the array the table reads, the inverse as a
    tensor on the input's device."""
    uk, inv = dedup_keys(flat.cpu().numpy())
    return uk, torch.from_numpy(inv).to(flat.device)


def check_key_tensor(keys_in: Tensor) -> None:
    """The input of every module here: a tensor of int64 or int32 keys (checked before any row is read).

    Raises:
        InvalidTypeError: not a tensor, or another dtype (the message names the one received).
    """
    if not isinstance(keys_in, Tensor):
        raise InvalidTypeError(f"input must be a tensor of int64 keys, got {type(keys_in).__name__}")
    if keys_in.dtype not in _INT_DTYPES:
        raise InvalidTypeError(
            f"input must be an int64 or int32 tensor of keys (torch.long, torch.int), got {keys_in.dtype}"
        )


@kernel
def _scatter_bags(idx, starts, ends, grad_out, psw, out):
    """out[idx[j]] += grad_out[b] (* psw[j]) for each position j of each bag b (positions starts[b] to
    ends[b]), in order of j: the sums index_add_ makes, in one GIL-free pass without its temporaries."""
    weighted = psw.shape[0] > 0
    for b in range(starts.shape[0]):
        for j in range(starts[b], ends[b]):
            i = idx[j]
            if weighted:
                w = psw[j]
                for d in range(out.shape[1]):
                    out[i, d] += grad_out[b, d] * w
            else:
                for d in range(out.shape[1]):
                    out[i, d] += grad_out[b, d]


_NO_WEIGHTS = np.empty(0, dtype=np.float32)


def bag_grad(rows: int, flat: Tensor, starts: Tensor, ends: Tensor, grad_out: Tensor, psw: Tensor | None):
    """Gradient of W (rows, dim) for bags of remapped indices `flat` (bag b: flat[starts[b]:ends[b]])
    whose outputs got `grad_out`: the numba kernel on the CPU, index_add_ elsewhere (same sums) and under
    ``create_graph=True`` (a double backward differentiates these torch ops)."""
    if grad_out.device.type == "cpu" and grad_out.dtype == torch.float32 and not grad_out.requires_grad:
        out = np.zeros((rows, grad_out.shape[1]), dtype=np.float32)
        weights = _NO_WEIGHTS if psw is None else psw.detach().to(torch.float32).reshape(-1).numpy()
        _scatter_bags(flat.numpy(), starts.numpy(), ends.numpy(), grad_out.contiguous().numpy(), weights, out)
        return torch.from_numpy(out)
    bag = torch.arange(len(starts), device=flat.device).repeat_interleave(ends - starts)
    used = len(bag)  # bags are consecutive from position 0 (offsets[0] == 0, non-decreasing)
    g = grad_out.index_select(0, bag)
    if psw is not None:
        g = g * psw.reshape(-1)[:used].unsqueeze(1)
    return grad_out.new_zeros(rows, grad_out.shape[1]).index_add_(0, flat[:used], g)


class _Lookup(torch.autograd.Function):
    """``embedding(idx, W)`` whose backward scatters the output gradients into W's rows in one pass
    (`bag_grad`, bags of one) instead of torch's dense embedding backward, which sorts the indices on
    every call (3x slower for a batch of 4096 ids on CPU). Used without max_norm and scale_grad_by_freq;
    the output is torch's own forward."""

    @staticmethod
    def forward(ctx, weight, idx, pad):
        ctx.save_for_backward(idx)
        ctx.rows, ctx.dim = weight.shape
        return F.embedding(idx, weight, padding_idx=pad)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        flat = idx.reshape(-1)
        starts = torch.arange(len(flat), device=flat.device)
        grad = bag_grad(ctx.rows, flat, starts, starts + 1, grad_out.reshape(len(flat), ctx.dim), None)
        return grad, None, None


class _BagSum(torch.autograd.Function):
    """``embedding_bag(mode="sum")`` of rows W whose backward scatters the bags' gradients into W's rows
    in one pass (`bag_grad`). torch's dense embedding_bag backward sorts the indices on every call
    (~0.6 ms for 4096 ids on CPU, 4x the forward); the remapped indices here address a small leaf W, so a
    scatter is all the gradient needs. Used for mode "sum" without max_norm, scale_grad_by_freq or a
    per_sample_weights that needs a gradient; the output is torch's own forward. A padding row (the last
    row of W, all zeros) gets a gradient here that torch would leave zero; W's padding row is not a table
    row and is dropped."""

    @staticmethod
    def forward(ctx, weight, idx, offsets, psw, pad, include_last_offset):
        out = F.embedding_bag(
            idx,
            weight,
            offsets,
            mode="sum",
            per_sample_weights=psw,
            include_last_offset=include_last_offset,
            padding_idx=pad,
        )
        ctx.save_for_backward(idx, offsets, psw)
        ctx.rows, ctx.last = weight.shape[0], include_last_offset
        return out

    @staticmethod
    def backward(ctx, grad_out):
        idx, offsets, psw = ctx.saved_tensors
        flat = idx.reshape(-1)
        if offsets is None:  # 2-D input (B, L): bag b is row b
            starts = torch.arange(0, len(flat), max(idx.shape[1], 1), device=flat.device)[: idx.shape[0]]
            ends = starts + idx.shape[1]
        else:
            starts = offsets[:-1] if ctx.last else offsets
            ends = offsets[1:] if ctx.last else torch.cat([offsets[1:], offsets.new_tensor([len(flat)])])
        grad = bag_grad(ctx.rows, flat, starts, torch.maximum(ends, starts), grad_out, psw)
        return grad, None, None, None, None, None


def table_store(table) -> Any:
    """The Store a Table belongs to (None for a table-like object without one)."""
    store = getattr(table, "store", None)
    return store if store is not None else getattr(table, "_store", None)


def _embeddings_array(table, embeddings, keys) -> tuple[np.ndarray, np.ndarray]:
    """(int64 keys, float32 rows) for from_pretrained, checked against the table."""
    if isinstance(embeddings, Tensor):
        rows = embeddings.detach().to("cpu")
        if not rows.is_floating_point():
            raise InvalidTypeError(f"embeddings must be a floating point tensor, got {rows.dtype}")
        rows = rows.to(torch.float32).numpy()
    else:
        rows = np.asarray(embeddings)
        if rows.dtype.kind != "f":
            raise InvalidTypeError(f"embeddings must be a floating point array, got {rows.dtype}")
        rows = rows.astype(np.float32, copy=False)
    if rows.ndim != 2 or rows.shape[1] != table.dim:
        raise InvalidArgumentError(
            f"embeddings must be 2-D (n, {table.dim}) for table {table.name!r} (dim={table.dim}), "
            f"got shape {tuple(rows.shape)}"
        )
    if keys is None:
        return np.arange(len(rows), dtype=np.int64), rows
    k = keys.detach().cpu().numpy() if isinstance(keys, Tensor) else np.asarray(keys)
    if k.dtype.kind not in "iu" or k.dtype == np.bool_:
        raise InvalidTypeError(f"keys must be integer keys (int64), got {k.dtype}")
    if k.shape != (len(rows),):
        raise InvalidArgumentError(
            f"keys must be 1-D with one key per embedding row, shape ({len(rows)},), got shape {k.shape}"
        )
    return k, rows


def prepare_reads(modules: list[_TableModule], caller: str, stacklevel: int) -> None:
    """Before a forward reads the tables of `modules` (and before it records any read): the reads of dead
    graphs are released, once per optimizer (a release between two tables' reads could give back keys just
    read and not recorded yet), and a module that trains without a SparseOptimizer warns, once in its life.

    Args:
        modules: the modules whose tables the forward reads.
        caller: what the warning names (``"EmbeddingBag"``, ``"EmbeddingBagCollection"``).
        stacklevel: of the warning as seen from here, so that it points at the user's call.
    """
    owners = {id(m.optimizer): m.optimizer for m in modules if m.trains and m.optimizer is not None}
    for opt in owners.values():
        opt._sweep()
    unowned = [m for m in modules if m.trains and m.optimizer is None and not m._warned_unowned]
    if not unowned:
        return
    if len(modules) == 1:
        what = f"{caller}(table {unowned[0].table.name!r}) runs in training mode but belongs to"
        whose = "its"
    else:
        names = ", ".join(repr(m.table.name) for m in unowned)
        what = f"{caller} runs in training mode but tables {names} belong to"
        whose = "their"
    warnings.warn(
        f"{what} no SparseOptimizer: {whose} rows are read untracked and {whose} gradients are never applied",
        stacklevel=stacklevel,
    )
    for m in unowned:
        m._warned_unowned = True


class _TableModule(nn.Module):
    """What Embedding and EmbeddingBag share: the table, the device, padding, max_norm, reading rows."""

    def __init__(
        self,
        table,
        padding_idx: int | None,
        max_norm: float | None,
        norm_type: float,
        scale_grad_by_freq: bool,
        device: torch.device | str | None,
    ):
        super().__init__()
        for attr in ("get", "update", "release", "put", "dim", "name"):
            if not hasattr(table, attr):
                raise InvalidTypeError(
                    f"table must be an mlkv Table (store.table(...)), got {type(table).__name__}"
                )
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
                raise InvalidTypeError(
                    f"padding_idx must be an int key or None, got {type(padding_idx).__name__}"
                )
            if not -(2**63) <= int(padding_idx) < 2**63:
                raise InvalidArgumentError(f"padding_idx must be an int64 key, got {padding_idx}")
            padding_idx = int(padding_idx)
        if max_norm is not None:
            ok = isinstance(max_norm, (int, float, np.integer, np.floating)) and not isinstance(
                max_norm, bool
            )
            if not (ok and math.isfinite(max_norm) and max_norm > 0):
                raise InvalidArgumentError(f"max_norm must be a finite number > 0 or None, got {max_norm!r}")
            max_norm = float(max_norm)
        ok = isinstance(norm_type, (int, float, np.integer, np.floating)) and not isinstance(norm_type, bool)
        if not (ok and norm_type > 0):
            raise InvalidArgumentError(
                f"norm_type must be a number > 0 (the p of the p-norm), got {norm_type!r}"
            )
        if not isinstance(scale_grad_by_freq, (bool, np.bool_)):
            raise InvalidTypeError(
                f"scale_grad_by_freq must be a bool, got {type(scale_grad_by_freq).__name__}"
            )
        self.table = table
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = float(norm_type)
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        #: whether the rows are trained: torch's ``weight.requires_grad`` (see requires_grad_)
        self.requires_grad = True
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

    def requires_grad_(self, requires_grad: bool = True) -> _TableModule:
        """Train the rows (True) or freeze them (False), like ``weight.requires_grad_`` of nn.Embedding.

        A frozen module reads untracked (it holds no rows in the staleness gate), its outputs carry no
        gradient towards the rows, and its SparseOptimizer never updates its table for it (reads recorded
        before freezing are released at ``step()``). The module has no parameters, so ``model.requires_grad_``
        on a parent does not reach it: call it on this module.

        Args:
            requires_grad: whether autograd should record operations on the rows. Default: ``True``.

        Returns:
            self
        """
        if not isinstance(requires_grad, (bool, np.bool_)):
            raise InvalidTypeError(f"requires_grad must be a bool, got {type(requires_grad).__name__}")
        self.requires_grad = bool(requires_grad)
        return super().requires_grad_(requires_grad)

    @property
    def trains(self) -> bool:
        """Whether a forward now would be trained: training mode, grad enabled and not frozen."""
        return self.training and self.requires_grad and torch.is_grad_enabled()

    def _remap(self, keys_in: Tensor) -> tuple[np.ndarray, Tensor, int | None]:
        """(distinct non-padding keys, keys_in as indices into them, padding row index or None)."""
        check_key_tensor(keys_in)
        flat = keys_in.reshape(-1).to(torch.int64)
        if self.padding_idx is None:
            keys, idx = _dedup(flat)
            return keys, idx.reshape(keys_in.shape), None
        is_pad = flat == self.padding_idx
        keys, inv = _dedup(flat[~is_pad])
        idx = torch.full_like(flat, len(keys))  # the padding row sits after the table's rows
        idx[~is_pad] = inv
        return keys, idx.reshape(keys_in.shape), len(keys)

    def _read(self, keys: np.ndarray, pad: int | None) -> tuple[Tensor, Tensor, SparseOptimizer | None]:
        """(weight to index: W plus a zero padding row if any, the leaf W itself, the recording optimizer).
        Callers run `prepare_reads` first."""
        train = self.trains
        owner = self.optimizer if train else None
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

    def _write_renormed(self, keys: np.ndarray, before: Tensor, after: Tensor) -> None:
        """max_norm: put the rows torch renormalised in place (those that changed) back into the table."""
        changed = (before != after).any(dim=1).cpu().numpy()
        store = table_store(self.table)
        if not changed.any() or getattr(store, "readonly", False):
            return
        rows = after.detach()[torch.from_numpy(changed).to(after.device)].cpu().numpy()
        self.table.put(keys[changed], rows, reader=_RENORM_WRITER)

    def _run(self, keys_in: Tensor, compute) -> Tensor:
        """Dedup, read once, compute(weight, indices, padding row) with torch, record for the optimizer."""
        keys, idx, pad = self._remap(keys_in)
        # here <- _run <- forward <- Module._call_impl <- Module._wrapped_call_impl <- module(...)
        prepare_reads([self], type(self).__name__, stacklevel=6)
        weight, w, owner = self._read(keys, pad)
        try:
            before = w.detach().clone() if self.max_norm is not None and len(keys) else None
            out = compute(weight, idx.to(self.device), pad)
            if before is not None:  # torch renormalised the looked-up rows of `weight` in place
                self._write_renormed(keys, before, weight.detach()[: len(keys)])
        except BaseException:
            if owner is not None and len(keys):
                owner._release_unrecorded(self.table, keys)
            raise
        if owner is not None and len(keys):
            owner._record(self, keys, w)
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

    def _repr_common(self) -> str:
        s = ""
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}"
            if self.norm_type != 2.0:
                s += f", norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if not self.requires_grad:
            s += ", requires_grad=False"
        return s


class Embedding(_TableModule):
    r"""Like :class:`torch.nn.Embedding`, with rows in an mlkv Table (keys are any int64 values).

    Args:
        table: the mlkv Table holding the rows (``store.table(name, dim=..., optimizer=...)``).
        padding_idx: a key whose positions output zeros and get no gradient; never read or trained.
        max_norm: if given, each row looked up whose ``norm_type``-norm is larger than ``max_norm`` is
            renormalised to norm ``max_norm``, and written back to the table, as torch rewrites its weight.
        norm_type: the p of the p-norm for ``max_norm``. Default ``2.0``.
        scale_grad_by_freq: scale each row's gradient by the inverse of the key's frequency in the
            mini-batch (in this forward's input). Default ``False``.
        device: where outputs go (also follows ``module.to(device)``); rows are gathered on the CPU.

    Attributes:
        table: the Table. requires_grad: whether the rows are trained (``requires_grad_``).

    Shape:
        - Input: :math:`(*)`, int64 or int32 keys.
        - Output: :math:`(*, D)` float32, where D is ``table.dim``.

    Raises:
        InvalidTypeError (a TypeError): ``table`` is not a Table, input is not an int64/int32 tensor.
        InvalidArgumentError (a ValueError): ``max_norm`` <= 0, ``norm_type`` <= 0, ``padding_idx`` not int64.
    """

    def __init__(
        self,
        table,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        *,
        device=None,
    ):
        super().__init__(table, padding_idx, max_norm, norm_type, scale_grad_by_freq, device)

    @classmethod
    def from_pretrained(
        cls,
        table,
        embeddings,
        keys=None,
        freeze: bool = True,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        *,
        device=None,
    ) -> Embedding:
        r"""Write ``embeddings`` into ``table`` (``table.put``) and return an Embedding over it.

        Like :meth:`torch.nn.Embedding.from_pretrained`, except that the rows go to the table under
        ``keys``; the optimizer state of existing rows is kept.

        Args:
            table: the mlkv Table to write to and read from (its ``dim`` must be ``embeddings.shape[1]``).
            embeddings: float tensor or array :math:`(N, D)`, the rows.
            keys: int64 keys :math:`(N,)` of the rows. Default: ``arange(N)``, row i under key i.
            freeze: if ``True`` (the default), the module is frozen (``requires_grad_(False)``): it reads
                untracked and is never trained, as torch's ``weight.requires_grad = False``.
            padding_idx, max_norm, norm_type, scale_grad_by_freq, device: as for :class:`Embedding`.

        Returns:
            Embedding

        Raises:
            InvalidTypeError: ``embeddings`` not floating point, ``keys`` not integers.
            InvalidArgumentError: ``embeddings`` not :math:`(N, D)` for the table, ``keys`` not :math:`(N,)`.
        """
        m = cls(table, padding_idx, max_norm, norm_type, scale_grad_by_freq, device=device)
        k, rows = _embeddings_array(table, embeddings, keys)
        table.put(k, rows)
        return m.requires_grad_(not freeze)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's name
        fast = self.max_norm is None and not self.scale_grad_by_freq

        def compute(weight: Tensor, idx: Tensor, pad: int | None) -> Tensor:
            if fast and torch.is_grad_enabled() and weight.requires_grad:
                return _Lookup.apply(weight, idx, pad)
            return F.embedding(
                idx,
                weight,
                padding_idx=pad,
                max_norm=self.max_norm,
                norm_type=self.norm_type,
                scale_grad_by_freq=self.scale_grad_by_freq,
            )

        return self._run(input, compute)

    def extra_repr(self) -> str:
        return f"table={self.table.name!r}, embedding_dim={self.embedding_dim}" + self._repr_common()


class EmbeddingBag(_TableModule):
    r"""Like :class:`torch.nn.EmbeddingBag`, with rows in an mlkv Table (keys are any int64 values).

    Args:
        table: the mlkv Table holding the rows.
        mode: ``"sum"``, ``"mean"`` or ``"max"``; how each bag is reduced. Default ``"mean"``, as torch.
        include_last_offset: offsets has one more element, equal to ``len(input)`` (CSR format).
        padding_idx: a key left out of its bag (it does not count towards ``mean``); never read or trained.
        max_norm: if given, each row looked up whose ``norm_type``-norm is larger than ``max_norm`` is
            renormalised to norm ``max_norm``, and written back to the table, as torch rewrites its weight.
        norm_type: the p of the p-norm for ``max_norm``. Default ``2.0``.
        scale_grad_by_freq: scale each row's gradient by the inverse of the key's frequency in the
            mini-batch. Not with ``mode="max"``. Default ``False``.
        device: where outputs go (also follows ``module.to(device)``); rows are gathered on the CPU.

    ``forward(input, offsets=None, per_sample_weights=None)``:
        - input 2-D :math:`(B, N)`: B bags of N keys each; offsets must be None.
        - input 1-D :math:`(S,)` with offsets 1-D :math:`(B,)` (or :math:`(B+1,)` with include_last_offset),
          int64/int32, starting at 0, non-decreasing, at most S: bag i is ``input[offsets[i]:offsets[i+1]]``;
          an empty bag gives zeros.
        - per_sample_weights: floating point, same shape as input, mode ``"sum"`` only.
        - Output: :math:`(B, D)` float32.

    Gradients: every key of the input except padding gets a gradient row (zero if it did not contribute,
    as in max mode), exactly the rows a ``sparse=True`` nn.EmbeddingBag would put in its sparse gradient.

    Raises:
        InvalidTypeError (a TypeError): input or offsets not int64/int32, per_sample_weights not floating.
        InvalidArgumentError (a ValueError): unknown mode, bad shapes or offsets (nothing is read).
        UnsupportedError (a NotImplementedError): per_sample_weights with a mode other than ``"sum"``.
    """

    def __init__(
        self,
        table,
        mode: str = "mean",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        *,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        device=None,
    ):
        if mode not in _MODES:
            raise InvalidArgumentError(f"mode must be one of {_MODES}, got {mode!r}")
        if scale_grad_by_freq and mode == "max":
            raise InvalidArgumentError(
                "scale_grad_by_freq=True is not supported with mode='max' (as in torch)"
            )
        super().__init__(table, padding_idx, max_norm, norm_type, scale_grad_by_freq, device)
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)

    @classmethod
    def from_pretrained(
        cls,
        table,
        embeddings,
        keys=None,
        freeze: bool = True,
        *,
        mode: str = "mean",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        device=None,
    ) -> EmbeddingBag:
        r"""Write ``embeddings`` into ``table`` (``table.put``) and return an EmbeddingBag over it.

        Like :meth:`torch.nn.EmbeddingBag.from_pretrained`, except that the rows go to the table under
        ``keys``; the optimizer state of existing rows is kept.

        Args:
            table: the mlkv Table to write to and read from (its ``dim`` must be ``embeddings.shape[1]``).
            embeddings: float tensor or array :math:`(N, D)`, the rows.
            keys: int64 keys :math:`(N,)` of the rows. Default: ``arange(N)``, row i under key i.
            freeze: if ``True`` (the default), the module is frozen (``requires_grad_(False)``): it reads
                untracked and is never trained, as torch's ``weight.requires_grad = False``.
            mode, include_last_offset, padding_idx, max_norm, norm_type, scale_grad_by_freq, device: as for
                :class:`EmbeddingBag` (``mode`` defaults to ``"mean"``).

        Returns:
            EmbeddingBag

        Raises:
            InvalidTypeError: ``embeddings`` not floating point, ``keys`` not integers.
            InvalidArgumentError: ``embeddings`` not :math:`(N, D)` for the table, ``keys`` not :math:`(N,)`,
                unknown ``mode``.
        """
        m = cls(
            table,
            mode,
            include_last_offset,
            padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            device=device,
        )
        k, rows = _embeddings_array(table, embeddings, keys)
        table.put(k, rows)
        return m.requires_grad_(not freeze)

    def _check(self, keys_in: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None) -> None:
        """nn.EmbeddingBag's argument rules, checked before any row is read."""
        check_key_tensor(keys_in)
        if keys_in.dim() == 2:
            if offsets is not None:
                raise InvalidArgumentError("offsets must be None when input is 2-D (B bags of N keys each)")
        elif keys_in.dim() == 1:
            if not isinstance(offsets, Tensor) or offsets.dim() != 1:
                got = tuple(offsets.shape) if isinstance(offsets, Tensor) else offsets
                raise InvalidArgumentError(
                    f"a 1-D input needs 1-D offsets (one start per bag), got offsets {got}"
                )
            self._check_offsets(keys_in.numel(), offsets)
        else:
            raise InvalidArgumentError(
                f"input must be 1-D (with offsets) or 2-D, got shape {tuple(keys_in.shape)}"
            )
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise UnsupportedError(
                    f"per_sample_weights is only supported for mode='sum' (as in torch), got {self.mode!r}"
                )
            if not isinstance(per_sample_weights, Tensor) or not per_sample_weights.is_floating_point():
                got = getattr(per_sample_weights, "dtype", type(per_sample_weights).__name__)
                raise InvalidTypeError(f"per_sample_weights must be a floating point tensor, got {got}")
            if per_sample_weights.shape != keys_in.shape:
                raise InvalidArgumentError(
                    f"per_sample_weights must have the shape of input {tuple(keys_in.shape)}, "
                    f"got {tuple(per_sample_weights.shape)}"
                )

    def _check_offsets(self, n: int, offsets: Tensor) -> None:
        if offsets.dtype not in _INT_DTYPES:
            raise InvalidTypeError(f"offsets must be an int64 or int32 tensor, got {offsets.dtype}")
        o = offsets.detach().cpu()
        if self.include_last_offset and (o.numel() == 0 or int(o[-1]) != n):
            last = int(o[-1]) if o.numel() else None
            raise InvalidArgumentError(
                f"with include_last_offset=True the last offset must equal len(input) = {n}, got {last}"
            )
        if o.numel() == 0:
            return
        if int(o[0]) != 0:
            raise InvalidArgumentError(
                f"offsets[0] must be 0 (the first bag starts the input), got {int(o[0])}"
            )
        if bool((o[1:] < o[:-1]).any()):
            raise InvalidArgumentError(f"offsets must be non-decreasing, got {o.tolist()}")
        if int(o[-1]) > n:
            raise InvalidArgumentError(f"offsets must be at most len(input) = {n}, got {int(o[-1])}")

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

        fast = (
            self.mode == "sum"
            and self.max_norm is None
            and not self.scale_grad_by_freq
            and (per_sample_weights is None or not per_sample_weights.requires_grad)
        )

        def compute(weight: Tensor, idx: Tensor, pad: int | None) -> Tensor:
            if fast and torch.is_grad_enabled() and weight.requires_grad:
                return _BagSum.apply(weight, idx, offsets, per_sample_weights, pad, self.include_last_offset)
            return F.embedding_bag(
                idx,
                weight,
                offsets,
                max_norm=self.max_norm,
                norm_type=self.norm_type,
                scale_grad_by_freq=self.scale_grad_by_freq,
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
        return s + self._repr_common()

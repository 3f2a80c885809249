"""save_checkpoint / load_checkpoint: one consistent cut of the rows in the store and the dense model.

The store's checkpoint is the commit point. `save_checkpoint` first writes the dense state (model and dense
optimizer `state_dict`s) to `dense-<id>.pt` for the id the store is about to assign, atomically (temporary
file, fsync, rename, fsync of the directory), then calls `store.checkpoint({"dense": "dense-<id>.pt", ...})`.
A crash before the store checkpoint completes leaves the store at the previous checkpoint, whose dense file
is still there; a crash after leaves both. `load_checkpoint` reads `store.last_checkpoint()` — the state
`mlkv.open` recovered — and restores the dense file it names, so rows and dense parameters always match.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from ..durable_files import replace_atomically
from ..errors import MlkvError

_DENSE = re.compile(r"^dense-(\d+)\.pt$")


def dense_file_name(checkpoint_id: int) -> str:
    return f"dense-{checkpoint_id:08d}.pt"


def save_checkpoint(
    store,
    model: nn.Module,
    dense_optimizer: torch.optim.Optimizer | None,
    path: str | os.PathLike,
    metadata: dict | None = None,
    sparse_optimizer=None,
) -> int:
    """Checkpoint the store's rows together with the dense state of `model` and `dense_optimizer`.

    Args:
        store: the open mlkv Store holding the model's tables.
        model: its ``state_dict()`` is saved (mlkv modules contribute only their table name and store path).
        dense_optimizer: a torch optimizer whose ``state_dict()`` is saved, or None.
        path: a directory for the dense files (created if missing); use one directory per store.
        metadata: extra JSON-able entries stored in the store checkpoint (e.g. ``{"step": 1000}``).
        sparse_optimizer: a :class:`SparseOptimizer` whose ``state_dict()`` (learning rates and other
            hyper-parameters of its param groups, as LR schedulers set them) is saved too, or None.

    Returns the checkpoint id. Dense files of checkpoints the store no longer keeps are deleted once the
    new checkpoint is committed (with ``keep_checkpoints=1``, every older one). Call it between steps,
    after ``sparse_optimizer.step()``, so that no gradient is pending; asynchronous updates still queued
    (staleness bound >= 1) are applied before the cut.
    """
    extra = dict(metadata or {})
    if "dense" in extra:
        raise MlkvError("metadata key 'dense' is reserved for the dense state file name")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    last = store.last_checkpoint()
    ckpt = (last[0] if last else 0) + 1  # the id store.checkpoint will assign
    name = dense_file_name(ckpt)
    payload = {
        "checkpoint_id": ckpt,
        "model": model.state_dict(),
        "optimizer": dense_optimizer.state_dict() if dense_optimizer is not None else None,
        "sparse_optimizer": sparse_optimizer.state_dict() if sparse_optimizer is not None else None,
    }
    final = os.path.join(path, name)
    replace_atomically(final, lambda f: torch.save(payload, f))
    got = store.checkpoint({"dense": name, **extra})
    if got != ckpt:
        raise MlkvError(f"store assigned checkpoint id {got}, expected {ckpt}; dense state saved as {final}")
    kept = _kept_ids(store, ckpt)
    for entry in os.listdir(path):
        m = _DENSE.match(entry)
        if m and int(m.group(1)) < ckpt and int(m.group(1)) not in kept:
            os.remove(os.path.join(path, entry))
    return ckpt


def _kept_ids(store, last: int) -> set[int]:
    """Checkpoint ids the store keeps (its checkpoint history), or just the last one."""
    listing = getattr(store, "checkpoints", None)
    if listing is None:
        return {last}
    return {int(i) for i, _ in listing()}


def load_checkpoint(
    store,
    model: nn.Module,
    dense_optimizer: torch.optim.Optimizer | None,
    path: str | os.PathLike,
    sparse_optimizer=None,
) -> dict:
    """Restore the dense state that belongs to the store's last checkpoint (the rows it recovered).

    Loads ``model`` (and ``dense_optimizer`` and ``sparse_optimizer`` unless None) from the dense file in
    `path` named by ``store.last_checkpoint()``. Returns that checkpoint's metadata (with
    ``"checkpoint_id"`` added).
    Raises MlkvError when the store has no checkpoint, when its last checkpoint carries no dense state
    (rows were checkpointed later, e.g. by ``store.close()`` after more training), or when the dense file
    is missing or belongs to another checkpoint.
    """
    path = os.fspath(path)
    last = store.last_checkpoint()
    if last is None:
        raise MlkvError(f"store {store.path} has no checkpoint to load")
    ckpt, meta = last
    if not isinstance(meta, dict) or "dense" not in meta:
        raise MlkvError(
            f"the last checkpoint ({ckpt}) of store {store.path} has no dense state: its rows were "
            "checkpointed without save_checkpoint (store.checkpoint() or store.close() after more updates), "
            "so no saved dense model matches them"
        )
    file = os.path.join(path, os.path.basename(meta["dense"]))
    if not os.path.exists(file):
        raise MlkvError(f"dense state {file} of checkpoint {ckpt} is missing")
    payload = torch.load(file, map_location="cpu", weights_only=True)
    if payload.get("checkpoint_id") != ckpt:
        raise MlkvError(
            f"{file} holds the dense state of checkpoint {payload.get('checkpoint_id')}, "
            f"the store is at checkpoint {ckpt}"
        )
    model.load_state_dict(payload["model"])
    if dense_optimizer is not None:
        if payload["optimizer"] is None:
            raise MlkvError(f"{file} was saved without a dense optimizer state")
        dense_optimizer.load_state_dict(payload["optimizer"])
    if sparse_optimizer is not None:
        if payload.get("sparse_optimizer") is None:
            raise MlkvError(f"{file} was saved without a sparse optimizer state")
        sparse_optimizer.load_state_dict(payload["sparse_optimizer"])
    return {**meta, "checkpoint_id": ckpt}

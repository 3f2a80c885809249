"""reshard: stream the rows of a sharded store into a new set of shards for another world size.

`mlkv reshard IN --world-size N OUT`. Reads every shard of IN readonly at its last collective checkpoint
(all shards must agree on it, as `open` requires), and writes each row, embedding AND optimizer state, to
shard `owner_of(key, N)` of OUT, table by table, `batch_size` rows at a time (memory: one batch plus the
output stores' memory tiers). Each output table gets the input's step counter (Adam's bias correction).
The dense state of IN's checkpoint (the file its metadata names under "dense", found in a directory of the
first input shard) is copied into the same directory of every output shard, renamed for the output's
checkpoint id, so `--resume` with N ranks continues the run. OUT must not exist or be empty; IN is never
written. Not atomic: a crash leaves OUT partial (without commit records, so `open` refuses nothing yet but
its checkpoints are incomplete): delete OUT and run again.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from .. import store as _store
from ..durable_files import replace_atomically
from ..errors import InvalidArgumentError, MlkvError
from ..init import init_from_config
from ..torch.checkpoint import dense_file_name
from . import layout
from .hashing import owner_of

_KEY = "mlkv.distributed"


def _engine_of(path: str) -> str:
    from ..cli import store_engine  # the marker file names the engine

    return store_engine(path)


def _full_rows(store, name: str, codec, batch_size: int):
    """(keys, float32 rows with optimizer state) of a readonly store's table (`codec`: its RowCodec, which
    decodes 16-bit embeddings), in file order."""
    with store._ctx.engine_lock.read():
        batches = store._engine.scan(name, batch_size)
    while True:
        with store._ctx.engine_lock.read():
            batch = next(batches, None)
        if batch is None:
            return
        keys, raw = batch
        yield keys, codec.from_bytes(raw)


def _write_full_rows(table, keys: np.ndarray, rows: np.ndarray) -> None:
    """Set whole rows (embedding and optimizer state) of distinct keys, as Table.put does for embeddings."""
    st = table.store
    with st._ctx.lock:
        st._ctx.enter(table)
        slots, current = table._gather(keys, True)
        current[:] = rows
        table._store_rows(keys, slots, current)


def _dense_dir(shard: str, file: str) -> str | None:
    for entry in sorted(os.listdir(shard)):
        if os.path.isfile(os.path.join(shard, entry, file)):
            return entry
    return None


def reshard(
    src: str,
    world_size: int,
    dst: str,
    batch_size: int = 65536,
    cache_bytes: int | str = "64MiB",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Copy the sharded store `src` into `world_size` new shards in `dst`.

    Args:
        src: root of a sharded store (``rank-r-of-M`` directories).
        world_size: the number of output shards N >= 1.
        dst: output root; must not exist or be empty.
        batch_size: rows moved per batch.
        cache_bytes: memory tier of each output store while writing.
        progress: called with the number of rows of each batch written.

    Returns:
        ``{"rows": total rows, "tables": {name: rows}, "from": M, "to": N, "checkpoint_id": output id}``.

    Raises:
        MlkvError: src is not one consistent sharded store, or dst is not empty.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgumentError(f"world_size must be an int >= 1, got {world_size!r}")
    sizes = layout.shard_sizes(src)
    if len(sizes) != 1:
        found = sorted(sizes)
        raise MlkvError(f"{src} is not a sharded store with one world size (found shards for {found} ranks)")
    m = sizes.pop()
    if os.path.exists(dst) and os.listdir(dst):
        raise MlkvError(f"output {dst} exists and is not empty")
    ins = []
    try:
        for r in range(m):
            d = layout.shard_dir(src, r, m)
            ins.append(_store.open_store(d, readonly=True, create=False, engine=_engine_of(d)))
        lasts = [s.last_checkpoint() for s in ins]
        ids = [last[0] if last else 0 for last in lasts]
        records = [layout.read_record(src, r, m) for r in range(m)]
        common, why = layout.agree(ids, records)
        if why is not None:
            raise MlkvError(f"cannot reshard {src}: {why}")
        meta = dict(lasts[0][1] or {}) if lasts[0] else {}
        meta.pop(_KEY, None)
        return _copy(src, ins, m, world_size, dst, meta, batch_size, cache_bytes, progress, common)
    finally:
        for s in ins:
            s.close()


def _copy(src, ins, m, n, dst, meta, batch_size, cache_bytes, progress, common) -> dict:
    engine = ins[0].engine_name
    os.makedirs(dst, exist_ok=True)
    outs = [
        _store.open_store(layout.shard_dir(dst, r, n), engine=engine, cache_bytes=cache_bytes)
        for r in range(n)
    ]
    counts: dict[str, int] = {}
    try:
        for name in ins[0].tables():
            srcs = [s.table(name) for s in ins]
            t0 = srcs[0]
            schema = t0.schema()
            kwargs = {"dim": t0.dim, "dtype": t0.dtype, "optimizer": t0.optimizer}
            if t0.dtype != "float32":
                kwargs["stochastic_rounding"] = t0.stochastic_rounding
            if schema.get("init", {}).get("kind") != "callable":
                kwargs["init"] = init_from_config(schema["init"])
            dsts = [o.table(name, **kwargs) for o in outs]
            counts[name] = 0
            for t in srcs:
                for keys, rows in _full_rows(t.store, name, t._codec, batch_size):
                    own = owner_of(keys, n)
                    for r in range(n):
                        mine = own == r
                        if mine.any():
                            _write_full_rows(dsts[r], keys[mine], rows[mine])
                    counts[name] += len(keys)
                    if progress is not None:
                        progress(len(keys))
            for d in dsts:
                d.step = max(t.step for t in srcs)
        ckpt = _checkpoint_outputs(ins[0].path, outs, n, dst, meta, common)
    finally:
        for o in outs:
            o.close(checkpoint=False)
    return {"rows": sum(counts.values()), "tables": counts, "from": m, "to": n, "checkpoint_id": ckpt}


def _checkpoint_outputs(first_in: str, outs, n: int, dst: str, meta: dict, common: int) -> int:
    """Commit every output shard at one id with IN's metadata (its dense file copied and renamed)."""
    ckpt = 1  # fresh stores
    dense_src = None
    if "dense" in meta:
        sub = _dense_dir(first_in, meta["dense"])
        if sub is None:
            raise MlkvError(f"dense state {meta['dense']} of checkpoint {common} not found in {first_in}")
        dense_src = (sub, os.path.join(first_in, sub, meta["dense"]))
    for r, o in enumerate(outs):
        extra = {}
        if dense_src is not None:
            payload = torch.load(dense_src[1], map_location="cpu", weights_only=True)
            payload["checkpoint_id"] = ckpt
            os.makedirs(os.path.join(o.path, dense_src[0]), exist_ok=True)
            name = dense_file_name(ckpt)
            target = os.path.join(o.path, dense_src[0], name)
            replace_atomically(target, lambda f, p=payload: torch.save(p, f))
            extra["dense"] = name
        got = o.checkpoint({**meta, **extra, _KEY: {"rank": r, "world_size": n, "id": ckpt}})
        if got != ckpt:
            raise MlkvError(f"output shard {o.path} committed checkpoint {got}, expected {ckpt}")
    for r in range(n):
        layout.write_record(dst, r, n, ckpt)
    return ckpt


__all__ = ["reshard"]

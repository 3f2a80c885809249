"""mlkv.distributed: embedding tables hash-sharded over the ranks of a torch.distributed job.

    import mlkv.distributed as mdist
    mdist.init(timeout=120)                      # under torchrun: joins the process group (gloo on CPU)
    store = mdist.open("/data/ctr", cache_bytes="4GiB")   # this rank's shard: /data/ctr/rank-R-of-N
    emb = mlkv.torch.EmbeddingBag(store.table("user", dim=64, optimizer=mlkv.optim.Adagrad(0.05)))
    ...  # forward, backward; scale the loss by the rank's share of the global batch
    mdist.all_reduce_gradients(dense_params, store.world_size); dense_opt.step(); sparse_opt.step()
    mlkv.torch.save_checkpoint(store, model, dense_opt, os.path.join(store.path, "dense"))  # collective

Design, hash, checkpoint protocol, failure behaviour and scaling estimates: docs/distributed.md.
"""

from .group import DEFAULT_TIMEOUT_S, DistributedError, all_reduce_gradients, init, rank_and_size, shutdown
from .hashing import HASH_NAME, owner_of
from .reshard import reshard
from .store import ShardedStore, open  # noqa: A004 - mlkv.distributed.open mirrors mlkv.open
from .table import ShardedTable

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HASH_NAME",
    "DistributedError",
    "ShardedStore",
    "ShardedTable",
    "all_reduce_gradients",
    "init",
    "open",
    "owner_of",
    "rank_and_size",
    "reshard",
    "shutdown",
]

"""mlkv.torch: PyTorch modules over mlkv tables, the sparse optimizer that trains them, look-ahead loading.

from mlkv.torch import Embedding, EmbeddingBag, SparseOptimizer, Prefetcher
emb = EmbeddingBag(store.table("user", dim=64, optimizer=mlkv.optim.Adagrad(0.05)), mode="sum")
sparse_opt = SparseOptimizer([emb])
for batch in Prefetcher(loader, keys=lambda b: {"user": b["user_ids"]}, tables=store, depth=8):
    loss = model(batch); loss.backward(); dense_opt.step(); sparse_opt.step()
    dense_opt.zero_grad(); sparse_opt.zero_grad()
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .collection import EmbeddingBagCollection
from .modules import Embedding, EmbeddingBag
from .prefetcher import Prefetcher
from .sparse_optimizer import SparseOptimizer

__all__ = [
    "Embedding",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "Prefetcher",
    "SparseOptimizer",
    "load_checkpoint",
    "save_checkpoint",
]

"""mlkv.torch on CUDA: a forward/backward/step on the GPU gives the CPU run's outputs, gradients and rows.

Rows are gathered on the CPU, copied to the GPU through pinned memory (non_blocking), and the gradients come
back to the CPU for `table.update`; the device must change nothing but where the math runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlkv
from mlkv.torch import Embedding, EmbeddingBag, EmbeddingBagCollection, SparseOptimizer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)


def run(tmp_path, device: str):
    rng = np.random.default_rng(0)
    with mlkv.open(tmp_path / device, cache_bytes=8192) as store:
        user = EmbeddingBag(
            store.table("user", dim=16, optimizer=mlkv.optim.Adagrad(lr=0.1)), mode="mean", device=device
        )
        item = Embedding(store.table("item", dim=16, optimizer=mlkv.optim.Adam(lr=0.01)), padding_idx=0)
        feats = EmbeddingBagCollection(
            [store.table(f"f{i}", dim=16, optimizer=mlkv.optim.SGD(lr=0.05)) for i in range(2)]
        )
        torch.manual_seed(0)
        head = torch.nn.Linear(16, 1)
        model = torch.nn.ModuleDict({"user": user, "item": item, "feats": feats, "head": head}).to(device)
        assert item.device.type == torch.device(device).type  # followed .to(device)
        sparse_opt = SparseOptimizer(model)
        dense_opt = torch.optim.SGD(head.parameters(), lr=0.1)
        losses, outputs = [], []
        for _ in range(5):
            users = torch.from_numpy(rng.integers(0, 300, size=(64, 4))).to(device)
            items = torch.from_numpy(rng.integers(0, 100, size=(64, 2))).to(device)
            fk = torch.from_numpy(rng.integers(0, 50, size=(64, 2, 3))).to(device)
            target = torch.from_numpy(rng.random(64, dtype=np.float32)).to(device)
            out = user(users) + item(items).sum(1) + feats(fk).sum(1)
            assert out.device.type == torch.device(device).type
            outputs.append(out.detach().cpu())
            loss = torch.nn.functional.mse_loss(head(out).squeeze(1), target)
            dense_opt.zero_grad()
            sparse_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            sparse_opt.step()
            losses.append(loss.item())
        rows = {
            n: np.asarray(store.table(n).get(np.arange(300), track=False)).copy()
            for n in ("user", "item", "f0", "f1")
        }
        return losses, outputs, rows, {k: v.detach().cpu() for k, v in head.state_dict().items()}


def test_cuda_step_equals_cpu(tmp_path):
    cpu = run(tmp_path, "cpu")
    gpu = run(tmp_path, "cuda")
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-5)
    for a, b in zip(gpu[1], cpu[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n in cpu[2]:
        np.testing.assert_allclose(gpu[2][n], cpu[2][n], rtol=1e-5, atol=1e-6)
    for k in cpu[3]:
        torch.testing.assert_close(gpu[3][k], cpu[3][k], rtol=1e-5, atol=1e-6)

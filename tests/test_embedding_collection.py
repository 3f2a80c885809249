"""EmbeddingBagCollection against one torch.nn.EmbeddingBag per table: same outputs, same gradients, the
same reads and updates as one mlkv EmbeddingBag per table, every hold resolved, bad input refused unread.

Tables use SGD(lr=1), so `row_before - row_after` is exactly the gradient a step pushed (as in
test_torch_modules); the oracle is torch's own EmbeddingBag holding the same rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_helpers import SpyTable

import mlkv
from mlkv.errors import InvalidArgumentError, InvalidTypeError
from mlkv.torch import EmbeddingBag, EmbeddingBagCollection, Prefetcher, SparseOptimizer
from mlkv.torch.dedup_memo import MEMO

DIM = 5
N_TABLES = 3
#: every table's keys: hashed ids over the whole int64 range
UNIVERSE = np.array([-(2**63), -9, 0, 1, 2, 7, 2**40 + 3, 2**63 - 1], dtype=np.int64)


@pytest.fixture
def store(tmp_path):
    s = mlkv.open(tmp_path / "store", cache_bytes="1MiB", staleness_timeout=5.0)
    yield s
    s.close()


def sgd_tables(store, n=N_TABLES, dim=DIM) -> list[SpyTable]:
    return [SpyTable(store.table(f"t{i}", dim=dim, optimizer=mlkv.optim.SGD(lr=1.0))) for i in range(n)]


def rows_of(table) -> np.ndarray:
    return np.asarray(getattr(table, "_t", table).get(UNIVERSE, track=False)).copy()


def torch_bag(table, mode: str) -> torch.nn.EmbeddingBag:
    """torch's EmbeddingBag over the table's rows (row i = UNIVERSE[i])."""
    ref = torch.nn.EmbeddingBag(len(UNIVERSE), table.dim, mode=mode)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rows_of(table)))
    return ref


def as_rows(keys: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.searchsorted(UNIVERSE, keys.numpy())).long()


def batch(seed: int, shape) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).choice(UNIVERSE, size=shape))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(17, N_TABLES), (9, N_TABLES, 4)])
def test_forward_and_step_match_torch_embedding_bags(store, mode, shape):
    tables = sgd_tables(store)
    ebc = EmbeddingBagCollection(tables, mode=mode)
    opt = SparseOptimizer(ebc)
    refs = [torch_bag(t, mode) for t in tables]
    before = [rows_of(t) for t in tables]
    keys = batch(1, shape)
    bags = keys.unsqueeze(2) if keys.dim() == 2 else keys

    out = ebc(keys)
    expected = torch.stack([r(as_rows(bags[:, i])) for i, r in enumerate(refs)], dim=1)
    assert out.shape == (shape[0], N_TABLES, DIM)
    torch.testing.assert_close(out, expected)

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    opt.step()
    for i, (t, ref) in enumerate(zip(tables, refs, strict=True)):
        np.testing.assert_allclose(before[i] - rows_of(t), ref.weight.grad.numpy(), rtol=1e-5, atol=1e-6)
        assert len(t.updates) == 1 and t.updates[0][1] is opt.reader
        assert set(t.updates[0][0].tolist()) == set(bags[:, i].reshape(-1).tolist())
        assert t.outstanding() == 0
    assert opt.pending_reads == 0


def test_training_equals_one_mlkv_embedding_bag_per_table(tmp_path):
    """Adagrad over several steps: the collection and a module per table leave bit-identical tables."""

    def train(path, collection: bool) -> list[np.ndarray]:
        opt_rule = mlkv.optim.Adagrad(lr=0.3)
        with mlkv.open(path, cache_bytes="1MiB") as s:
            tables = [
                s.table(
                    f"t{i}",
                    dim=DIM,
                    optimizer=opt_rule,
                    init=mlkv.init.Normal(0, 0.1, seed=i),
                )
                for i in range(N_TABLES)
            ]
            if collection:
                model = EmbeddingBagCollection(tables)
            else:
                mods = [EmbeddingBag(t, mode="sum") for t in tables]
                model = torch.nn.ModuleList(mods)
            opt = SparseOptimizer(model)
            for step in range(4):
                keys = batch(10 + step, (32, N_TABLES))
                if collection:
                    out = model(keys)
                else:
                    out = torch.stack([m(keys[:, i : i + 1]) for i, m in enumerate(mods)], dim=1)
                out.square().sum().backward()
                opt.step()
                opt.zero_grad()
            return [t.get(UNIVERSE, track=False) for t in tables]

    for a, b in zip(train(tmp_path / "a", True), train(tmp_path / "b", False), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_and_no_grad_read_untracked(store):
    tables = sgd_tables(store)
    ebc = EmbeddingBagCollection(tables)
    opt = SparseOptimizer(ebc)
    keys = batch(3, (6, N_TABLES))
    ebc.eval()
    out = ebc(keys)
    assert not out.requires_grad
    ebc.train()
    with torch.no_grad():
        torch.testing.assert_close(ebc(keys), out)
    assert all(track is False for t in tables for _, track, _ in t.gets)
    opt.step()
    assert all(t.updates == [] and t.outstanding() == 0 for t in tables)


def test_a_frozen_member_is_read_untracked_and_never_trained(store):
    tables = sgd_tables(store)
    ebc = EmbeddingBagCollection(tables)
    opt = SparseOptimizer(ebc)
    ebc[1].requires_grad_(False)
    before = rows_of(tables[1])
    ebc(batch(4, (8, N_TABLES))).sum().backward()
    opt.step()
    assert tables[1].updates == [] and all(track is False for _, track, _ in tables[1].gets)
    np.testing.assert_array_equal(rows_of(tables[1]), before)
    assert len(tables[0].updates) == 1 and len(tables[2].updates) == 1
    assert all(t.outstanding() == 0 for t in tables)


def test_a_table_listed_twice_gets_one_update_with_summed_gradients(store):
    (t,) = sgd_tables(store, n=1)
    ebc = EmbeddingBagCollection([t, t])
    opt = SparseOptimizer(ebc)
    ref = torch_bag(t, "sum")
    before = rows_of(t)
    keys = batch(5, (7, 2))
    ebc(keys).sum().backward()
    ref(as_rows(keys.reshape(-1, 1))).sum().backward()
    opt.step()
    np.testing.assert_allclose(before - rows_of(t), ref.weight.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert len(t.updates) == 1 and t.outstanding() == 0


class _FailingGet(SpyTable):
    def get(self, keys, track=True, reader=None):
        raise OSError("disk gone")


def test_a_failed_read_gives_back_the_holds_of_the_tables_read_before_it(store):
    tables = sgd_tables(store)
    tables[2] = _FailingGet(tables[2]._t)
    ebc = EmbeddingBagCollection(tables)
    opt = SparseOptimizer(ebc)
    with pytest.raises(OSError, match="disk gone"):
        ebc(batch(6, (5, N_TABLES)))
    assert tables[0].outstanding() == 0 and tables[1].outstanding() == 0
    assert len(tables[0].releases) == 1 and opt.pending_reads == 0


@pytest.mark.parametrize(
    "keys, error, match",
    [
        (
            torch.zeros(4, N_TABLES + 1, dtype=torch.int64),
            InvalidArgumentError,
            r"\(B, 3\).*got shape \(4, 4\)",
        ),
        (torch.zeros(4, dtype=torch.int64), InvalidArgumentError, r"got shape \(4,\)"),
        (torch.zeros(4, N_TABLES, 0, dtype=torch.int64), InvalidArgumentError, "L >= 1"),
        (torch.zeros(4, N_TABLES), InvalidTypeError, "torch.float32"),
        (np.zeros((4, N_TABLES), dtype=np.int64), InvalidTypeError, "ndarray"),
    ],
)
def test_bad_input_is_refused_before_any_read(store, keys, error, match):
    tables = sgd_tables(store)
    ebc = EmbeddingBagCollection(tables)
    SparseOptimizer(ebc)
    with pytest.raises(error, match=match):
        ebc(keys)
    assert all(t.gets == [] for t in tables)
    assert all(len(t._t) == 0 for t in tables)  # no row was created


def test_constructor_refuses_what_cannot_be_one_collection(store):
    a = store.table("a", dim=4, optimizer=mlkv.optim.SGD(lr=0.1))
    b = store.table("b", dim=6, optimizer=mlkv.optim.SGD(lr=0.1))
    with pytest.raises(InvalidArgumentError, match=r"share one dim.*'a': 4, 'b': 6"):
        EmbeddingBagCollection([a, b])
    with pytest.raises(InvalidArgumentError, match="empty"):
        EmbeddingBagCollection([])
    with pytest.raises(InvalidArgumentError, match="'max'"):
        EmbeddingBagCollection([a], mode="max")
    with pytest.raises(InvalidTypeError, match="sequence"):
        EmbeddingBagCollection(a)
    with pytest.raises(InvalidTypeError, match="mlkv Table"):
        EmbeddingBagCollection([a, "b"])


def test_members_are_embedding_bags_with_their_own_state_and_param_groups(store):
    tables = sgd_tables(store)
    ebc = EmbeddingBagCollection(tables, mode="mean")
    assert all(isinstance(m, EmbeddingBag) and m.mode == "mean" for m in ebc)
    assert list(ebc.state_dict()) == [f"{i}._extra_state" for i in range(N_TABLES)]
    opt = SparseOptimizer(ebc)
    assert [g["table"] for g in opt.param_groups] == [f"t{i}" for i in range(N_TABLES)]
    keys = batch(7, (5, N_TABLES))
    torch.testing.assert_close(ebc(keys)[:, 1], ebc[1](keys[:, 1:2]))
    assert ebc.embedding_dim == DIM


def test_the_prefetchers_dedup_is_reused_for_every_table(tmp_path):
    with mlkv.open(tmp_path / "s", cache_bytes="1MiB") as s:
        tables = [s.table(f"t{i}", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1)) for i in range(N_TABLES)]
        ebc = EmbeddingBagCollection(tables)
        opt = SparseOptimizer(ebc)
        data = [batch(20 + i, (64, N_TABLES)) for i in range(5)]
        MEMO.clear()
        hits = MEMO.hits
        keys = lambda b: {f"t{i}": b[:, i] for i in range(N_TABLES)}  # noqa: E731
        for b in Prefetcher(data, keys, s, depth=2):
            ebc(b).sum().backward()
            opt.step()
            opt.zero_grad()
        assert MEMO.hits - hits == 5 * N_TABLES


def test_an_empty_batch_gives_empty_bags_and_reads_nothing(store):
    tables = sgd_tables(store)
    ebc = EmbeddingBagCollection(tables)
    opt = SparseOptimizer(ebc)
    out = ebc(torch.zeros(0, N_TABLES, dtype=torch.int64))
    assert out.shape == (0, N_TABLES, DIM)
    out.sum().backward()
    opt.step()
    assert all(t.updates == [] and t.outstanding() == 0 for t in tables)


class _GetRunsFirst(SpyTable):
    """A table whose next get first runs `before` (here: drops an abandoned forward's output, as the
    garbage collector may at any allocation)."""

    before = None

    def get(self, keys, track=True, reader=None):
        if self.before is not None:
            self.before()
            self.before = None
        return super().get(keys, track=track, reader=reader)


def test_a_graph_dying_between_two_tables_reads_releases_none_of_the_new_reads(store):
    tables = sgd_tables(store)
    tables[1] = _GetRunsFirst(tables[1]._t)
    ebc = EmbeddingBagCollection(tables)
    opt = SparseOptimizer(ebc)
    keys = batch(8, (6, N_TABLES))
    abandoned = {"out": ebc(keys)}  # never backpropagated: its reads are released once its graph dies
    tables[1].before = lambda: abandoned.clear()
    out = ebc(keys)  # the same keys again: table 0 is read before the old graph dies, table 1 after
    assert tables[0].held[opt.reader] == set(keys[:, 0].tolist())  # still held for this forward
    out.sum().backward()
    opt.step()
    assert all(t.outstanding() == 0 for t in tables)


def test_requires_grad_of_the_collection_freezes_every_member(store):
    tables = sgd_tables(store)
    ebc = EmbeddingBagCollection(tables)
    opt = SparseOptimizer(ebc)
    assert ebc.requires_grad_(False) is ebc
    assert not any(m.requires_grad for m in ebc)
    assert not ebc(batch(9, (4, N_TABLES))).requires_grad
    opt.step()
    assert all(t.updates == [] and t.outstanding() == 0 for t in tables)


def test_a_collection_without_optimizer_warns_once_naming_its_tables(store):
    ebc = EmbeddingBagCollection(sgd_tables(store))
    with pytest.warns(UserWarning, match="tables 't0', 't1', 't2' belong to no SparseOptimizer") as got:
        ebc(batch(10, (4, N_TABLES)))
        ebc(batch(11, (4, N_TABLES)))
    assert len(got) == 1

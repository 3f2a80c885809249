"""mlkv.torch modules against torch.nn: same outputs and gradients, every read resolved, state, checkpoints.

The reference for each check is a torch.nn.Embedding / EmbeddingBag holding the same rows (read from the
table untracked), its input remapped from keys to row numbers. Gradients are compared through their effect:
the tables here use SGD(lr=1), so `row_before - row_after` is exactly the gradient `step()` pushed, and a
spy around the table shows which keys each `update`/`release` got and for which reader.
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch_helpers import SpyTable

import mlkv
from mlkv.torch import Embedding, EmbeddingBag, SparseOptimizer, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

DIM = 6
#: keys spread over the whole int64 range (hashed ids), a few of them repeated by every batch
UNIVERSE = np.array([-(2**63), -7, 0, 1, 2, 3, 5, 8, 13, 21, 2**40 + 1, 2**63 - 1], dtype=np.int64)
PAD = 13


@pytest.fixture
def store(tmp_path):
    s = mlkv.open(tmp_path / "store", cache_bytes="1MiB", staleness_timeout=5.0)
    yield s
    s.close()


def sgd_table(store, name="t", dim=DIM) -> SpyTable:
    return SpyTable(store.table(name, dim=dim, optimizer=mlkv.optim.SGD(lr=1.0)))


def rows_of(table, keys=UNIVERSE) -> np.ndarray:
    """The rows as stored (read untracked, past any spy)."""
    table = getattr(table, "_t", table)
    return np.asarray(table.get(keys, track=False)).copy()


def as_rows(keys: np.ndarray) -> torch.Tensor:
    """Keys -> row numbers of UNIVERSE (the torch reference's weight rows)."""
    return torch.from_numpy(np.searchsorted(UNIVERSE, keys)).long()


def torch_twin(cls, table, padding_idx=None, **kw):
    """A torch.nn module holding the table's rows (padding row zero, as nn.Embedding makes it)."""
    pad_row = int(np.searchsorted(UNIVERSE, padding_idx)) if padding_idx is not None else None
    ref = cls(len(UNIVERSE), table.dim, padding_idx=pad_row, **kw)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rows_of(table)))
        if pad_row is not None:
            ref.weight[pad_row] = 0
    return ref


def random_keys(rng, shape) -> torch.Tensor:
    return torch.from_numpy(rng.choice(UNIVERSE, size=shape))


def ref_grad(ref) -> np.ndarray:
    g = ref.weight.grad
    return (g.to_dense() if g.is_sparse else g).numpy()


def touched(ref) -> set[int]:
    """Keys whose row a sparse gradient of `ref` names (every looked-up key but padding)."""
    g = ref.weight.grad.coalesce()
    return set(UNIVERSE[g.indices()[0].numpy()].tolist())


def assert_step_matches(table: SpyTable, before: np.ndarray, ref, expect_keys: set[int]) -> None:
    """SGD(lr=1): the rows moved by exactly the reference gradient, and one update named expect_keys."""
    np.testing.assert_allclose(before - rows_of(table), ref_grad(ref), rtol=1e-5, atol=1e-6)
    assert len(table.updates) == 1
    assert set(table.updates[0][0].tolist()) == expect_keys
    assert table.outstanding() == 0


# ---- Embedding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(9,), (4, 5), (2, 3, 4), (0,)])
def test_embedding_forward_and_gradient_match_torch(store, shape):
    rng = np.random.default_rng(1)
    t = sgd_table(store)
    emb = Embedding(t)
    opt = SparseOptimizer([emb])
    ref = torch_twin(torch.nn.Embedding, t, sparse=True)
    keys = random_keys(rng, shape)
    before = rows_of(t)
    out = emb(keys)
    expected = ref(as_rows(keys.numpy()))
    assert out.shape == (*shape, DIM) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    weights = torch.from_numpy(rng.standard_normal((*shape, DIM), dtype=np.float32))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    opt.step()
    if keys.numel() == 0:
        assert t.updates == [] and t.gets == []
        return
    assert len(t.gets) == 1 and t.gets[0][1] is True and t.gets[0][2] is opt.reader
    assert sorted(t.gets[0][0].tolist()) == sorted(set(keys.flatten().tolist()))  # one read, deduplicated
    assert_step_matches(t, before, ref, touched(ref))


def test_embedding_int32_input(store):
    t = sgd_table(store)
    emb = Embedding(t).eval()
    keys = torch.tensor([1, 2, 2, 3])
    torch.testing.assert_close(emb(keys.int()), emb(keys))


def test_embedding_padding_reads_zero_and_is_never_touched(store):
    t = sgd_table(store)
    emb = Embedding(t, padding_idx=PAD)
    opt = SparseOptimizer([emb])
    ref = torch_twin(torch.nn.Embedding, t, padding_idx=PAD, sparse=True)
    keys = torch.tensor([[PAD, 1, 2], [2, PAD, PAD]])
    before = rows_of(t)
    out = emb(keys)
    expected = ref(as_rows(keys.numpy()))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out[keys == PAD] == 0).all()
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    opt.step()
    assert PAD not in t.gets[0][0].tolist()
    assert_step_matches(t, before, ref, {1, 2})
    only_pad = emb(torch.tensor([PAD, PAD]))
    assert (only_pad == 0).all() and len(t.gets) == 1  # nothing to read at all


# ---- EmbeddingBag ---------------------------------------------------------------------------------------
def bags(rng, n_bags: int, layout: str):
    """(input, offsets) for `layout`: '1d' variable bags (some empty), 'last' the same with
    include_last_offset, '2d' fixed-size bags."""
    if layout == "2d":
        return random_keys(rng, (n_bags, 4)), None
    sizes = rng.integers(0, 5, size=n_bags)
    sizes[1] = 0  # an empty bag in the middle
    flat = random_keys(rng, (int(sizes.sum()),))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    offsets = torch.from_numpy(starts if layout == "last" else starts[:-1])
    return flat, offsets


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["1d", "last", "2d"])
@pytest.mark.parametrize("padding", [None, PAD])
def test_embedding_bag_forward_and_gradient_match_torch(store, mode, layout, padding):
    rng = np.random.default_rng(7)
    t = sgd_table(store)
    last = layout == "last"
    emb = EmbeddingBag(t, mode=mode, include_last_offset=last, padding_idx=padding)
    opt = SparseOptimizer([emb])
    # torch has no sparse gradient in max mode; its dense gradient holds the same numbers
    ref = torch_twin(
        torch.nn.EmbeddingBag,
        t,
        padding_idx=padding,
        mode=mode,
        include_last_offset=last,
        sparse=mode != "max",
    )
    keys, offsets = bags(rng, 6, layout)
    before = rows_of(t)
    out = emb(keys, offsets)
    expected = ref(as_rows(keys.numpy()), offsets)
    assert out.shape == (6, DIM)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    weights = torch.from_numpy(rng.standard_normal((6, DIM), dtype=np.float32))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    opt.step()
    looked_up = set(keys.flatten().tolist()) - {padding}
    if mode != "max":
        assert touched(ref) == looked_up
    assert_step_matches(t, before, ref, looked_up)


def test_embedding_bag_per_sample_weights(store):
    rng = np.random.default_rng(3)
    t = sgd_table(store)
    emb = EmbeddingBag(t, mode="sum", padding_idx=PAD)
    opt = SparseOptimizer([emb])
    ref = torch_twin(torch.nn.EmbeddingBag, t, padding_idx=PAD, mode="sum", sparse=True)
    keys, offsets = bags(rng, 5, "1d")
    keys[0] = PAD
    psw = torch.from_numpy(rng.standard_normal(keys.shape, dtype=np.float32))
    psw_a, psw_b = psw.clone().requires_grad_(), psw.clone().requires_grad_()
    before = rows_of(t)
    out = emb(keys, offsets, per_sample_weights=psw_a)
    expected = ref(as_rows(keys.numpy()), offsets, per_sample_weights=psw_b)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    torch.testing.assert_close(psw_a.grad, psw_b.grad, rtol=1e-5, atol=1e-6)
    opt.step()
    assert_step_matches(t, before, ref, set(keys.tolist()) - {PAD})


def test_embedding_bag_empty_input_gives_zero_bags(store):
    t = sgd_table(store)
    emb = EmbeddingBag(t, mode="mean")
    opt = SparseOptimizer([emb])
    out = emb(torch.tensor([], dtype=torch.long), torch.tensor([0, 0, 0]))
    assert out.shape == (3, DIM) and (out == 0).all()
    out.sum().backward()
    opt.step()
    assert t.gets == [] and t.updates == [] and t.outstanding() == 0


@pytest.mark.parametrize(
    ("kwargs", "call", "error"),
    [
        ({}, lambda e: e(torch.tensor([[1, 2]]), torch.tensor([0])), ValueError),
        ({}, lambda e: e(torch.tensor([1, 2])), ValueError),
        ({}, lambda e: e(torch.tensor([1, 2]), torch.tensor([[0]])), ValueError),
        ({}, lambda e: e(torch.tensor([[[1]]])), ValueError),
        ({"include_last_offset": True}, lambda e: e(torch.tensor([1, 2]), torch.tensor([0, 1])), ValueError),
        ({"mode": "mean"}, lambda e: e(torch.tensor([[1, 2]]), per_sample_weights=torch.ones(1, 2)),
         NotImplementedError),
        ({"mode": "sum"}, lambda e: e(torch.tensor([[1, 2]]), per_sample_weights=torch.ones(2)), ValueError),
        ({}, lambda e: e(torch.tensor([[1.0, 2.0]])), TypeError),
    ],
)  # fmt: skip
def test_embedding_bag_bad_arguments_read_nothing(store, kwargs, call, error):
    t = sgd_table(store)
    emb = EmbeddingBag(t, **kwargs)
    SparseOptimizer([emb])
    with pytest.raises(error):
        call(emb)
    assert t.gets == [] and t.outstanding() == 0


def test_embedding_bag_rejects_unknown_mode(store):
    with pytest.raises(ValueError, match="mode"):
        EmbeddingBag(store.table("t", dim=DIM), mode="median")


# ---- eval, holds, steps ---------------------------------------------------------------------------------
def test_eval_and_no_grad_read_untracked(store):
    t = sgd_table(store)
    emb = EmbeddingBag(t, mode="sum")
    opt = SparseOptimizer([emb])
    keys = torch.tensor([[1, 2], [3, 3]])
    emb.eval()
    out = emb(keys)
    assert not out.requires_grad
    emb.train()
    with torch.no_grad():
        out2 = emb(keys)
    torch.testing.assert_close(out, out2)
    assert [g[1] for g in t.gets] == [False, False]
    assert opt.pending_reads == 0 and t.outstanding() == 0
    opt.step()
    assert t.updates == [] and t.releases == []


def test_every_tracked_read_is_resolved(store):
    """Update for rows with a gradient, release for the rest: unused outputs, zero_grad, dead graphs."""
    t = sgd_table(store)
    a, b = EmbeddingBag(t, mode="sum"), Embedding(t)
    opt = SparseOptimizer(torch.nn.ModuleList([a, b]))
    # b's output is never used: its keys {5, 8} are released, the shared key 2 is updated
    loss = a(torch.tensor([[1, 2]])).sum()
    b(torch.tensor([2, 5, 8]))
    loss.backward()
    opt.step()
    assert [set(k.tolist()) for k, _ in t.updates] == [{1, 2}]
    assert [set(k.tolist()) for k, _ in t.releases] == [{5, 8}]
    assert all(r is opt.reader for _, r in t.updates + t.releases)
    assert t.outstanding() == 0 and opt.pending_reads == 0

    # forward + backward, then zero_grad instead of step: released, never updated
    a(torch.tensor([[3, 5]])).sum().backward()
    opt.zero_grad()
    assert t.outstanding() == 0 and len(t.updates) == 1
    opt.step()
    assert len(t.updates) == 1

    # a forward dropped without backward is released by the next forward
    a(torch.tensor([[8, 21]]))
    assert t.outstanding() == 2
    out = a(torch.tensor([[1, 1]]))
    assert t.held[opt.reader] == {1}
    out.sum().backward()
    opt.step()
    assert t.outstanding() == 0 and set(t.updates[-1][0].tolist()) == {1}


def test_zero_grad_between_forward_and_backward_keeps_the_step(store):
    t = sgd_table(store)
    emb = Embedding(t)
    opt = SparseOptimizer([emb])
    before = rows_of(t)
    loss = emb(torch.tensor([1, 2, 2])).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = rows_of(t)
    moved = np.flatnonzero((before != after).any(axis=1))
    assert set(UNIVERSE[moved].tolist()) == {1, 2}
    np.testing.assert_allclose(before[UNIVERSE == 2] - after[UNIVERSE == 2], 2.0)
    assert t.outstanding() == 0


def test_shared_table_is_one_update_per_step_with_summed_gradients(store):
    """Two modules and two forwards on one table: one update, the gradients summed like accumulated .grad."""
    rng = np.random.default_rng(5)
    t = sgd_table(store)
    bag, emb = EmbeddingBag(t, mode="mean"), Embedding(t)
    opt = SparseOptimizer([bag, emb])
    ref_bag = torch_twin(torch.nn.EmbeddingBag, t, mode="mean", sparse=True)
    ref_emb = torch.nn.Embedding(len(UNIVERSE), DIM, sparse=True)
    ref_emb.weight = ref_bag.weight  # one shared Parameter, as the two mlkv modules share a table
    before = rows_of(t)
    looked_up: set[int] = set()
    for _ in range(2):  # gradient accumulation: two forwards/backwards, one step
        k1, k2 = random_keys(rng, (3, 4)), random_keys(rng, (5,))
        looked_up |= set(k1.flatten().tolist()) | set(k2.tolist())
        loss = bag(k1).pow(2).sum() + emb(k2).sum() * 3
        ref_loss = ref_bag(as_rows(k1.numpy())).pow(2).sum() + ref_emb(as_rows(k2.numpy())).sum() * 3
        torch.testing.assert_close(loss, ref_loss)
        loss.backward()
        ref_loss.backward()
    opt.step()
    assert_step_matches(t, before, ref_bag, looked_up)


def test_one_update_per_table(store):
    t1, t2 = sgd_table(store, "a"), sgd_table(store, "b", dim=3)
    m1, m2 = EmbeddingBag(t1), Embedding(t2)
    opt = SparseOptimizer([m1, m2])
    for _ in range(3):
        (m1(torch.tensor([[1, 2]])).sum() + m2(torch.tensor([2, 3])).sum()).backward()
    opt.step()
    assert len(t1.updates) == 1 and len(t2.updates) == 1
    assert t1.outstanding() == 0 and t2.outstanding() == 0


def test_non_finite_gradient_writes_nothing(store):
    t1, t2 = sgd_table(store, "a"), sgd_table(store, "b")
    m1, m2 = Embedding(t1), Embedding(t2)
    opt = SparseOptimizer([m1, m2])
    before = rows_of(t1), rows_of(t2)
    (m1(torch.tensor([1, 2])).sum() + (m2(torch.tensor([3])) * float("nan")).sum()).backward()
    with pytest.raises(ValueError, match=r"non-finite gradient .* table 'b'.*nothing was written"):
        opt.step()
    np.testing.assert_array_equal(rows_of(t1), before[0])
    np.testing.assert_array_equal(rows_of(t2), before[1])
    assert t1.updates == [] and t2.updates == []
    opt.zero_grad()
    assert t1.outstanding() == 0 and t2.outstanding() == 0 and opt.pending_reads == 0


def test_module_without_optimizer_warns_and_reads_untracked(store):
    t = sgd_table(store)
    emb = Embedding(t)
    with pytest.warns(UserWarning, match="belongs to no SparseOptimizer"):
        emb(torch.tensor([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb(torch.tensor([2]))  # once per module
    assert [g[1] for g in t.gets] == [False, False]


def test_module_belongs_to_one_optimizer(store):
    emb = Embedding(store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=1.0)))
    opt = SparseOptimizer([emb])
    assert emb.optimizer is opt
    with pytest.raises(ValueError, match="another SparseOptimizer"):
        SparseOptimizer([emb])
    with pytest.raises(ValueError, match=r"no mlkv\.torch"):
        SparseOptimizer([torch.nn.Linear(2, 2)])


def test_holds_block_other_readers_until_step(tmp_path):
    """With the real staleness gate (bound 0): another reader of a key this step read waits for step();
    eval reads and released rows never make it wait."""
    store = mlkv.open(tmp_path / "s", staleness_bound=0, staleness_timeout=10.0)
    try:
        t = store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1))
        emb = EmbeddingBag(t)
        opt = SparseOptimizer([emb])
        done = threading.Event()

        def other_reader():
            t.get(np.array([1, 2]), reader="other")
            t.release(np.array([1, 2]), reader="other")
            done.set()

        emb.eval()
        emb(torch.tensor([[1, 2]]))
        thread = threading.Thread(target=other_reader)
        thread.start()
        assert done.wait(5), "an eval forward must not hold rows"
        thread.join()

        emb.train()
        emb(torch.tensor([[1, 2]])).sum().backward()
        done.clear()
        thread = threading.Thread(target=other_reader)
        thread.start()
        time.sleep(0.3)
        assert not done.is_set(), "a training forward holds its rows until step()"
        opt.step()
        assert done.wait(5)
        thread.join()

        emb(torch.tensor([[2, 5]]))  # graph dropped without backward, then zero_grad
        opt.zero_grad()
        done.clear()
        thread = threading.Thread(target=other_reader)
        thread.start()
        assert done.wait(5), "zero_grad must release the rows of a forward without backward"
        thread.join()
    finally:
        store.close()


# ---- state_dict and checkpoints -------------------------------------------------------------------------
class TinyModel(torch.nn.Module):
    def __init__(self, store):
        super().__init__()
        self.user = EmbeddingBag(store.table("user", dim=4, optimizer=mlkv.optim.Adagrad(lr=0.1)), mode="sum")
        self.item = Embedding(store.table("item", dim=4, optimizer=mlkv.optim.Adam(lr=0.01)))
        torch.manual_seed(0)
        self.mlp = torch.nn.Linear(8, 1)

    def forward(self, users, items):
        return self.mlp(torch.cat([self.user(users), self.item(items)], dim=1)).squeeze(1)


def train(model, sparse_opt, dense_opt, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        users = torch.from_numpy(rng.integers(0, 50, size=(16, 3)))
        items = torch.from_numpy(rng.integers(0, 30, size=16))
        target = torch.from_numpy(rng.random(16, dtype=np.float32))
        loss = torch.nn.functional.mse_loss(model(users, items), target)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        sparse_opt.step()


def test_state_dict_round_trip(store, tmp_path):
    model = TinyModel(store)
    state = model.state_dict()
    assert state["user._extra_state"] == {
        "store_path": store.path,
        "table": "user",
        "last_checkpoint_id": None,
    }
    torch.save(state, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    other = TinyModel(store)
    with torch.no_grad():
        other.mlp.weight.add_(1.0)
    other.load_state_dict(loaded)
    torch.testing.assert_close(other.mlp.weight, model.mlp.weight)

    swapped = dict(loaded)
    swapped["user._extra_state"], swapped["item._extra_state"] = (
        loaded["item._extra_state"],
        loaded["user._extra_state"],
    )
    with pytest.raises(ValueError, match=r"table 'item'.*backed by table 'user'"):
        other.load_state_dict(swapped)


def test_checkpoint_after_crash_equals_a_replay_and_drops_old_dense_files(tmp_path, crash_store):
    path, dense_dir = tmp_path / "store", tmp_path / "dense"
    store = mlkv.open(path, cache_bytes=4096)
    model = TinyModel(store)
    sparse_opt = SparseOptimizer(model)
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=0.01)
    train(model, sparse_opt, dense_opt, steps=5, seed=1)
    first = save_checkpoint(store, model, dense_opt, dense_dir, metadata={"step": 5})
    assert store.last_checkpoint() == (first, {"dense": f"dense-{first:08d}.pt", "step": 5})
    train(model, sparse_opt, dense_opt, steps=4, seed=2)
    second = save_checkpoint(store, model, dense_opt, dense_dir, metadata={"step": 9})
    assert sorted(p.name for p in dense_dir.iterdir()) == [f"dense-{second:08d}.pt"]
    train(model, sparse_opt, dense_opt, steps=3, seed=3)  # lost in the crash
    crash_store(store)

    store = mlkv.open(path, cache_bytes=4096)
    ref_store = mlkv.open(tmp_path / "ref", engine="memory")
    try:
        model = TinyModel(store)
        dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=0.01)
        assert load_checkpoint(store, model, dense_opt, dense_dir) == {
            "dense": f"dense-{second:08d}.pt", "step": 9, "checkpoint_id": second
        }  # fmt: skip
        ref = TinyModel(ref_store)  # the same 9 steps, uninterrupted, in memory
        ref_sparse, ref_dense = SparseOptimizer(ref), torch.optim.Adam(ref.mlp.parameters(), lr=0.01)
        train(ref, ref_sparse, ref_dense, steps=5, seed=1)
        train(ref, ref_sparse, ref_dense, steps=4, seed=2)
        keys = np.arange(60)
        for name in ("user", "item"):
            np.testing.assert_array_equal(
                rows_of(store.table(name), keys), rows_of(ref_store.table(name), keys)
            )
            assert store.table(name).step == ref_store.table(name).step
        for k, v in ref.mlp.state_dict().items():
            torch.testing.assert_close(model.mlp.state_dict()[k], v, rtol=0, atol=0)
        assert dense_opt.state_dict()["state"][0]["step"] == ref_dense.state_dict()["state"][0]["step"]
        # and training on from the checkpoint goes on exactly like the uninterrupted run
        train(model, SparseOptimizer(model), dense_opt, steps=2, seed=4)
        train(ref, ref_sparse, ref_dense, steps=2, seed=4)
        np.testing.assert_array_equal(
            rows_of(store.table("item"), keys), rows_of(ref_store.table("item"), keys)
        )
    finally:
        store.close()
        ref_store.close()


def test_checkpoint_load_restores_exact_save_state(tmp_path, crash_store):
    """Train, save, train more, crash, reopen, load: rows and dense params are those of the save."""
    path, dense_dir = tmp_path / "store", tmp_path / "dense"
    store = mlkv.open(path, cache_bytes=4096)
    model = TinyModel(store)
    sparse_opt = SparseOptimizer(model)
    dense_opt = torch.optim.SGD(model.mlp.parameters(), lr=0.1, momentum=0.9)
    train(model, sparse_opt, dense_opt, steps=6, seed=1)
    save_checkpoint(store, model, dense_opt, dense_dir)
    keys = np.arange(60)
    saved_rows = {n: rows_of(store.table(n), keys) for n in ("user", "item")}
    saved_state = {n: store.table(n).optimizer_state(keys) for n in ("user", "item")}
    saved_dense = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    saved_momentum = dense_opt.state_dict()["state"][0]["momentum_buffer"].clone()
    train(model, sparse_opt, dense_opt, steps=5, seed=2)
    assert not np.array_equal(rows_of(store.table("user"), keys), saved_rows["user"])
    crash_store(store)

    store = mlkv.open(path, cache_bytes=4096)
    try:
        model = TinyModel(store)
        dense_opt = torch.optim.SGD(model.mlp.parameters(), lr=0.1, momentum=0.9)
        load_checkpoint(store, model, dense_opt, dense_dir)
        for n in ("user", "item"):
            np.testing.assert_array_equal(rows_of(store.table(n), keys), saved_rows[n])
            for name, value in store.table(n).optimizer_state(keys).items():
                np.testing.assert_array_equal(value, saved_state[n][name])
        for k, v in saved_dense.items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(dense_opt.state_dict()["state"][0]["momentum_buffer"], saved_momentum)
    finally:
        store.close()


def test_load_checkpoint_refuses_rows_newer_than_the_dense_state(tmp_path):
    path, dense_dir = tmp_path / "store", tmp_path / "dense"
    with mlkv.open(path) as store:
        with pytest.raises(mlkv.MlkvError, match="no checkpoint"):
            load_checkpoint(store, TinyModel(store), None, dense_dir)
        model = TinyModel(store)
        sparse_opt, dense_opt = SparseOptimizer(model), torch.optim.SGD(model.mlp.parameters(), lr=0.1)
        train(model, sparse_opt, dense_opt, steps=2, seed=1)
        save_checkpoint(store, model, dense_opt, dense_dir)
        train(model, sparse_opt, dense_opt, steps=1, seed=2)
    # close() checkpointed the later rows, so no dense state matches them
    with mlkv.open(path) as store, pytest.raises(mlkv.MlkvError, match="no dense state"):
        load_checkpoint(store, TinyModel(store), None, dense_dir)


# ---- torch's defaults and switches: mode, frozen modules, from_pretrained, max_norm, scale_grad_by_freq ----
def test_embedding_bag_default_mode_is_torchs_mean(store):
    t = sgd_table(store)
    emb = EmbeddingBag(t).eval()
    assert emb.mode == torch.nn.EmbeddingBag(3, 2).mode == "mean"
    ref = torch_twin(torch.nn.EmbeddingBag, t)
    keys = torch.tensor([[1, 2, 2], [3, 5, 8]])
    torch.testing.assert_close(emb(keys), ref(as_rows(keys.numpy())), rtol=1e-6, atol=1e-7)


def test_frozen_module_reads_untracked_and_is_never_trained(store):
    t = sgd_table(store)
    a, b = Embedding(t), EmbeddingBag(t, mode="sum")
    opt = SparseOptimizer([a, b])
    before = rows_of(t)
    assert b.requires_grad_(False) is b and not b.requires_grad
    out = b(torch.tensor([[1, 2]]))
    assert not out.requires_grad
    assert t.gets[-1][1] is False and t.outstanding() == 0 and opt.pending_reads == 0
    # frozen between forward/backward and step(): its rows are released, not updated (torch would skip a
    # parameter that no longer requires grad only if its grad were gone; here freezing wins)
    a(torch.tensor([3, 5])).sum().backward()
    a.requires_grad_(False)
    opt.step()
    assert t.updates == [] and [set(k.tolist()) for k, _ in t.releases] == [{3, 5}]
    assert t.outstanding() == 0
    np.testing.assert_array_equal(rows_of(t), before)
    a.requires_grad_(True)
    a(torch.tensor([3])).sum().backward()
    opt.step()
    assert [set(k.tolist()) for k, _ in t.updates] == [{3}]


def test_frozen_module_without_optimizer_does_not_warn(store):
    emb = Embedding(sgd_table(store)).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb(torch.tensor([1]))


@pytest.mark.parametrize("freeze", [True, False])
def test_embedding_from_pretrained_writes_the_rows_and_trains_like_torch(store, freeze):
    rng = np.random.default_rng(11)
    weights = torch.from_numpy(rng.standard_normal((6, DIM), dtype=np.float32))
    keys = np.array([10, 20, -30, 40, 2**40, 60], dtype=np.int64)
    t = sgd_table(store)
    emb = Embedding.from_pretrained(t, weights, keys=keys, freeze=freeze)
    assert emb.requires_grad is (not freeze)
    np.testing.assert_array_equal(rows_of(t, keys), weights.numpy())
    opt = SparseOptimizer([emb])
    ref = torch.nn.Embedding.from_pretrained(weights.clone(), freeze=freeze, sparse=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    idx = np.array([[0, 2, 2], [5, 1, 0]])
    out, expected = emb(torch.from_numpy(keys[idx])), ref(torch.from_numpy(idx))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.requires_grad is expected.requires_grad is (not freeze)
    if not freeze:
        out.pow(2).sum().backward()
        expected.pow(2).sum().backward()
        ref_opt.step()
    opt.step()
    np.testing.assert_allclose(rows_of(t, keys), ref.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert len(t.updates) == (0 if freeze else 1) and t.outstanding() == 0


def test_embedding_bag_from_pretrained_defaults_match_torch(store):
    weights = torch.arange(4 * DIM, dtype=torch.float32).reshape(4, DIM)
    t = sgd_table(store)
    emb = EmbeddingBag.from_pretrained(t, weights)  # keys 0..3, frozen, mode "mean"
    ref = torch.nn.EmbeddingBag.from_pretrained(weights)
    assert (emb.mode, emb.requires_grad) == (ref.mode, ref.weight.requires_grad) == ("mean", False)
    x = torch.tensor([[0, 1, 1], [3, 2, 0]])
    torch.testing.assert_close(emb(x), ref(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"embeddings must be 2-D \(n, 6\).*got shape \(4, 3\)"):
        EmbeddingBag.from_pretrained(t, weights[:, :3])
    with pytest.raises(ValueError, match=r"one key per embedding row, shape \(4,\), got shape \(3,\)"):
        Embedding.from_pretrained(t, weights, keys=[1, 2, 3])


def renorm_setup(store, cls, norm_type, **kw):
    """A module with max_norm = the median row norm (about half the rows renormalise) and its torch twin."""
    t = sgd_table(store)
    max_norm = float(torch.from_numpy(rows_of(t)).norm(p=norm_type, dim=1).median())
    emb = cls(t, max_norm=max_norm, norm_type=norm_type, padding_idx=PAD, **kw)
    ref = torch_twin(
        getattr(torch.nn, cls.__name__), t, padding_idx=PAD, max_norm=max_norm, norm_type=norm_type,
        sparse=True, **kw,
    )  # fmt: skip
    return t, emb, ref


def assert_rows_equal_torch(t, ref) -> None:
    """The stored rows are torch's weight (but the padding key's: torch zeroes it, mlkv never reads it)."""
    other = UNIVERSE != PAD
    np.testing.assert_allclose(rows_of(t)[other], ref.weight.detach().numpy()[other], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
@pytest.mark.parametrize(("cls", "kw"), [(Embedding, {}), (EmbeddingBag, {"mode": "sum"})])
def test_max_norm_renormalises_outputs_and_stored_rows_like_torch(store, cls, kw, norm_type):
    rng = np.random.default_rng(13)
    t, emb, ref = renorm_setup(store, cls, norm_type, **kw)
    opt = SparseOptimizer([emb])
    before = rows_of(t)
    keys = torch.from_numpy(rng.choice(UNIVERSE[:8], size=(5, 3)))  # some rows are never looked up
    out, expected = emb(keys), ref(as_rows(keys.numpy()))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert_rows_equal_torch(t, ref)  # torch renormalised its weight in place: the table holds the same rows
    looked_up = set(keys.flatten().tolist()) - {PAD}
    changed = set(UNIVERSE[(rows_of(t) != before).any(axis=1)].tolist())
    assert changed and changed < looked_up, "some looked-up rows exceed max_norm, some do not"
    assert t.outstanding() == len(looked_up), "writing renormalised rows keeps the optimizer's holds"
    weights = torch.from_numpy(rng.standard_normal(out.shape, dtype=np.float32))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    renormed = rows_of(t)
    opt.step()
    assert_step_matches(t, renormed, ref, looked_up)


def test_max_norm_in_eval_mode_still_renormalises_the_table_as_torch_does(store):
    t, emb, ref = renorm_setup(store, Embedding, 2.0)
    emb.eval()
    keys = torch.from_numpy(UNIVERSE[:6].copy())
    with torch.no_grad():
        torch.testing.assert_close(emb(keys), ref(as_rows(keys.numpy())), rtol=1e-6, atol=1e-7)
    assert_rows_equal_torch(t, ref)
    assert t.outstanding() == 0


@pytest.mark.parametrize(
    ("cls", "kw"), [(Embedding, {}), (EmbeddingBag, {"mode": "sum"}), (EmbeddingBag, {})]
)
def test_scale_grad_by_freq_matches_torch(store, cls, kw):
    rng = np.random.default_rng(17)
    t = sgd_table(store)
    emb = cls(t, scale_grad_by_freq=True, **kw)
    opt = SparseOptimizer([emb])
    # torch refuses scale_grad_by_freq with sparse gradients; its dense gradient holds the same rows
    ref = torch_twin(getattr(torch.nn, cls.__name__), t, scale_grad_by_freq=True, **kw)
    keys = torch.tensor([[1, 1, 1, 2], [2, 3, 1, 5]])  # key 1 four times, key 2 twice
    before = rows_of(t)
    out, expected = emb(keys), ref(as_rows(keys.numpy()))
    weights = torch.from_numpy(rng.standard_normal(out.shape, dtype=np.float32))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    opt.step()
    assert_step_matches(t, before, ref, {1, 2, 3, 5})


def test_scale_grad_by_freq_is_refused_in_max_mode(store):
    with pytest.raises(ValueError, match=r"scale_grad_by_freq.*mode='max'"):
        EmbeddingBag(sgd_table(store), mode="max", scale_grad_by_freq=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the index_add_ path (as on GPU)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_bag_gradient_scatter_equals_torchs_embedding_bag_backward(dtype, weighted, last):
    """The one-pass gradient scatter behind EmbeddingBag(mode="sum") and Embedding, on both of its paths,
    against torch's own backward: bags of varied sizes, empty ones included, per_sample_weights or not."""
    from mlkv.torch.modules import bag_grad

    rng = np.random.default_rng(3)
    rows, dim = 40, 5
    sizes = rng.integers(0, 6, 30)
    sizes[[0, 7]] = 0
    n = int(sizes.sum())
    flat = torch.from_numpy(rng.integers(0, rows, n))
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    if last:
        offsets = torch.cat([offsets, torch.tensor([n])])
    psw = torch.from_numpy(rng.standard_normal(n)).to(dtype) if weighted else None
    w = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    out = torch.nn.functional.embedding_bag(
        flat, w, offsets, mode="sum", per_sample_weights=psw, include_last_offset=last
    )
    g = torch.randn_like(out)
    out.backward(g)
    starts = offsets[:-1] if last else offsets
    ends = offsets[1:] if last else torch.cat([offsets[1:], torch.tensor([n])])
    got = bag_grad(rows, flat, starts, ends, g, psw)
    assert got.dtype == dtype
    torch.testing.assert_close(got, w.grad, rtol=1e-6, atol=1e-6)


def test_double_backward_through_the_row_gradient_matches_torch():
    """create_graph=True (a gradient penalty): the rows' gradient is itself differentiable, as with torch's
    own embedding backward (torch's embedding_bag has no double backward; its oracle here is embedding
    summed over the bag)."""
    from mlkv.torch.modules import _BagSum, _Lookup

    rng = np.random.default_rng(4)
    idx = torch.from_numpy(rng.integers(0, 6, (5, 3)))
    w0 = torch.randn(6, 4, dtype=torch.float32)
    cases = [
        (lambda w: _Lookup.apply(w, idx, None), lambda w: torch.nn.functional.embedding(idx, w)),
        (
            lambda w: _BagSum.apply(w, idx, None, None, None, False),
            lambda w: torch.nn.functional.embedding(idx, w).sum(1),
        ),
    ]
    for ours, theirs in cases:
        grads = []
        for f in (ours, theirs):
            w = w0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(w).pow(3).sum(), w, create_graph=True)
            g.pow(2).sum().backward()
            grads.append(w.grad)
        torch.testing.assert_close(grads[0], grads[1])

"""SparseOptimizer as a torch.optim.Optimizer: param groups, LR schedulers, state_dict, weight decay, and
the staleness holds of an optimizer that is dropped.

The oracle is the same training on torch.nn.EmbeddingBag(sparse=True) holding the same rows, driven by the
matching torch optimizer (SGD, Adagrad, SparseAdam) and the same scheduler, compared step by step.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import mlkv
from mlkv.torch import Embedding, EmbeddingBag, SparseOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

N, DIM, STEPS = 40, 4, 12
RTOL, ATOL = 1e-5, 1e-6

#: name -> (mlkv optimizer, torch optimizer over the same hyper-parameters)
OPTIMIZERS = {
    "sgd": (lambda: mlkv.optim.SGD(lr=0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
    "adagrad": (lambda: mlkv.optim.Adagrad(lr=0.2), lambda p: torch.optim.Adagrad(p, lr=0.2, eps=1e-10)),
    "adam": (lambda: mlkv.optim.Adam(lr=0.05), lambda p: torch.optim.SparseAdam(p, lr=0.05)),
}
#: name -> scheduler(optimizer, optimizer kind); OneCycleLR cycles Adam's beta1 too (SparseAdam has betas)
SCHEDULERS = {
    "steplr": lambda o, kind: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "lambdalr": lambda o, kind: lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 4)),  # lr 0 at step 0
    "onecyclelr": lambda o, kind: lr_scheduler.OneCycleLR(
        o, max_lr=0.8, total_steps=STEPS, cycle_momentum=kind == "adam"
    ),
}


@pytest.fixture
def store(tmp_path):
    s = mlkv.open(tmp_path / "store", engine="memory", staleness_timeout=5.0)
    yield s
    s.close()


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(keys, offsets, output weights) per step: bags of 0..5 keys, skewed, repeated keys."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        sizes = rng.integers(0, 6, size=8)
        keys = (rng.pareto(1.0, size=int(sizes.sum())) * 5).astype(np.int64) % N
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        w = rng.standard_normal((8, DIM), dtype=np.float32)
        out.append((torch.from_numpy(keys), torch.from_numpy(offsets), torch.from_numpy(w)))
    return out


def twin(t: mlkv.Table, mode: str = "sum", sparse: bool = True) -> nn.EmbeddingBag:
    ref = nn.EmbeddingBag(N, DIM, mode=mode, sparse=sparse)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(t.get(np.arange(N), track=False)))
    return ref


def rows(t: mlkv.Table) -> np.ndarray:
    return np.asarray(t.get(np.arange(N), track=False)).copy()


@pytest.mark.parametrize("sched_name", sorted(SCHEDULERS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_lr_scheduler_drives_the_row_updates_like_torch(store, opt_name, sched_name):
    make_mlkv, make_torch = OPTIMIZERS[opt_name]
    t = store.table("t", dim=DIM, optimizer=make_mlkv())
    emb = EmbeddingBag(t, mode="sum")
    ref = twin(t)
    opt, ref_opt = SparseOptimizer([emb]), make_torch(ref.parameters())
    sched = SCHEDULERS[sched_name](opt, opt_name)
    ref_sched = SCHEDULERS[sched_name](ref_opt, opt_name)
    initial = rows(t)
    lrs = []
    for keys, offsets, w in batches():
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        lrs.append(opt.param_groups[0]["lr"])
        (emb(keys, offsets) * w).sum().backward()
        (ref(keys, offsets) * w).sum().backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        sched.step()
        ref_sched.step()
        np.testing.assert_allclose(rows(t), ref.weight.detach().numpy(), rtol=RTOL, atol=ATOL)
    assert len(set(lrs)) > 2, "the schedule must really change the learning rate"
    assert (rows(t) != initial).any(axis=1).sum() > N // 4, "the test must train a good part of the rows"
    # the table's own optimizer and the store's schema keep the lr the table was created with
    assert t.optimizer == make_mlkv()
    assert t.schema()["optimizer"] == make_mlkv().config()


def test_param_groups_one_per_table_with_the_tables_hyperparameters(store):
    user = store.table("user", dim=DIM, optimizer=mlkv.optim.Adagrad(lr=0.1, eps=1e-8, weight_decay=0.01))
    item = store.table("item", dim=DIM, optimizer=mlkv.optim.Adam(lr=0.01, betas=(0.8, 0.9)))
    untrained = store.table("frozen", dim=DIM)  # optimizer=None: no group
    model = nn.ModuleDict(
        {"u": EmbeddingBag(user), "u2": Embedding(user), "i": Embedding(item), "f": Embedding(untrained)}
    )
    opt = SparseOptimizer(model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups == [
        {"params": [], "table": "user", "lr": 0.1, "eps": 1e-8, "initial_accumulator_value": 0.0,
         "weight_decay": 0.01},
        {"params": [], "table": "item", "lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-8},
    ]  # fmt: skip
    assert opt.defaults == {"lr": 0.1, "eps": 1e-8}  # what all groups have


def test_group_lr_per_table_and_the_table_schema_unchanged(store):
    """Two tables, two groups, LambdaLR with one lambda per group: each table moves by its own lr."""
    a = store.table("a", dim=DIM, optimizer=mlkv.optim.SGD(lr=1.0))
    b = store.table("b", dim=DIM, optimizer=mlkv.optim.SGD(lr=1.0))
    ea, eb = Embedding(a), Embedding(b)
    opt = SparseOptimizer([ea, eb])
    sched = lr_scheduler.LambdaLR(opt, [lambda s: 0.5, lambda s: 0.25])
    before_a, before_b = rows(a), rows(b)
    keys = torch.tensor([1, 2])
    (ea(keys).sum() + eb(keys).sum()).backward()  # gradient 1 in every column of rows 1 and 2
    opt.step()
    sched.step()
    np.testing.assert_allclose((before_a - rows(a))[1:3], 0.5)
    np.testing.assert_allclose((before_b - rows(b))[1:3], 0.25)
    assert a.optimizer.lr == b.optimizer.lr == 1.0
    store.checkpoint()
    assert a.schema()["optimizer"]["lr"] == 1.0


def test_state_dict_round_trips_lr_and_scheduler_state(store, tmp_path):
    t = store.table("t", dim=DIM, optimizer=mlkv.optim.Adagrad(lr=0.4))
    emb = EmbeddingBag(t, mode="sum")
    opt = SparseOptimizer([emb])
    sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    data = batches()
    for keys, offsets, w in data[:5]:
        (emb(keys, offsets) * w).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "s.pt")
    saved_lr = opt.param_groups[0]["lr"]
    assert saved_lr == pytest.approx(0.1)  # 0.4 halved twice

    # the uninterrupted run goes on; a restarted one (new modules, optimizer, scheduler) loads the state
    expected = []
    for keys, offsets, w in data[5:9]:
        (emb(keys, offsets) * w).sum().backward()
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad()
        sched.step()
    emb2 = EmbeddingBag(t, mode="sum")
    opt2 = SparseOptimizer([emb2])
    sched2 = lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    assert opt2.param_groups[0]["lr"] == 0.4
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2.load_state_dict(loaded["opt"])
    sched2.load_state_dict(loaded["sched"])
    assert opt2.param_groups[0]["lr"] == saved_lr
    got = []
    for keys, offsets, w in data[5:9]:
        (emb2(keys, offsets) * w).sum().backward()
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        opt2.zero_grad()
        sched2.step()
    assert got == expected and len(set(got)) == 3


def test_load_state_dict_of_other_tables_is_refused(store):
    a = store.table("a", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1))
    b = store.table("b", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1))
    state = SparseOptimizer([Embedding(a)]).state_dict()
    opt = SparseOptimizer([Embedding(b)])
    with pytest.raises(ValueError, match=r"state_dict is for tables \['a'\].*has tables \['b'\]") as e:
        opt.load_state_dict(state)
    assert isinstance(e.value, mlkv.MlkvError)
    assert opt.param_groups[0]["table"] == "b"


def test_bad_group_value_raises_before_writing(store):
    t = store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1))
    emb = Embedding(t)
    opt = SparseOptimizer([emb])
    before = rows(t)
    opt.param_groups[0]["lr"] = -1.0
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"param group of table 't': lr must be .*got -1\.0") as e:
        opt.step()
    assert isinstance(e.value, mlkv.MlkvError)
    np.testing.assert_array_equal(rows(t), before)


@pytest.mark.parametrize(
    ("mlkv_opt", "torch_opt"),
    [
        (lambda: mlkv.optim.SGD(lr=0.3), lambda p: torch.optim.SGD(p, lr=0.3, weight_decay=0.1)),
        (
            lambda: mlkv.optim.Adagrad(lr=0.3),
            lambda p: torch.optim.Adagrad(p, lr=0.3, eps=1e-10, weight_decay=0.1),
        ),
    ],
    ids=["sgd", "adagrad"],
)
def test_weight_decay_of_the_group_matches_torch_on_rows_in_every_step(store, mlkv_opt, torch_opt):
    """torch refuses weight_decay with sparse gradients; mlkv decays the rows of each update. When every row
    is in every update, that is torch's weight decay on a dense nn.EmbeddingBag, step by step."""
    t = store.table("t", dim=DIM, optimizer=mlkv_opt())
    emb = EmbeddingBag(t, mode="sum")
    ref = twin(t, sparse=False)
    opt, ref_opt = SparseOptimizer([emb]), torch_opt(ref.parameters())
    opt.param_groups[0]["weight_decay"] = 0.1  # the group's value, not the table's (0)
    outside = np.arange(N, N + 3)  # never looked up: never decays
    untouched = t.get(outside, track=False).copy()
    rng = np.random.default_rng(3)
    for _ in range(6):
        keys = torch.from_numpy(rng.permutation(np.repeat(np.arange(N), 2)))  # every row, twice
        offsets = torch.arange(0, 2 * N, 4)
        w = torch.from_numpy(rng.standard_normal((N // 2, DIM), dtype=np.float32))
        (emb(keys, offsets) * w).sum().backward()
        (ref(keys, offsets) * w).sum().backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        np.testing.assert_allclose(rows(t), ref.weight.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(t.get(outside, track=False), untouched)
    assert t.optimizer.weight_decay == 0.0


def test_weight_decay_of_the_table_optimizer_decays_touched_rows_only(store):
    t = store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.5, weight_decay=0.2))
    before = rows(t)
    t.update(np.array([3]), np.zeros((1, DIM), dtype=np.float32))
    after = rows(t)
    np.testing.assert_allclose(after[3], before[3] * np.float32(1 - 0.5 * 0.2), rtol=1e-6)
    np.testing.assert_array_equal(np.delete(after, 3, axis=0), np.delete(before, 3, axis=0))


# ---- an optimizer dropped without step(): its holds must go (issue 8) ------------------------------------
def forward_and_drop(t: mlkv.Table, keys: torch.Tensor, backward: bool) -> None:
    """Tracked reads by a SparseOptimizer that is then dropped without step() or zero_grad()."""
    emb = EmbeddingBag(t, mode="sum")
    opt = SparseOptimizer([emb])
    out = emb(keys)
    if backward:
        out.sum().backward()
    assert opt.pending_reads == 1 and t._gate.outstanding() > 0


@pytest.mark.parametrize("backward", [False, True])
def test_dropped_optimizer_releases_its_holds(tmp_path, backward):
    with mlkv.open(tmp_path / "s", staleness_bound=0, staleness_timeout=0.5) as store:
        t = store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1))
        forward_and_drop(t, torch.tensor([[1, 2, 3]]), backward)
        gc.collect()
        start = time.perf_counter()
        t.get(np.array([1, 2, 3]), reader="next")  # StalenessTimeout if the dropped holds remained
        assert time.perf_counter() - start < 0.4
        t.release(np.array([1, 2, 3]), reader="next")
        assert t._gate.outstanding() == 0 and t._gate.holders() == 0


def test_dropped_optimizer_wakes_a_reader_already_waiting(tmp_path):
    with mlkv.open(tmp_path / "s", staleness_bound=0, staleness_timeout=5.0) as store:
        t = store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1))
        emb = Embedding(t)
        opt = SparseOptimizer([emb])
        emb(torch.tensor([7, 8]))
        done = threading.Event()

        def reader():
            t.get(np.array([8]), reader="other")
            done.set()

        thread = threading.Thread(target=reader)
        thread.start()
        time.sleep(0.2)
        assert not done.is_set(), "the live optimizer's hold blocks the other reader"
        del opt, emb
        gc.collect()
        assert done.wait(2.0), "dropping the optimizer must release its holds and wake the reader"
        thread.join()


def test_add_param_group_is_refused(store):
    opt = SparseOptimizer([Embedding(store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1)))])
    with pytest.raises(NotImplementedError, match="one param group per table") as e:
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    assert isinstance(e.value, mlkv.MlkvError) and len(opt.param_groups) == 1


def test_checkpoint_restores_the_sparse_optimizer_lr_schedule(tmp_path):
    """save_checkpoint(sparse_optimizer=...) keeps the scheduled learning rate: a resumed run steps on with
    the lr the schedule had reached, not the table's initial one."""
    import mlkv.torch

    path = tmp_path / "s"
    with mlkv.open(path) as store:
        t = store.table("e", dim=2, optimizer=mlkv.optim.SGD(lr=1.0))
        emb = mlkv.torch.Embedding(t)
        opt = mlkv.torch.SparseOptimizer([emb])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            emb(torch.tensor([1, 2])).sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        mlkv.torch.save_checkpoint(store, emb, None, tmp_path / "dense", sparse_optimizer=opt)
    with mlkv.open(path) as store:
        t = store.table("e")
        emb = mlkv.torch.Embedding(t)
        opt = mlkv.torch.SparseOptimizer([emb])
        assert opt.param_groups[0]["lr"] == 1.0
        mlkv.torch.load_checkpoint(store, emb, None, tmp_path / "dense", sparse_optimizer=opt)
        assert opt.param_groups[0]["lr"] == 0.125

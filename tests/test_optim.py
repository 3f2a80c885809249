"""mlkv.optim against torch: same weights and optimizer state after every step, duplicates included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlkv.optim import SGD, Adagrad, Adam, Optimizer, RowWiseAdagrad, optimizer_from_config

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

NUM, STEPS, BATCH = 40, 20, 64
RTOL, ATOL = 1e-5, 1e-6


def summed_grads(idx: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The store's view of one batch: unique keys and each key's gradient summed over its occurrences."""
    uniq, inverse = np.unique(idx, return_inverse=True)
    grads = np.zeros((len(uniq), target.shape[1]), dtype=np.float32)
    np.add.at(grads, inverse, target)
    return uniq, grads


def mlkv_step(opt: Optimizer, rows: np.ndarray, idx: np.ndarray, target: np.ndarray, step: int) -> None:
    uniq, grads = summed_grads(idx, target)
    touched = rows[uniq]
    opt.apply(touched, grads, step)
    rows[uniq] = touched


def make_pair(opt: Optimizer, dim: int, seed: int) -> tuple[np.ndarray, torch.nn.Embedding]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((NUM, dim), dtype=np.float32)
    rows = np.concatenate([weights, opt.init_state(NUM, dim)], axis=1)
    emb = torch.nn.Embedding(NUM, dim, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(weights))
    return rows, emb


def batches(dim: int, seed: int):
    rng = np.random.default_rng(seed + 1)
    for step in range(1, STEPS + 1):
        # a small key range makes duplicates certain; a random size exercises different unique counts
        idx = rng.integers(0, NUM // 2 if step % 3 else NUM, size=rng.integers(1, BATCH))
        idx = np.concatenate([idx, idx[: 1 + step % 4]])  # every batch repeats some keys
        target = rng.standard_normal((len(idx), dim), dtype=np.float32)
        yield step, idx, target


def torch_backward(emb: torch.nn.Embedding, idx: np.ndarray, target: np.ndarray) -> None:
    emb.zero_grad(set_to_none=True)
    (emb(torch.from_numpy(idx)) * torch.from_numpy(target)).sum().backward()


def assert_close(actual: np.ndarray, expected: torch.Tensor, what: str) -> None:
    np.testing.assert_allclose(actual, expected.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=what)


TORCH_CASES = [  # (mlkv optimizer, torch optimizer factory, mlkv state name -> torch state key)
    (SGD(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1), {}),
    (Adagrad(lr=0.05), lambda p: torch.optim.Adagrad(p, lr=0.05), {"sum": "sum"}),
    (
        Adagrad(lr=0.05, eps=1e-6, initial_accumulator_value=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.05, eps=1e-6, initial_accumulator_value=0.1),
        {"sum": "sum"},
    ),
    (
        Adam(lr=0.01),
        lambda p: torch.optim.SparseAdam(p, lr=0.01),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    ),
    (
        Adam(lr=0.003, betas=(0.8, 0.99), eps=1e-6),
        lambda p: torch.optim.SparseAdam(p, lr=0.003, betas=(0.8, 0.99), eps=1e-6),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    ),
]


@pytest.mark.parametrize("dim", [1, 7, 16])
@pytest.mark.parametrize(
    ("opt", "make_torch_opt", "state_map"), TORCH_CASES, ids=[repr(c[0]) for c in TORCH_CASES]
)
def test_matches_torch_every_step(opt, make_torch_opt, state_map, dim):
    rows, emb = make_pair(opt, dim, seed=dim)
    torch_opt = make_torch_opt(emb.parameters())
    names = opt.state_names(dim)
    assert set(names) == set(state_map)
    for step, idx, target in batches(dim, seed=dim):
        torch_backward(emb, idx, target)
        torch_opt.step()
        mlkv_step(opt, rows, idx, target, step)
        assert_close(rows[:, :dim], emb.weight, f"weights after step {step}")
        for name, torch_name in state_map.items():
            state = rows[:, dim:][:, names[name]]
            assert_close(state, torch_opt.state[emb.weight][torch_name], f"{name} after step {step}")


def torch_rowwise_adagrad(weight: torch.Tensor, acc: torch.Tensor, grad: torch.Tensor, lr: float, eps: float):
    """Straightforward reference of FBGEMM's exact row-wise Adagrad on a coalesced sparse gradient."""
    grad = grad.coalesce()
    idx, values = grad.indices()[0], grad.values()
    acc[idx] += values.pow(2).mean(dim=1)
    weight[idx] -= lr * values / (acc[idx].sqrt() + eps).unsqueeze(1)


@pytest.mark.parametrize("dim", [1, 7, 16])
def test_rowwise_adagrad_matches_reference(dim):
    opt = RowWiseAdagrad(lr=0.05, eps=1e-8)
    rows, emb = make_pair(opt, dim, seed=dim)
    acc = torch.zeros(NUM)
    for step, idx, target in batches(dim, seed=dim):
        torch_backward(emb, idx, target)
        with torch.no_grad():
            torch_rowwise_adagrad(emb.weight, acc, emb.weight.grad, opt.lr, opt.eps)
        mlkv_step(opt, rows, idx, target, step)
        assert_close(rows[:, :dim], emb.weight, f"weights after step {step}")
        assert_close(rows[:, dim], acc, f"accumulator after step {step}")


ALL = [SGD(0.1), Adagrad(0.1, 1e-8, 0.5), RowWiseAdagrad(0.2, 1e-6), Adam(0.01, (0.5, 0.9), 1e-7), Adam()]


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_config_round_trip(opt):
    cfg = json.loads(json.dumps(opt.config()))
    assert cfg["kind"] == opt.kind
    again = optimizer_from_config(cfg)
    assert again == opt and type(again) is type(opt)
    assert again.config() == opt.config()


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_layout(opt):
    dim = 5
    width = opt.state_width(dim)
    assert opt.init_state(3, dim).shape == (3, width)
    assert opt.init_state(3, dim).dtype == np.float32
    covered = np.zeros(width, dtype=int)
    for s in opt.state_names(dim).values():
        covered[s] += 1
    assert (covered == 1).all()


def test_state_widths():
    assert [o.state_width(8) for o in (SGD(1), Adagrad(1), RowWiseAdagrad(1), Adam())] == [0, 8, 1, 16]
    assert (Adagrad(1, initial_accumulator_value=0.25).init_state(2, 3) == 0.25).all()


@pytest.mark.parametrize("opt", ALL, ids=repr)
def test_apply_empty_and_in_place(opt):
    dim = 4
    empty = np.zeros((0, dim + opt.state_width(dim)), dtype=np.float32)
    opt.apply(empty, np.zeros((0, dim), dtype=np.float32), 1)
    rows = np.concatenate([np.ones((2, dim), np.float32), opt.init_state(2, dim)], axis=1)
    before = rows.copy()
    assert opt.apply(rows, np.full((2, dim), 0.5), 1) is None  # float64 grads are accepted
    assert (rows[:, :dim] < before[:, :dim]).all()


def test_zero_gradient_keeps_weights():
    for opt in ALL:
        rows = np.concatenate([np.ones((2, 3), np.float32), opt.init_state(2, 3)], axis=1)
        opt.apply(rows, np.zeros((2, 3), np.float32), 1)
        assert (rows[:, :3] == 1).all(), opt


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SGD(-0.5), r"lr must be .*\[0\.0, inf\).*got -0\.5"),  # 0 is valid, as in torch
        (lambda: SGD(0.1, weight_decay=-0.1), r"weight_decay .*\[0\.0, inf\).*got -0\.1"),
        (lambda: Adagrad(0.1, weight_decay=float("inf")), r"weight_decay .*got inf"),
        (lambda: SGD(-1.0), r"lr .*got -1\.0"),
        (lambda: SGD(float("nan")), r"lr .*got nan"),
        (lambda: SGD("0.1"), r"lr .*got '0\.1'"),
        (lambda: SGD(True), r"lr .*got True"),
        (lambda: Adagrad(0.1, eps=-1e-3), r"eps .*\(0\.0, inf\).*got -0\.001"),
        (lambda: RowWiseAdagrad(0.1, eps=0.0), r"eps .*\(0\.0, inf\).*got 0\.0"),
        (lambda: Adagrad(0.1, initial_accumulator_value=-1), r"initial_accumulator_value .*got -1"),
        (lambda: RowWiseAdagrad(-0.1), r"lr .*got -0\.1"),
        (lambda: Adam(0.1, betas=(1.0, 0.9)), r"betas\[0\] .*\[0\.0, 1\.0\).*got 1\.0"),
        (lambda: Adam(0.1, betas=(0.9, -0.1)), r"betas\[1\] .*got -0\.1"),
        (lambda: Adam(0.1, betas=(0.9,)), r"betas must be a pair.*got \(0\.9,\)"),
        (lambda: Adam(0.1, eps=0.0), r"eps .*\(0\.0, inf\).*got 0\.0"),
    ],
)
def test_hyperparameter_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_apply_validation():
    opt = Adam()
    rows = np.zeros((2, 12), np.float32)
    with pytest.raises(ValueError, match=r"step must be an integer >= 1.*got 0"):
        opt.apply(rows, np.zeros((2, 4), np.float32), 0)
    with pytest.raises(
        ValueError, match=r"rows must have shape \(2, 15\) for adam with dim=5, got \(2, 12\)"
    ):
        opt.apply(rows, np.zeros((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match=r"grads must be 2-D \(n, dim\), got shape \(8,\)"):
        opt.apply(rows, np.zeros(8, np.float32), 1)
    with pytest.raises(TypeError, match="rows must be a float32 numpy array, got float64"):
        opt.apply(rows.astype(np.float64), np.zeros((2, 4), np.float32), 1)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"kind": "lamb", "lr": 0.1}, r"unknown optimizer kind 'lamb'; expected one of \['adagrad', 'adam'"),
        ({"lr": 0.1}, "must be a dict with a 'kind' key"),
        ({"kind": "sgd", "lr": 0.1, "momentum": 0.9}, "bad sgd optimizer config"),
        ({"kind": "sgd", "lr": -0.1}, r"lr .*got -0\.1"),
    ],
)
def test_from_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        optimizer_from_config(cfg)


def test_adagrad_weight_decay_on_resident_rows_matches_torch(tmp_path):
    """Rows that are all in the memory tier take the fused Adagrad kernel; with weight decay they must not:
    the result equals torch.optim.Adagrad(weight_decay=...) on the same rows."""
    import mlkv

    with mlkv.open(tmp_path / "s", engine="memory") as store:
        opt = Adagrad(lr=0.1, weight_decay=0.5)
        t = store.table("a", dim=3, optimizer=opt, init=mlkv.init.Normal(0.0, 1.0))
        keys = np.arange(4)
        start = t.get(keys, track=False).copy()
        for _ in range(3):
            t.update(keys, np.ones((4, 3), np.float32))
        got = t.get(keys, track=False)
    w = torch.nn.Parameter(torch.tensor(start))
    opt = torch.optim.Adagrad([w], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        w.grad = torch.ones(4, 3)
        opt.step()
    np.testing.assert_allclose(got, w.detach().numpy(), rtol=1e-5, atol=1e-6)

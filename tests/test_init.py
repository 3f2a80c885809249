"""mlkv.init: a row is a pure function of (seed, salt, key), with the advertised distribution."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlkv.init import Initializer, Normal, Uniform, Zeros, hash_bits, init_from_config, resolve_init

BUILTINS = [Normal(), Normal(1.0, 2.0, seed=7), Uniform(-0.5, 0.25), Uniform(0.0, 1.0, seed=3), Zeros()]
EDGE_KEYS = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1], dtype=np.uint64)


def random_keys(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)


@pytest.mark.parametrize("init", BUILTINS, ids=repr)
@pytest.mark.parametrize("dim", [1, 7, 64])
def test_row_depends_only_on_key(init, dim):
    keys = np.concatenate([random_keys(300), EDGE_KEYS])
    whole = init(keys, dim, salt=5)
    assert whole.shape == (len(keys), dim) and whole.dtype == np.float32 and whole.flags.c_contiguous
    order = np.random.default_rng(1).permutation(len(keys))
    np.testing.assert_array_equal(init(keys[order], dim, salt=5), whole[order])
    parts = [init(part, dim, salt=5) for part in np.array_split(keys, 7)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    dup = np.concatenate([keys[:10], keys[:10], keys[3:5]])
    np.testing.assert_array_equal(init(dup, dim, salt=5), whole[np.r_[0:10, 0:10, 3:5]])
    np.testing.assert_array_equal(init(keys[4:5], dim, salt=5), whole[4:5])
    assert np.isfinite(whole).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40), st.integers(0, 2**32 - 1))
def test_any_batch_gives_each_key_its_own_row(keys, salt):
    init = Normal(0.0, 1.0, seed=11)
    batch = init(np.array(keys, dtype=np.uint64), 5, salt)
    for i, key in enumerate(keys[:5]):
        np.testing.assert_array_equal(batch[i], init(np.array([key], dtype=np.uint64), 5, salt)[0])


def test_int64_keys_are_reinterpreted_bit_for_bit():
    init = Normal()
    signed = np.array([-1, 0, 5, -(2**63)], dtype=np.int64)
    np.testing.assert_array_equal(init(signed, 4), init(signed.view(np.uint64), 4))
    np.testing.assert_array_equal(init([0, 5], 4), init(np.array([0, 5], dtype=np.uint64), 4))


@pytest.mark.parametrize("init", [Normal(), Uniform(-1.0, 1.0)], ids=repr)
def test_salt_seed_and_key_change_the_row(init):
    keys = np.concatenate([random_keys(1000), EDGE_KEYS])
    rows = init(keys, 8, salt=0)
    assert not np.array_equal(rows, init(keys, 8, salt=1))
    cfg = {k: v for k, v in init.config().items() if k != "kind"}
    assert not np.array_equal(rows, type(init)(**{**cfg, "seed": 1})(keys, 8, salt=0))


def test_hash_streams_do_not_collide():
    keys = np.concatenate([random_keys(2000), EDGE_KEYS, np.arange(2000, dtype=np.uint64)])
    bits = hash_bits(np.unique(keys), 16, seed=0, salt=0)
    assert len(np.unique(bits)) == bits.size


def test_different_salts_are_independent():
    keys = np.arange(20000, dtype=np.uint64)
    a, b = Normal(0.0, 1.0)(keys, 4, salt=1).ravel(), Normal(0.0, 1.0)(keys, 4, salt=2).ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.03


def test_normal_statistics():
    mean, std = 0.5, 2.0
    x = Normal(mean, std, seed=3)(np.arange(25000, dtype=np.uint64), 4).astype(np.float64)  # 100k samples
    assert abs(x.mean() - mean) < 4 * std / np.sqrt(x.size)
    assert abs(x.std() - std) / std < 0.01
    z = (x.ravel() - mean) / std
    assert abs((np.abs(z) < 1).mean() - 0.6827) < 0.005
    assert abs((np.abs(z) < 2).mean() - 0.9545) < 0.003
    assert abs(np.mean(z**3)) < 0.05 and abs(np.mean(z**4) - 3.0) < 0.1
    # columns and consecutive keys are uncorrelated
    assert np.abs(np.corrcoef(x.T) - np.eye(4)).max() < 0.03
    assert abs(np.corrcoef(x[:-1, 0], x[1:, 0])[0, 1]) < 0.03


def test_uniform_statistics():
    low, high = -0.25, 0.75
    x = Uniform(low, high)(np.arange(12500, dtype=np.uint64), 8).astype(np.float64)  # 100k samples
    assert low <= x.min() and x.max() <= high
    assert x.min() < low + 1e-3 and x.max() > high - 1e-3
    assert abs(x.mean() - 0.25) < 0.005 and abs(x.var() - 1 / 12) < 0.002
    counts, _ = np.histogram(x, bins=10, range=(low, high))
    assert counts.min() > 0.95 * x.size / 10


def test_degenerate_and_zero_initialisers():
    keys = random_keys(10)
    assert (Zeros()(keys, 3) == 0).all() and Zeros()(keys, 3).dtype == np.float32
    assert (Uniform(2.0, 2.0)(keys, 3) == 2.0).all()
    assert (Normal(1.5, 0.0)(keys, 3) == 1.5).all()
    assert Normal()(np.zeros(0, dtype=np.uint64), 4).shape == (0, 4)
    assert Uniform(0.0, 1.0)([], 4).shape == (0, 4)


def test_odd_dim_is_a_prefix_of_the_next_even_dim():
    keys = random_keys(50)
    for init in (Normal(), Uniform(0.0, 1.0)):
        np.testing.assert_array_equal(init(keys, 7), init(keys, 8)[:, :7])


def test_fast_enough():
    keys, init = random_keys(4096), Normal()
    init(keys, 64)
    best = min(_elapsed(init, keys) for _ in range(5))
    assert best < 0.02, f"Normal on 4096 x 64 took {best * 1e3:.1f} ms"  # loose: shared CI machines


def _elapsed(init: Initializer, keys: np.ndarray) -> float:
    start = time.perf_counter()
    init(keys, 64)
    return time.perf_counter() - start


@pytest.mark.parametrize("init", BUILTINS, ids=repr)
def test_config_round_trip(init):
    again = init_from_config(json.loads(json.dumps(init.config())))
    assert again == init
    keys = random_keys(20)
    np.testing.assert_array_equal(again(keys, 6, 9), init(keys, 6, 9))


def test_resolve_init_builtins_and_default():
    fn, cfg = resolve_init(None)
    assert cfg == {"kind": "normal", "mean": 0.0, "std": 0.01, "seed": 0}
    np.testing.assert_array_equal(fn(EDGE_KEYS, 4, 3), Normal(0.0, 0.01)(EDGE_KEYS, 4, 3))
    fn, cfg = resolve_init(Uniform(0, 1))
    assert cfg["kind"] == "uniform" and fn == Uniform(0, 1)


def test_resolve_init_wraps_callables():
    seen = {}

    def by_key(keys, dim):
        seen["dtype"] = keys.dtype
        return np.repeat((keys % 7).astype(np.float64)[:, None], dim, axis=1)

    fn, cfg = resolve_init(by_key)
    assert cfg == {"kind": "callable", "repr": repr(by_key)}
    rows = fn(np.array([3, 10, 2**64 - 1], dtype=np.uint64), 2, 123)
    assert seen["dtype"] == np.uint64
    assert rows.dtype == np.float32 and rows.tolist() == [[3, 3], [3, 3], [1, 1]]


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (
            lambda keys, dim: np.zeros((len(keys), dim + 1)),
            ValueError,
            r"must return shape \(3, 4\).*got \(3, 5\)",
        ),
        (lambda keys, dim: np.zeros(len(keys)), ValueError, r"must return shape \(3, 4\).*got \(3,\)"),
        (lambda keys, dim: np.full((len(keys), dim), np.nan), ValueError, "non-finite"),
        (lambda keys, dim: np.full((len(keys), dim), 1e300), ValueError, "non-finite"),
        (lambda keys, dim: np.full((len(keys), dim), "x"), TypeError, "real numbers, got dtype <U1"),
    ],
)
def test_callable_validation(fn, error, match):
    init, _ = resolve_init(fn)
    with pytest.raises(error, match=match):
        init(np.arange(3, dtype=np.uint64), 4)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Normal(0.0, -1.0), ValueError, r"std must be >= 0, got -1\.0"),
        (lambda: Normal(float("inf")), ValueError, "mean must be a finite float32 number, got inf"),
        (lambda: Uniform(-1e39, 0.0), ValueError, "low must be a finite float32 number, got -1e"),
        (lambda: Normal("0"), ValueError, "mean must be a finite float32 number, got '0'"),
        (lambda: Normal(seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
        (lambda: Normal(seed=1.5), ValueError, r"seed .*got 1\.5"),
        (lambda: Uniform(1.0, 0.0), ValueError, r"low <= high, got low=1\.0, high=0\.0"),
        (
            lambda: Normal()(np.zeros((2, 2), np.uint64), 4),
            ValueError,
            r"keys must be 1-D, got shape \(2, 2\)",
        ),
        (
            lambda: Normal()(np.zeros(2, np.float64), 4),
            TypeError,
            "keys must be int64 or uint64, got float64",
        ),
        (lambda: Normal()(np.zeros(2, np.uint64), 0), ValueError, "dim must be an integer >= 1, got 0"),
        (lambda: resolve_init(Normal), TypeError, r"an instance such as Normal\(\.\.\.\), got the class"),
        (lambda: resolve_init(3), TypeError, "init must be mlkv.init.Normal/Uniform/Zeros, a callable"),
        (
            lambda: init_from_config({"kind": "callable", "repr": "<fn>"}),
            ValueError,
            "<fn> was a Python callable",
        ),
        (lambda: init_from_config({"kind": "xavier"}), ValueError, r"unknown init kind 'xavier'"),
        (lambda: init_from_config({"kind": "normal", "sigma": 1}), ValueError, "bad normal init config"),
    ],
)
def test_validation_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()

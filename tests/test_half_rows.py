"""float16 / bfloat16 tables: embeddings stored in 16 bits (engine and memory tier), float32 everywhere else.

Oracle: torch's own rounding, ``torch.tensor(x).to(torch.float16 / torch.bfloat16).float()`` (round to
nearest, ties to even), and torch.optim.Adagrad for an update computed in float32 and rounded once when
stored. Every round trip runs on the three engines with a memory tier far smaller than the table, so rows
also come back from the write-back queue, from the engine and after a reopen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlkv
from mlkv.errors import InvalidArgumentError, InvalidTypeError
from mlkv.optim import SGD, Adagrad

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_round(x: np.ndarray, dtype: str) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(HALF[dtype]).float().numpy()


def hard_values(n: int, dim: int, seed: int) -> np.ndarray:
    """Random values over many magnitudes, plus ties and neighbours of ties in both formats, subnormals and
    values beyond float16's range (which round to +-inf, as in torch)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, dim)) * 10.0 ** rng.integers(-9, 6, (n, 1))).astype(np.float32)
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 2**-24, 3 * 2**-25, 65520.0])
    special = np.concatenate([ties, -ties, np.nextafter(ties, 0), np.nextafter(ties, 2**20), [0.0, -0.0]])
    flat = x.reshape(-1)
    flat[: len(special)] = special.astype(np.float32)
    return x


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_put_get_round_trip_as_torch_rounds_through_queue_engine_and_reopen(
    engine, dtype, tmp_path, store_factory
):
    n, dim = 3000, 8
    keys = np.arange(n, dtype=np.uint64) * 7919
    x = hard_values(n, dim, 0)
    want = torch_round(x, dtype)
    s = store_factory(engine, tmp_path / "s", cache_bytes="16KiB")
    t = s.table("e", dim=dim, dtype=dtype, optimizer=SGD(lr=0.1))
    t.put(keys, x)
    assert s.stats()["rows_written_back"] > 0  # most rows left the tier: read back from queue or engine
    np.testing.assert_array_equal(t.get(keys, track=False), want)
    t.flush()
    np.testing.assert_array_equal(t.get(keys[::-1], track=False), want[::-1])
    t.lookahead(keys[:300])  # rows admitted by the look-ahead threads
    np.testing.assert_array_equal(t.get(keys[:300], track=False), want[:300])
    s.close()
    s = store_factory(engine, tmp_path / "s", cache_bytes="16KiB")
    t = s.table("e")  # dtype=None: the stored one
    assert t.dtype == dtype
    np.testing.assert_array_equal(t.get(keys, track=False), want)
    batches = list(t.items(batch_size=700))
    k, rows = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(rows, want[np.searchsorted(keys, k)])
    assert len(k) == n


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_update_computes_in_float32_and_rounds_once_when_stored(engine, dtype, tmp_path, store_factory):
    """Oracle: a float32 table with the same rows and gradients, its rows rounded by torch after each step
    (put keeps the optimizer state): the 16-bit table's rows are exactly those, its state the same."""
    n, dim, lr = 1500, 6, 0.05
    keys = np.arange(n, dtype=np.uint64)
    s = store_factory(engine, tmp_path / "s", cache_bytes="24KiB")
    t = s.table("e", dim=dim, dtype=dtype, optimizer=Adagrad(lr=lr))
    ref = store_factory("memory", tmp_path / "ref").table("e", dim=dim, optimizer=Adagrad(lr=lr))
    x = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
    t.put(keys, x)
    ref.put(keys, torch_round(x, dtype))
    rng = np.random.default_rng(2)
    for _ in range(3):
        g = rng.standard_normal((n, dim)).astype(np.float32)
        both = (np.concatenate([keys, keys]), np.concatenate([g * 0.25, g * 0.75]))  # duplicates summed
        t.update(*both)
        ref.update(*both)
        exact = ref.get(keys, track=False)
        want = torch_round(exact, dtype)
        assert (want != exact).any()  # the step did need rounding
        ref.put(keys, want)
        np.testing.assert_array_equal(t.get(keys[::-1], track=False), want[::-1])
    np.testing.assert_array_equal(t.optimizer_state(keys)["sum"], ref.optimizer_state(keys)["sum"])
    s.close()
    s = store_factory(engine, tmp_path / "s")
    np.testing.assert_array_equal(s.table("e").get(keys, track=False), want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_init_rows_are_rounded_when_created_and_before_admission(dtype, tmp_path, store_factory):
    s = store_factory("memory", tmp_path / "s")
    ref = s.table("e", dim=16, init=mlkv.init.Normal(0.0, 0.3))  # float32: the same init, unrounded
    keys = np.arange(0, 4000, 3, dtype=np.uint64)
    want = torch_round(ref.get(keys, track=False), dtype)
    s2 = store_factory("memory", tmp_path / "s2")
    t = s2.table("e", dim=16, dtype=dtype, init=mlkv.init.Normal(0.0, 0.3))
    np.testing.assert_array_equal(t.get(keys, track=False), want)
    s3 = store_factory("memory", tmp_path / "s3")
    waiting = s3.table("e", dim=16, dtype=dtype, init=mlkv.init.Normal(0.0, 0.3), admit_after=3)
    np.testing.assert_array_equal(waiting.get(keys), want)  # not stored yet: served from init
    assert len(waiting) == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bytes_per_row_halve_for_embeddings_on_disk_and_in_the_tier(engine, dtype, tmp_path, store_factory):
    dim = 32
    s = store_factory(engine, tmp_path / "s", cache_bytes="64KiB")
    sgd = s.table("sgd", dim=dim, dtype=dtype, optimizer=SGD(lr=0.1))
    ada = s.table("ada", dim=dim, dtype=dtype, optimizer=Adagrad(lr=0.1))
    aged = s.table("aged", dim=dim, dtype=dtype, optimizer=Adagrad(lr=0.1), ttl_steps=5)
    full = s.table("full", dim=dim, optimizer=SGD(lr=0.1))
    expected = {"sgd": 2 * dim, "ada": 2 * dim + 4 * dim, "aged": 2 * dim + 4 * dim + 4, "full": 4 * dim}
    assert s._engine.tables() == expected
    for name, t in (("sgd", sgd), ("ada", ada), ("aged", aged), ("full", full)):
        assert t.tier.row_bytes == expected[name]
    s.close()
    # the same budget holds twice the rows of a 16-bit SGD table as of a float32 one
    rows = {}
    for name, dt in (("half", dtype), ("full", "float32")):
        st = store_factory(engine, tmp_path / name, cache_bytes="64KiB")
        t = st.table("e", dim=dim, dtype=dt, optimizer=SGD(lr=0.1))
        t.get(np.arange(5000, dtype=np.uint64), track=False)
        stats = st.stats()
        assert stats["memory_tier_bytes"] <= 64 * 1024
        assert stats["memory_tier_bytes"] == t.tier.capacity * t.tier.row_bytes
        rows[name] = stats["memory_tier_rows"]
        if engine == "slab":
            st.checkpoint()
            rows[name + "_disk"] = st.disk_bytes()
    assert rows["half"] >= 1.9 * rows["full"]
    if engine == "slab":
        assert rows["half_disk"] < 0.6 * rows["full_disk"]


def neighbours(x: float, dtype: str) -> tuple[float, float]:
    """The two representable values around float32 `x`: torch's nearest and the one on x's other side."""
    tdt = HALF[dtype]
    near = torch.tensor([x], dtype=torch.float32).to(tdt)
    toward = torch.tensor([np.inf if float(near) < x else -np.inf], dtype=tdt)
    other = torch.nextafter(near, toward)
    return tuple(sorted((float(near.float()), float(other.float()))))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours_and_reproducible(
    dtype, tmp_path, store_factory
):
    n, dim = 4000, 4
    keys = np.arange(n, dtype=np.uint64)
    results = []
    for run in range(2):
        s = store_factory("memory", tmp_path / f"s{run}", cache_bytes="32KiB")
        t = s.table("e", dim=dim, dtype=dtype, stochastic_rounding=True, optimizer=SGD(lr=1.0))
        assert t.stochastic_rounding
        for value in (1 + 2**-9 / 3, -3.3e-3, 0.7, 3e-6):  # 3e-6: a float16 subnormal
            x = float(np.float32(value))
            lo, hi = neighbours(x, dtype)
            t.put(keys, np.full((n, dim), x, dtype=np.float32))
            got = t.get(keys, track=False)
            results.append(got)
            assert set(np.unique(got).tolist()) == {lo, hi}  # each result is a neighbour; both occur
            # unbiased: the mean of n * dim roundings is x, to within 5 standard errors
            assert abs(got.astype(np.float64).mean() - x) < 5 * (hi - lo) / 2 / np.sqrt(n * dim)
        # an update is computed in float32 and rounded stochastically too
        t.update(keys, np.full((n, dim), 1e-3, dtype=np.float32))
        before = results[-1].astype(np.float32) - np.float32(1e-3)  # each row's own float32 result
        got = t.get(keys, track=False)
        for b in np.unique(before):
            lo, hi = neighbours(float(b), dtype)
            assert set(np.unique(got[before == b]).tolist()) <= {lo, hi}
        results.append(got)
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:], strict=True):
        np.testing.assert_array_equal(a, b)  # the same operations give the same bits


def test_expiry_age_column_and_export_read_16_bit_rows(tmp_path, store_factory):
    s = store_factory("slab", tmp_path / "s", cache_bytes="16KiB")
    t = s.table("e", dim=4, dtype="bfloat16", optimizer=SGD(lr=0.5), ttl_steps=2)
    old, new = np.arange(100, dtype=np.uint64), np.arange(100, 200, dtype=np.uint64)
    t.get(old, track=False)
    for _ in range(3):
        t.update(new, np.ones((100, 4), np.float32))
    assert t.expire() == 100
    np.testing.assert_array_equal(np.sort(t.contains(np.arange(200))), np.r_[[False] * 100, [True] * 100])
    out = str(tmp_path / "e.npy")
    assert t.export(out) == 100
    np.testing.assert_array_equal(np.load(out), t.get(new, track=False))
    assert (np.load(out) == torch_round(np.load(out), "bfloat16")).all()


def test_dtype_errors_and_schema(tmp_path, store_factory):
    s = store_factory("memory", tmp_path / "s")
    with pytest.raises(InvalidArgumentError, match=r"float32, float16, bfloat16.*float64"):
        s.table("x", dim=4, dtype="float64")
    with pytest.raises(InvalidArgumentError, match=r"stochastic_rounding=True.*float32"):
        s.table("x", dim=4, stochastic_rounding=True)
    with pytest.raises(InvalidTypeError, match="stochastic_rounding"):
        s.table("x", dim=4, dtype="float16", stochastic_rounding=1)
    assert s.tables() == []
    s.table("h", dim=4, dtype="float16")
    s.table("f", dim=4)
    with pytest.raises(mlkv.SchemaError, match=r"float16.*bfloat16"):
        s.table("h", dtype="bfloat16")
    with pytest.raises(mlkv.SchemaError, match=r"float32.*float16"):
        s.table("f", dtype="float16")
    with pytest.raises(mlkv.SchemaError, match=r"stochastic_rounding=False.*True"):
        s.table("h", stochastic_rounding=True)
    assert s.table("h").dtype == "float16" and s.table("h", dtype="float16").dtype == "float16"
    assert "stochastic_rounding" not in s.table("f").schema()  # float32 schemas as before


def test_reshard_copies_16_bit_rows_and_their_dtype(tmp_path):
    from mlkv.distributed import layout
    from mlkv.distributed.reshard import reshard

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    keys = np.arange(500, dtype=np.uint64)
    x = np.random.default_rng(3).standard_normal((500, 8)).astype(np.float32)
    with mlkv.open(layout.shard_dir(src, 0, 1)) as s:
        t = s.table("e", dim=8, dtype="bfloat16", stochastic_rounding=True, optimizer=Adagrad(lr=0.1))
        t.put(keys, x)
        t.update(keys, x)
        want, state = t.get(keys, track=False), t.optimizer_state(keys)["sum"]
        s.checkpoint()
        ckpt = s.last_checkpoint()[0]
    layout.write_record(src, 0, 1, ckpt)
    assert reshard(src, 2, dst)["rows"] == 500
    got, got_state = np.zeros_like(want), np.zeros_like(state)
    for r in range(2):
        with mlkv.open(layout.shard_dir(dst, r, 2), readonly=True) as s:
            t = s.table("e")
            assert t.dtype == "bfloat16" and t.stochastic_rounding
            mine = t.contains(keys)
            got[mine] = t.get(keys[mine], track=False)
            got_state[mine] = t.optimizer_state(keys[mine])["sum"]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_state, state)


def test_mlkv_train_dtype_flag_stores_the_workload_tables_in_16_bits(tmp_path):
    import argparse
    import io

    from mlkv.workloads.cli import add_train_parsers, config_from_args, make_workload
    from mlkv.workloads.runner import train

    parser = argparse.ArgumentParser(prog="mlkv")
    add_train_parsers(parser.add_subparsers(dest="command"))
    argv = ["train", "kge", "--dataset", "nations", "--dim", "16", "--negatives", "8", "--epochs", "1"]
    args = parser.parse_args([*argv, "--max-steps", "3", "--no-progress", "--path", str(tmp_path / "s")])
    args.dtype = "bfloat16"
    report = train(make_workload(args), config_from_args(args, log=io.StringIO()))
    with mlkv.open(str(tmp_path / "s")) as s:
        tables = [s.table(name) for name in s.tables()]
        assert tables and all(t.dtype == "bfloat16" for t in tables)
        assert report["table_bytes"] == sum(len(t) * t.tier.row_bytes for t in tables)
        for t in tables:
            _, rows = next(t.items())
            np.testing.assert_array_equal(rows, torch_round(rows, "bfloat16"))
    with pytest.raises(SystemExit):  # argparse lists the choices
        parser.parse_args([*argv, "--dtype", "float64"])


def test_asynchronous_updates_round_like_synchronous_ones(tmp_path, store_factory):
    """update_async runs the optimizer with the store lock released (the applier): same stored rows."""
    keys = np.arange(800, dtype=np.uint64)
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal((800, 8)).astype(np.float32) for _ in range(4)]
    got = []
    for bound in (0, 2):
        s = store_factory("slab", tmp_path / f"s{bound}", cache_bytes="16KiB", staleness_bound=bound)
        t = s.table("e", dim=8, dtype="bfloat16", stochastic_rounding=True, optimizer=Adagrad(lr=0.1))
        for g in grads:
            t.get(keys)
            t.update_async(keys, g)
        t.wait_updates()
        got.append(t.get(keys, track=False))
    assert s.stats()["async_updates"] == 4
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[1], torch_round(got[1], "bfloat16"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_codec_encodes_every_kind_of_float32_as_torch_does(dtype):
    """Random float32 bit patterns (every exponent: subnormals, overflow, inf, NaN) and ties."""
    from mlkv.store.row_codec import RowCodec

    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    bits[:4] = [0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00000]  # +-inf, a signalling and a negative NaN
    x = bits.view(np.float32)
    codec = RowCodec(dtype, 1, 1)
    got = codec.decode(codec.encode(x))
    want = torch_round(x, dtype)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0.0 too

"""KeyIndex, the compiled hash map under the tier, the slab engine and the queue, against a dict."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlkv.engine.key_index import KeyIndex, dedup, unique_inverse, unique_keys


def _check_against(index: KeyIndex, model: dict[int, int], probe: np.ndarray) -> None:
    assert len(index) == len(model)
    keys, vals = index.items()
    assert dict(zip(keys.tolist(), vals.tolist(), strict=True)) == model
    expect = np.array([model.get(int(k), -1) for k in probe], dtype=np.int64)
    np.testing.assert_array_equal(index.lookup(probe), expect)


def _crowded_keys() -> np.ndarray:
    """Keys whose homes in a fresh (1024-position) index fall on a few neighbouring positions, some at the
    table's end so that chains wrap around: every insert and remove works inside long shared chains."""
    cand = np.arange(1, 400_000, dtype=np.uint64)
    with np.errstate(over="ignore"):
        home = ((cand ^ (cand >> np.uint64(32))) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(54)
    near_start = cand[np.isin(home, [3, 4, 5])][:30]
    near_end = cand[np.isin(home, [1021, 1022, 1023])][:30]
    return np.concatenate([near_start, near_end, np.array([0, 2**63, 2**64 - 1], dtype=np.uint64)])


_UNIVERSE = _crowded_keys()
_ops = st.lists(
    st.tuples(st.sampled_from(["insert", "assign", "remove"]), st.lists(st.integers(0, len(_UNIVERSE) - 1))),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_random_operations_match_a_dict(ops):
    index, model = KeyIndex(512), {}
    assert len(index.vals) == 1024  # the size _crowded_keys aims at
    for step, (op, picks) in enumerate(ops):
        keys = _UNIVERSE[np.unique(np.array(picks, dtype=np.int64))]
        vals = np.arange(len(keys), dtype=np.int64) + 1000 * step
        if op == "insert":
            absent = np.array([int(k) not in model for k in keys], dtype=bool)
            index.insert_new(keys[absent], vals[absent])
            model.update(zip(keys[absent].tolist(), vals[absent].tolist(), strict=True))
        elif op == "assign":
            index.assign(keys, vals)
            model.update(zip(keys.tolist(), vals.tolist(), strict=True))
        else:
            old = index.remove(keys)
            np.testing.assert_array_equal(old, [model.pop(int(k), -1) for k in keys])
        _check_against(index, model, _UNIVERSE)


def test_churn_at_full_load_keeps_every_chain_intact():
    """A tier's pattern: a fixed-size set where every round removes some keys and inserts as many new
    ones, long enough that tombstones (if deletion left any) would have filled the table many times."""
    rng = np.random.default_rng(7)
    index = KeyIndex(512)
    cap = len(index.vals)
    live = rng.choice(2**62, cap // 2, replace=False).astype(np.uint64)
    index.insert_new(live, np.arange(len(live)))
    model = dict(zip(live.tolist(), range(len(live)), strict=True))
    for r in range(200):
        out = rng.choice(live, 64, replace=False)
        index.remove(out)
        for k in out.tolist():
            del model[k]
        new = rng.integers(0, 2**64, 64, dtype=np.uint64)
        new = new[[int(k) not in model for k in new]]
        index.insert_new(new, np.full(len(new), r))
        model.update(dict.fromkeys(new.tolist(), r))
        live = np.fromiter(model, dtype=np.uint64)
    assert len(index.vals) == cap  # never grew: the load stayed at 1/2
    _check_against(index, model, np.concatenate([live, rng.integers(0, 2**64, 1000, dtype=np.uint64)]))


def test_grows_past_its_initial_capacity_and_takes_int64_keys():
    keys = np.arange(-50_000, 50_000, 7, dtype=np.int64)
    index = KeyIndex()
    for part in np.array_split(np.arange(len(keys)), 9):
        index.insert_new(keys[part], part)
    np.testing.assert_array_equal(index.lookup(keys), np.arange(len(keys)))
    np.testing.assert_array_equal(index.lookup(keys.view(np.uint64)), np.arange(len(keys)))
    assert len(index.vals) >= 2 * len(keys)


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_unique_helpers_match_numpy(n):
    keys = np.random.default_rng(n).integers(0, 300, n).astype(np.uint64)
    uk, inv, first = unique_inverse(keys)
    ref, ref_first, ref_inv = np.unique(keys, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(uk, ref)
    np.testing.assert_array_equal(inv, ref_inv)
    np.testing.assert_array_equal(first, ref_first)
    np.testing.assert_array_equal(unique_keys(keys), ref)
    uk, inv = dedup(keys)  # first-appearance order
    np.testing.assert_array_equal(uk, keys[np.sort(ref_first)])
    np.testing.assert_array_equal(uk[inv], keys)


@pytest.mark.parametrize(
    "keys",
    [
        np.array([1, 5, 9, 2**63, 2**64 - 1], dtype=np.uint64),  # sorted and distinct as uint64
        np.array([-1, 3], dtype=np.int64),  # sorted as int64, not as uint64 (-1 is 2**64 - 1)
        np.array([3, 3, 4], dtype=np.uint64),  # sorted, not distinct
    ],
)
def test_unique_inverse_of_sorted_distinct_keys_is_theirs_in_a_new_array(keys):
    uk, inv, first = unique_inverse(keys)
    ref, ref_first, ref_inv = np.unique(keys.view(np.uint64), return_index=True, return_inverse=True)
    np.testing.assert_array_equal(uk, ref)
    np.testing.assert_array_equal(inv, ref_inv)
    np.testing.assert_array_equal(first, ref_first)
    assert uk.dtype == np.uint64 and not np.shares_memory(uk, keys)  # the store may keep uk


def _wrapping_keys(n: int, cap: int, seed: int) -> np.ndarray:
    """n distinct keys whose homes in a `cap`-position index are in its last 16 positions: one long run
    that wraps around to the table's start."""
    rng = np.random.default_rng(seed)
    cand = rng.integers(0, 2**64 - 1, 400 * n, dtype=np.uint64)
    shift = np.uint64(65 - cap.bit_length())
    with np.errstate(over="ignore"):
        home = ((cand ^ (cand >> np.uint64(32))) * np.uint64(0x9E3779B97F4A7C15)) >> shift
    return np.unique(cand[home >= cap - 16])[:n]


@pytest.mark.parametrize("seed", range(6))
def test_growing_in_place_keeps_every_key_through_wrapped_runs_and_several_doublings(seed):
    """The index grows by re-laying its own table: a run that wraps around the old table's end, clusters,
    growth by 2x and by 16x at once, then removals (whose backward shift needs unbroken chains): against
    a dict after every step, absent keys included."""
    rng = np.random.default_rng(seed)
    index, model = KeyIndex(0), {}
    wrapped = _wrapping_keys(300, len(index.vals), seed)  # 300 of 1024 positions, all homed at the end
    index.insert_new(wrapped, np.arange(len(wrapped)))
    model.update(zip(wrapped.tolist(), range(len(wrapped)), strict=True))
    assert index.vals[0] != -1  # the run wrapped
    probe = rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64)
    for n in (250, 5000, 40_000):  # 2x, then 16x at once, then 4x
        keys = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64))
        keys = keys[index.lookup(keys) < 0]
        vals = rng.integers(0, 2**40, len(keys))
        index.insert_new(keys, vals)
        model.update(zip(keys.tolist(), vals.tolist(), strict=True))
        _check_against(index, model, np.concatenate([probe, keys[:500], wrapped]))
    gone = np.array(list(model), dtype=np.uint64)[::3]
    index.remove(gone)
    for k in gone.tolist():
        del model[k]
    _check_against(index, model, np.concatenate([probe, gone[:500], wrapped]))


def test_growing_in_place_needs_no_second_table():
    """Growth holds the new table alone (the old one is resized into it), not the new table beside the
    old one or beside a copy of the live pairs: traced allocations peak at the new table's bytes."""
    import tracemalloc

    rng = np.random.default_rng(3)
    index = KeyIndex(1 << 19)  # 2^20 positions, 16 MiB
    keys = np.unique(rng.integers(0, 2**64 - 1, (1 << 19) - 64, dtype=np.uint64))
    index.insert_new(keys, np.arange(len(keys)))
    more = np.array([2**63 + i for i in range(1000)], dtype=np.uint64)
    tracemalloc.start()
    try:
        index.insert_new(more, np.arange(len(more)))  # past load 1/2: doubles to 32 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index.vals) == 1 << 21
    assert peak < (32 << 20) + (1 << 20), peak  # a rebuild beside the live pairs: 32 + 8 + 1 MiB
    np.testing.assert_array_equal(index.lookup(keys), np.arange(len(keys)))
    np.testing.assert_array_equal(index.lookup(more), np.arange(len(more)))


def test_an_unpickled_index_still_grows():
    """A copy made by pickle (its table does not own its memory) grows like the original."""
    import pickle

    rng = np.random.default_rng(9)
    keys = np.unique(rng.integers(0, 2**64 - 1, 400, dtype=np.uint64))
    index = pickle.loads(pickle.dumps(_filled(keys)))
    more = np.unique(rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64))
    more = more[~np.isin(more, keys)]
    index.insert_new(more, np.arange(len(more)) + len(keys))
    np.testing.assert_array_equal(index.lookup(keys), np.arange(len(keys)))
    np.testing.assert_array_equal(index.lookup(more), np.arange(len(more)) + len(keys))


def _filled(keys: np.ndarray) -> KeyIndex:
    index = KeyIndex(0)
    index.insert_new(keys, np.arange(len(keys)))
    return index

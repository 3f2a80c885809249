"""Table.export and `mlkv export`: every format loads with its own library (numpy, safetensors, torch), rows
come sorted by key and match Table.get, the suffix decides the format, and bad output paths are clear errors
that write nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import mlkv
from mlkv.cli import main
from mlkv.errors import InvalidArgumentError, MlkvError, PathNotFoundError

DIM = 6
rng = np.random.default_rng(7)
KEYS = rng.choice(np.arange(-5000, 5000, dtype=np.int64), size=700, replace=False)  # negatives, any order


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, weights) read back with the plain library of each format."""
    if path.endswith(".safetensors"):
        d = load_file(path)
        return d["keys"], d["weights"]
    if path.endswith(".npy"):
        return np.load(path[: -len(".npy")] + ".keys.npy"), np.load(path)
    d = torch.load(path, weights_only=True)
    return d["keys"].numpy(), d["weights"].numpy()


@pytest.fixture(params=["slab", "rocksdb"])
def store_path(request, tmp_path) -> str:
    path = str(tmp_path / "store")
    with mlkv.open(path, engine=request.param, cache_bytes="16KiB") as store:  # most rows go to the engine
        t = store.table("t", dim=DIM, optimizer=mlkv.optim.Adagrad(lr=0.1))
        t.put(KEYS, rng.standard_normal((len(KEYS), DIM)).astype(np.float32))
        t.update(KEYS[:100], np.ones((100, DIM), dtype=np.float32))
        store.table("empty", dim=3)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".npy", ".pt"])
def test_export_writes_rows_sorted_by_key_that_match_get(store_path, tmp_path, suffix):
    out = str(tmp_path / f"t{suffix}")
    with mlkv.open(store_path, readonly=True, create=False, engine=_engine(store_path)) as store:
        t = store.table("t")
        assert t.export(out) == len(KEYS)
        keys, weights = _load(out)
        assert keys.dtype == np.int64 and weights.dtype == np.float32
        assert weights.shape == (len(KEYS), DIM)
        np.testing.assert_array_equal(keys, np.sort(KEYS))  # every key once, ascending (signed)
        np.testing.assert_array_equal(weights, t.get(keys, track=False))


@pytest.mark.parametrize("suffix", [".safetensors", ".npy", ".pt"])
def test_export_of_an_empty_table(store_path, tmp_path, suffix):
    out = str(tmp_path / f"e{suffix}")
    with mlkv.open(store_path, readonly=True, create=False, engine=_engine(store_path)) as store:
        assert store.table("empty").export(out) == 0
    keys, weights = _load(out)
    assert keys.shape == (0,) and weights.shape == (0, 3)


def test_safetensors_header_says_the_order(store_path, tmp_path):
    from safetensors import safe_open

    out = str(tmp_path / "t.safetensors")
    with mlkv.open(store_path, engine=_engine(store_path)) as store:
        store.table("t").export(out)
    with safe_open(out, "np") as f:
        assert f.metadata() == {"table": "t", "dim": str(DIM), "order": "keys ascending"}


def test_unknown_suffix_is_an_error_naming_the_formats(tmp_path):
    with mlkv.open(str(tmp_path / "s")) as store:
        t = store.table("t", dim=2)
        t.get([1, 2])
        for name in ("out.bin", "out", "out.npz"):
            with pytest.raises(InvalidArgumentError, match=r"\.safetensors, \.npy, \.pt"):
                t.export(str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == ["s"]  # nothing written


def test_missing_directory_is_named_and_nothing_is_written(tmp_path):
    missing = tmp_path / "no" / "such"
    with mlkv.open(str(tmp_path / "s")) as store:
        t = store.table("t", dim=2)
        t.get([1, 2])
        with pytest.raises(PathNotFoundError, match=f"directory {missing} does not exist") as e:
            t.export(str(missing / "out.npy"))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, MlkvError)
    assert not (tmp_path / "no").exists()


def test_a_table_that_changes_between_the_scans_writes_nothing(tmp_path):
    with mlkv.open(str(tmp_path / "s")) as store:
        t = store.table("t", dim=2)
        t.get(np.arange(10))
        real_items, calls = t.items, []

        def items(batch_size: int = 65536):  # each second scan sees one more row than the first
            calls.append(1)
            if len(calls) % 2 == 0:
                t.get([100 + len(calls)])
            return real_items(batch_size)

        t.items = items
        for suffix in (".safetensors", ".npy", ".pt"):
            with pytest.raises(MlkvError, match="changed during export"):
                t.export(str(tmp_path / f"out{suffix}"))
    assert sorted(os.listdir(tmp_path)) == ["s"]


# ---- the command ------------------------------------------------------------------------------------------
def _engine(path: str) -> str:
    from mlkv.cli import store_engine

    return store_engine(path)


def test_cli_suffix_decides_and_format_must_agree(store_path, tmp_path, capsys):
    out = str(tmp_path / "t.npy")
    assert main(["export", store_path, "t", out]) == 0  # a .npy file is a real .npy, not safetensors
    keys, weights = _load(out)
    assert len(keys) == len(KEYS) and weights.shape == (len(KEYS), DIM)
    assert main(["export", store_path, "t", str(tmp_path / "t.pt"), "--format", "pt"]) == 0
    capsys.readouterr()

    bad = str(tmp_path / "x.safetensors")
    assert main(["export", store_path, "t", bad, "--format", "npy"]) == 2
    err = capsys.readouterr().err
    assert "--format npy disagrees" in err and "x.npy" in err and "Traceback" not in err
    assert main(["export", store_path, "t", str(tmp_path / "x.csv")]) == 2
    assert ".safetensors, .npy, .pt" in capsys.readouterr().err
    assert main(["export", store_path, "t", str(tmp_path / "gone" / "x.pt")]) == 2
    assert f"directory {tmp_path / 'gone'} does not exist" in capsys.readouterr().err
    assert not any(name.startswith("x") for name in os.listdir(tmp_path))


def test_cli_unknown_table_lists_the_tables_in_cli_terms(store_path, tmp_path, capsys):
    assert main(["export", store_path, "nope", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "no table 'nope'" in err and "empty, t" in err and "dim=" not in err

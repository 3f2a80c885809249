"""Errors a torch user catches: every bad input to the torch layer (and to the RocksDB engine under it) raises
an mlkv.MlkvError that is also the built-in type torch raises or documents for it (TypeError for a wrong
type or dtype, ValueError for a wrong value or shape, NotImplementedError for what is not supported,
KeyError for an unknown table), and reads or changes nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import mlkv
from mlkv.engine.rocksdb import RocksDBEngine
from mlkv.torch import Embedding, EmbeddingBag, Prefetcher, SparseOptimizer

DIM = 4


@pytest.fixture
def table(tmp_path):
    with mlkv.open(tmp_path / "store", engine="memory") as store:
        yield store.table("t", dim=DIM, optimizer=mlkv.optim.SGD(lr=0.1))


def check(excinfo, builtin: type[Exception], match: str) -> None:
    e = excinfo.value
    assert isinstance(e, mlkv.MlkvError), type(e).__mro__
    assert isinstance(e, builtin), type(e).__mro__
    assert re.search(match, str(e)), str(e)


T = torch.tensor
BAG = EmbeddingBag
SUM = lambda t: EmbeddingBag(t, mode="sum")  # noqa: E731
CSR = lambda t: EmbeddingBag(t, include_last_offset=True)  # noqa: E731
CASES = [
    # (make module, call, builtin, message)
    (Embedding, lambda m: m(T([1.0, 2.0])), TypeError, r"int64 or int32 .*got torch\.float32"),
    (Embedding, lambda m: m([1, 2]), TypeError, "input must be a tensor"),
    (BAG, lambda m: m(T([[[1]]])), ValueError, r"1-D \(with offsets\) or 2-D, got shape \(1, 1, 1\)"),
    (BAG, lambda m: m(T([[1, 2]]), T([0])), ValueError, "offsets must be None"),
    (BAG, lambda m: m(T([1, 2])), ValueError, r"needs 1-D offsets.*got offsets None"),
    (BAG, lambda m: m(T([1, 2]), T([0.0, 1.0])), TypeError, r"offsets must be an int64.*float32"),
    (BAG, lambda m: m(T([1, 2]), T([1])), ValueError, r"offsets\[0\] must be 0.*got 1"),
    (BAG, lambda m: m(T([1, 2, 3]), T([0, 2, 1])), ValueError, "non-decreasing.*0, 2, 1"),
    (BAG, lambda m: m(T([1, 2]), T([0, 5])), ValueError, r"at most len\(input\) = 2, got 5"),
    (CSR, lambda m: m(T([1, 2]), T([0, 1])), ValueError, r"last offset must equal len\(input\) = 2, got 1"),
    (BAG, lambda m: m(T([[1, 2]]), per_sample_weights=torch.ones(1, 2)), NotImplementedError,
     "per_sample_weights is only supported for mode='sum'.*'mean'"),
    (SUM, lambda m: m(T([[1, 2]]), per_sample_weights=torch.ones(2)), ValueError,
     r"shape of input \(1, 2\), got \(2,\)"),
    (SUM, lambda m: m(T([[1, 2]]), per_sample_weights=T([[1, 2]])), TypeError,
     "per_sample_weights must be a floating point tensor, got torch.int64"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "call", "builtin", "match"), CASES)
def test_bad_forward_input_is_mlkv_error_and_builtin_and_reads_nothing(table, make, call, builtin, match):
    module = make(table)
    opt = SparseOptimizer([module])
    with pytest.raises(builtin) as e:
        call(module)
    check(e, builtin, match)
    assert opt.pending_reads == 0 and table._gate.outstanding() == 0
    assert len(table) == 0, "no row was created"


@pytest.mark.parametrize(
    ("make", "builtin", "match"),
    [
        (lambda t: EmbeddingBag(t, mode="median"), ValueError, r"mode must be one of .*'median'"),
        (lambda t: EmbeddingBag(t, mode="max", scale_grad_by_freq=True), ValueError, "scale_grad_by_freq"),
        (lambda t: Embedding(object()), TypeError, "table must be an mlkv Table.*object"),
        (lambda t: Embedding(t, padding_idx="0"), TypeError, "padding_idx must be an int key.*str"),
        (lambda t: Embedding(t, padding_idx=2**64), ValueError, "padding_idx must be an int64 key"),
        (lambda t: Embedding(t, max_norm=-1.0), ValueError, r"max_norm must be a finite number > 0.*-1\.0"),
        (lambda t: Embedding(t, max_norm=1.0, norm_type=0), ValueError, "norm_type must be a number > 0"),
        (lambda t: Embedding(t, scale_grad_by_freq="yes"), TypeError, "scale_grad_by_freq must be a bool"),
        (lambda t: Embedding(t).requires_grad_("no"), TypeError, "requires_grad must be a bool"),
        (lambda t: Embedding.from_pretrained(t, torch.ones(2, DIM, dtype=torch.long)), TypeError,
         "embeddings must be a floating point tensor"),
        (lambda t: Embedding.from_pretrained(t, np.ones((2, DIM)), keys=[1.5, 2.5]), TypeError,
         "keys must be integer keys"),
        (lambda t: SparseOptimizer([1]), TypeError, "mlkv.torch modules or models.*int"),
        (lambda t: SparseOptimizer(torch.nn.Linear(2, 2)), ValueError, "found no mlkv.torch"),
        (lambda t: Prefetcher([], keys=None, tables={}), TypeError, "keys must be a callable"),
        (lambda t: Prefetcher([], keys=lambda b: {}, tables=3), TypeError, "tables must be a Store or a"),
        (lambda t: Prefetcher([], keys=lambda b: {}, tables={}, depth=0), ValueError, "depth must be an int"),
    ],
)  # fmt: skip
def test_bad_construction_is_mlkv_error_and_builtin(table, make, builtin, match):
    with pytest.raises(builtin) as e:
        make(table)
    check(e, builtin, match)
    assert len(table) == 0


def test_prefetcher_keys_returning_no_mapping_is_mlkv_type_error(table):
    pf = Prefetcher([1, 2], keys=lambda b: [b], tables={"t": table}, depth=1)
    with pytest.raises(TypeError) as e:
        list(pf)
    check(e, TypeError, "keys.batch. must return a mapping table name -> keys, got list")


def test_rocksdb_engine_errors_are_mlkv_errors(tmp_path):
    engine = RocksDBEngine(str(tmp_path / "db"))
    try:
        with pytest.raises(KeyError) as e:
            engine.read("missing", np.array([1], dtype=np.uint64))
        check(e, KeyError, "no table 'missing'")
        with pytest.raises(ValueError) as e:
            engine.create_table("", 16)
        check(e, ValueError, "table name must be a non-empty str")
        engine.create_table("t", 16)
        with pytest.raises(ValueError) as e:
            engine.read("t", np.array([[1]], dtype=np.uint64))
        check(e, ValueError, r"keys must be 1-D, got shape \(1, 1\)")
        with pytest.raises(TypeError) as e:
            engine.read("t", np.array([-1]))
        check(e, TypeError, "keys must be uint64")
        with pytest.raises(TypeError) as e:
            engine.write("t", np.array([1], dtype=np.uint64), np.zeros((1, 16), dtype=np.float32))
        check(e, TypeError, "rows must be uint8, got float32")
        with pytest.raises(ValueError) as e:
            engine.write("t", np.array([1], dtype=np.uint64), np.zeros((1, 8), dtype=np.uint8))
        check(e, ValueError, r"rows must have shape \(1, 16\), got \(1, 8\)")
    finally:
        engine.close()

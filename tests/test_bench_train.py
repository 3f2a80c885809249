"""`mlkv bench train` on a tiny shape: every configuration runs, and its JSON report is complete and sane.

No timing is asserted (the machine is shared); the checks are that each configuration trained the same
number of samples, reported the fields the issue asks for, and that the tiered runs saw their tier.
"""

from __future__ import annotations

import json

import pytest

from mlkv.bench import train_bench
from mlkv.cli import main

TINY = ["--rows", "3000", "--dim", "8", "--batch", "64", "--bag", "4", "--steps", "3", "--warmup", "2"]


@pytest.mark.slow
def test_bench_train_json_has_every_configuration_and_the_cold_read_probe_with_sane_fields(tmp_path, capsys):
    args = ["bench", "train", *TINY, "--budgets", "0.1", "--regimes", "cold", "--path", str(tmp_path)]
    assert main([*args, "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    text = "\n".join(out[:-1])
    assert all(name in text for name in train_bench.CONFIGS)
    results = report["results"]
    got = {(r["config"], r["regime"], r["budget"], r["staleness"]) for r in results}
    want = {("torch-memory", "warm", None, 0), ("mlkv", "warm", "all", 0)}
    want |= {(c, "cold", None, 0) for c in ("torch-mmap", "rocksdb-naive", "slab-naive")}
    want |= {("mlkv-nolookahead", "cold", 0.1, 0), ("mlkv", "cold", 0.1, 0), ("mlkv", "cold", 0.1, 2)}
    assert got == want
    for r in results:
        assert r["skipped"] is None
        assert r["samples_per_s"] > 0 and len(r["repeats"]) == 1
        assert r["peak_rss_anon"] > 0 and r["peak_rss_file"] > 0
        if r["config"] == "torch-memory":
            assert r["ratio_torch_memory"] == pytest.approx(1.0)
        assert r["ratio_torch_memory"] > 0
        if r["config"].startswith("mlkv"):
            assert 0.0 <= r["hit_rate"] <= 1.0 and 0.0 <= r["stall_share"] <= 1.0
            assert len(r["hit_rate_steps"]) == 3 and len(r["stall_steps"]) == 3
            assert r["lookahead_dropped"] >= 0
        elif r["config"].endswith("naive"):
            assert r["hit_rate"] is None and 0.0 < r["stall_share"] < 1.0
        else:
            assert r["hit_rate"] is None and r["stall_share"] is None
    cached = next(r for r in results if r["budget"] == "all")
    assert cached["hit_rate"] == 1.0  # the whole table was read into the tier before the timed steps
    cold = report["cold_reads"]  # the cold regime measures misses against the device in the same run
    assert cold["rows"] == 3000 and 0 < cold["distinct_pages"] <= 3000
    assert cold["rows_per_s"] > 0 and cold["device_reads_per_s"] > 0 and cold["depth"] >= 1
    assert cold["ratio_device"] == pytest.approx(cold["rows_per_s"] / cold["device_reads_per_s"])
    assert "cold reads:" in text and "x the device" in text
    # the tmp stores are removed at the end
    assert list(tmp_path.iterdir()) == []


def test_bench_train_rejects_bad_arguments_before_running(tmp_path, capsys):
    assert main(["bench", "train", "--budgets", "1.5", "--path", str(tmp_path)]) == 2
    assert "budgets must be fractions in (0, 1]" in capsys.readouterr().err
    assert main(["bench", "train", "--configs", "torch-memory,nosuch", "--path", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_plan_runs_each_budget_with_and_without_lookahead_and_at_the_bound():
    cfg = train_bench.TrainConfig(budgets=(0.05, 0.25), regimes=("cold",), bound=3)
    labels = [(r.regime, r.label) for r in train_bench.plan(cfg)]
    assert labels == [
        ("warm", "torch-memory"),
        ("cold", "torch-mmap"),
        ("cold", "rocksdb-naive"),
        ("cold", "slab-naive"),
        ("cold", "mlkv-nolookahead 5%"),
        ("cold", "mlkv 5% K=8 s=0"),
        ("cold", "mlkv 5% K=8 s=3"),
        ("cold", "mlkv-nolookahead 25%"),
        ("cold", "mlkv 25% K=8 s=0"),
        ("cold", "mlkv 25% K=8 s=3"),
        ("warm", "mlkv cached K=8 s=0"),
    ]

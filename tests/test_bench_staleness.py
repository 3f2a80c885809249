"""`mlkv bench staleness` and `mlkv bench churn` at tiny sizes: every case is measured and reported (no
timing asserts), the figures hang together, and the JSON is the last stdout line."""

from __future__ import annotations

import json

from mlkv.cli import main


def test_bench_staleness_reports_each_bound_and_trainer_count(capsys):
    argv = ["bench", "staleness", "--datasets", "nations", "--epochs", "1", "--bounds", "0,2,inf",
            "--trainers", "1,2", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = report["rows"]
    assert [(r["bound"], r["trainers"]) for r in rows] == [
        (0, 1),
        (2, 1),
        ("inf", 1),
        (0, 2),
        (2, 2),
        ("inf", 2),
    ]
    for r in rows:
        assert r["samples_per_s"] > 0 and 0 < r["value"] <= 1 and r["metric"] == "mrr"
        assert sum(r["lag_hist"]) > 0
        if r["bound"] == 0:
            assert r["async_updates"] == 0 and sum(r["lag_hist"][1:]) == 0
        else:
            assert r["async_updates"] > 0
        if r["bound"] == 2:
            assert sum(r["lag_hist"][3:]) == 0
    assert rows[0]["speedup"] == 1.0


def test_bench_churn_bounds_table_size(capsys):
    argv = ["bench", "churn", "--steps", "60", "--batch", "128", "--active", "2000", "--ttl", "20",
            "--cap", "1500", "--expire-every", "10", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by = {r["config"]: r for r in report["rows"]}
    assert set(by) == {"plain", "admit2", "ttl", "cap", "admit2+ttl"}
    assert by["cap"]["rows_end"] <= 1500 < by["plain"]["rows_end"]
    assert by["admit2"]["rows_end"] < by["plain"]["rows_end"] and by["admit2"]["rows_rejected"] > 0
    assert by["ttl"]["rows_expired"] > 0 and by["ttl"]["rows_end"] < by["plain"]["rows_end"]
    for r in by.values():
        assert 0.5 <= r["auc"] <= 1

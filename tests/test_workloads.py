"""The training workloads end to end at tiny scale: they learn, they are deterministic, a resumed run ends
with the same rows as an uninterrupted one, the in-memory PyTorch baseline agrees, and `mlkv train`'s
--json output is one JSON object on the last line of stdout."""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import tempfile

import numpy as np
import pytest
from conftest import table_snapshot

import mlkv
from mlkv.workloads.cli import add_train_parsers, cmd_train, config_from_args, make_workload
from mlkv.workloads.runner import train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlkv")
    add_train_parsers(p.add_subparsers(dest="command"))
    return p


PARSER = _parser()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("criteo"))


def small(workload: str, data_dir: str) -> list[str]:
    """Flags for a run of a few seconds."""
    if workload == "dlrm":
        return ["dlrm", "--samples", "12000", "--test-samples", "4000", "--scale", "0.001",
                "--batch-size", "1024", "--data-dir", data_dir, "--cache-bytes", "256KiB"]  # fmt: skip
    if workload == "kge":
        return ["kge", "--dataset", "nations", "--dim", "32", "--negatives", "32", "--batch-size", "256"]
    return ["gnn", "--dim", "16", "--fanout", "5", "3", "--batch-size", "2048", "--max-steps", "8"]


def run(argv: list[str], backend: str = "mlkv", **parsed) -> dict:
    args = PARSER.parse_args(["train", *argv, "--no-progress"])
    for k, v in parsed.items():
        setattr(args, k, v)
    return train(make_workload(args), config_from_args(args, log=io.StringIO()), backend)


def snapshot(path: str) -> dict:
    with mlkv.open(path) as store:
        return {name: table_snapshot(store.table(name)) for name in store.tables()}


# ---- they learn -------------------------------------------------------------------------------------------
def test_dlrm_learns(data_dir, tmp_path):
    r = run([*small("dlrm", data_dir), "--epochs", "3", "--path", str(tmp_path / "s")])
    losses = [h["loss"] for h in r["history"]]
    assert losses[-1] < losses[0]
    assert r["auc"] > 0.62 and r["logloss"] < 0.6
    assert r["samples"] == 3 * 12000 and r["dataset"] == "criteo-synthetic"
    assert r["table_bytes"] > r["cache_bytes"]  # the tables did not fit the memory tier
    assert 0.0 <= r["hit_rate"] <= 1.0 and r["stall_seconds"] >= 0.0


def test_dlrm_reads_a_criteo_file_and_holds_out_its_tail(data_dir, tmp_path):
    """What a user does with the real Criteo Kaggle train.txt: --data FILE, the last 10% for testing."""
    from mlkv.workloads import criteo_synth

    path = str(tmp_path / "train.txt")
    criteo_synth.write_file(path, 10_000, criteo_synth.SynthSpec(scale=0.001), part=0)
    r = run(["dlrm", "--data", path, "--batch-size", "1024", "--epochs", "2", "--cache-bytes", "256KiB"])
    assert r["dataset"] == "criteo" and 8900 <= r["samples"] / 2 <= 9100
    assert r["auc"] > 0.6


def test_kge_learns_on_nations():
    r = run([*small("kge", ""), "--epochs", "6"])
    losses = [h["loss"] for h in r["history"]]
    assert losses[-1] < losses[0]
    assert r["mrr"] > 0.45  # a random ranking of Nations' 14 entities scores about 0.25
    assert r["hits@1"] <= r["hits@3"] <= r["hits@10"]


@pytest.mark.parametrize("model", ["distmult", "transe"])
def test_other_kge_models_train(model):
    r = run([*small("kge", ""), "--epochs", "2", "--model", model])
    assert r["mrr"] > 0.3 and np.isfinite(r["final_loss"])


def test_gnn_learns():
    r = run([*small("gnn", ""), "--epochs", "2"])
    assert r["auc"] > 0.7
    assert r["history"][-1]["loss"] < r["history"][0]["loss"]


# ---- determinism, resume, baseline ------------------------------------------------------------------------
def test_same_seed_same_final_loss(data_dir):
    first = run([*small("dlrm", data_dir), "--max-steps", "6"])
    again = run([*small("dlrm", data_dir), "--max-steps", "6"])
    other = run([*small("dlrm", data_dir), "--max-steps", "6", "--seed", "1"])
    assert first["final_loss"] == again["final_loss"] and first["auc"] == again["auc"]
    assert other["final_loss"] != first["final_loss"]


@pytest.mark.parametrize("workload", ["dlrm", "kge", "gnn"])
def test_resume_ends_with_the_same_rows(workload, data_dir, tmp_path):
    flags = small(workload, data_dir)
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    uninterrupted = run([*flags, "--epochs", "2", "--path", whole])
    run([*flags, "--epochs", "1", "--path", parts])
    resumed = run([*flags, "--epochs", "2", "--path", parts, "--resume"])
    assert resumed["final_loss"] == uninterrupted["final_loss"]
    assert snapshot(parts) == snapshot(whole)


def test_resume_mid_epoch_after_an_interruption(tmp_path, monkeypatch):
    """A loader that fails at step 5 (as Ctrl-C would between steps): the run checkpoints what it finished
    and --resume completes it with the rows of an uninterrupted run."""
    flags = [*small("kge", ""), "--batch-size", "128", "--epochs", "2", "--checkpoint-every", "3"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    uninterrupted = run([*flags, "--path", whole])

    from mlkv.workloads import kge

    real = kge.KGEWorkload.batches

    def failing(self, epoch):
        for i, b in enumerate(real(self, epoch)):
            if epoch == 1 and i == 5:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(kge.KGEWorkload, "batches", failing)
    with pytest.raises(KeyboardInterrupt):
        run([*flags, "--path", parts])
    monkeypatch.setattr(kge.KGEWorkload, "batches", real)
    with mlkv.open(parts, readonly=True) as store:
        loop = store.last_checkpoint()[1]["loop"]
    assert (loop["epoch"], loop["step"]) == (1, 5)
    resumed = run([*flags, "--path", parts, "--resume"])
    assert resumed["final_loss"] == uninterrupted["final_loss"]
    assert snapshot(parts) == snapshot(whole)


def test_resume_needs_a_training_checkpoint_of_the_same_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no mlkv store"):
        run([*small("kge", ""), "--path", str(tmp_path / "none"), "--resume"])
    mlkv.open(tmp_path / "empty").close()
    with pytest.raises(mlkv.MlkvError, match="nothing to resume"):
        run([*small("kge", ""), "--path", str(tmp_path / "empty"), "--resume"])
    run([*small("kge", ""), "--epochs", "1", "--path", str(tmp_path / "s")])
    with pytest.raises(mlkv.MlkvError, match="cannot resume"):
        run([*small("kge", ""), "--model", "distmult", "--path", str(tmp_path / "s"), "--resume"])


@pytest.mark.parametrize("workload", ["dlrm", "kge", "gnn"])
def test_in_memory_baseline_agrees_with_mlkv(workload, data_dir):
    """Same model, same initial rows, same Adagrad rule: at staleness 0 mlkv computes what PyTorch does,
    up to float summation order."""
    flags = [*small(workload, data_dir), "--epochs", "1"]
    ours, base = run(flags), run(flags, backend="torch")
    metric = {"dlrm": "auc", "kge": "mrr", "gnn": "auc"}[workload]
    assert ours[metric] == pytest.approx(base[metric], abs=0.01)
    assert ours["final_loss"] == pytest.approx(base["final_loss"], rel=0.01)
    assert base["backend"] == "torch" and "hit_rate" not in base


def test_rocksdb_naive_baseline_trains_the_same_model(data_dir):
    """Rows glued to RocksDB by hand (multi_get before, WriteBatch after): the same initial rows and
    Adagrad rule as mlkv, so the same model up to float summation order; its database is removed after."""
    flags = [*small("dlrm", data_dir), "--epochs", "1"]
    ours, naive = run(flags), run(flags, backend="rocksdb-naive")
    assert naive["auc"] == pytest.approx(ours["auc"], abs=0.01)
    assert naive["final_loss"] == pytest.approx(ours["final_loss"], rel=0.01)
    assert naive["backend"] == "rocksdb-naive" and "hit_rate" not in naive


def test_rocksdb_baseline_is_refused_for_workloads_without_pooled_lookups():
    with pytest.raises(ValueError, match="--rocksdb-baseline is offered for the dlrm workload"):
        cmd_train(PARSER.parse_args(["train", "kge", "--rocksdb-baseline"]))


def test_overwrite_on_an_old_store_starts_over(tmp_path):
    path = str(tmp_path / "s")
    first = run([*small("kge", ""), "--epochs", "1", "--path", path])
    second = run([*small("kge", ""), "--epochs", "1", "--path", path, "--overwrite"])
    assert second["final_loss"] == first["final_loss"]


# ---- the command ------------------------------------------------------------------------------------------
def test_json_is_the_last_line_of_stdout(capsys, data_dir):
    flags = ["--max-steps", "4", "--json", "--baseline", "--rocksdb-baseline"]
    args = PARSER.parse_args(["train", *small("dlrm", data_dir), *flags])
    assert cmd_train(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    for key in ("final_loss", "samples_per_s", "auc", "logloss", "hit_rate", "stall_seconds"):
        assert isinstance(report[key], float), key
    assert set(report["baseline"]) >= {"final_loss", "samples_per_s", "auc", "logloss"}
    assert set(report["rocksdb_naive"]) >= {"final_loss", "samples_per_s", "auc", "logloss"}


def test_bad_flags_are_clear_errors():
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        cmd_train(PARSER.parse_args(["train", "kge", "--epochs", "0"]))
    with pytest.raises(ValueError, match="--dataset criteo needs --data"):
        cmd_train(PARSER.parse_args(["train", "dlrm", "--dataset", "criteo"]))
    with pytest.raises(ValueError, match="one number per layer"):
        cmd_train(PARSER.parse_args(["train", "gnn", "--layers", "1"]))
    with pytest.raises(FileNotFoundError, match="no such Criteo file"):
        cmd_train(PARSER.parse_args(["train", "dlrm", "--data", "/nonexistent/train.txt"]))


# ---- the Python API, per-step logs, plots -----------------------------------------------------------------
KGE_SMALL = {"dataset": "nations", "dim": 32, "negatives": 32, "batch_size": 256, "progress": False}


def test_run_returns_what_json_prints(capsys):
    import mlkv.workloads

    report = mlkv.workloads.run("kge", epochs=1, max_steps=3, **KGE_SMALL)
    argv = ["train", *small("kge", ""), "--epochs", "1", "--max-steps", "3", "--no-progress", "--json"]
    assert cmd_train(PARSER.parse_args(argv)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == set(printed)
    for key in ("final_loss", "mrr", "hits@10", "steps", "samples", "table_bytes", "cache_bytes"):
        assert report[key] == printed[key], key  # same seed, same numbers


def test_run_rejects_unknown_options_and_values_listing_the_valid_ones():
    import mlkv.workloads
    from mlkv.errors import InvalidArgumentError

    with pytest.raises(
        InvalidArgumentError, match=r"unknown option\(s\) epoch, lr_dense .*valid options: .*epochs"
    ):
        mlkv.workloads.run("kge", epoch=5, lr_dense=0.1)
    with pytest.raises(InvalidArgumentError, match=r"dataset='fb15k' .*expected one of 'nations'"):
        mlkv.workloads.run("kge", dataset="fb15k")
    with pytest.raises(InvalidArgumentError, match="unknown workload 'bert'; workloads: dlrm, kge, gnn"):
        mlkv.workloads.run("bert")
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        mlkv.workloads.run("kge", epochs=0)


def test_kge_and_gnn_defaults_keep_the_tables_bigger_than_the_memory_tier():
    kge = run([*small("kge", ""), "--epochs", "1", "--max-steps", "2"])
    gnn = run([*small("gnn", ""), "--epochs", "1", "--max-steps", "1"])
    for r in (kge, gnn):
        assert r["cache_bytes"] < r["table_bytes"], r["workload"]  # the disk path is exercised
        assert r["hit_rate"] < 1.0


def test_log_dir_writes_one_json_line_per_step_and_epoch(tmp_path):
    log_dir = tmp_path / "logs"
    r = run([*small("kge", ""), "--epochs", "2", "--max-steps", "3", "--log-dir", str(log_dir)])
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in records if x["kind"] == "step"]
    epochs = [x for x in records if x["kind"] == "epoch"]
    assert [x["step"] for x in steps] == list(range(1, 7))
    assert [x["epoch"] for x in steps] == [1, 1, 1, 2, 2, 2]
    for x in steps:
        assert x["samples"] == 256 and x["samples_per_s"] > 0 and np.isfinite(x["loss"])
        assert 0.0 <= x["hit_rate"] <= 1.0 and 0.0 <= x["stall_fraction"] <= 1.0
        assert x["staleness_waits"] == 0 and x["stall_seconds"] >= 0
    assert np.mean([x["loss"] for x in steps]) == pytest.approx(r["final_loss"])  # the last <= 10 steps
    assert [(x["epoch"], x["step"]) for x in epochs] == [(1, 3), (2, 6)]
    assert [x["mrr"] for x in epochs] == [h["mrr"] for h in r["history"]]


def test_log_dir_has_tensorboard_scalars_when_tensorboard_is_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional and not installed here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run([*small("kge", ""), "--epochs", "1", "--max-steps", "3", "--log-dir", str(tmp_path)])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"train/loss", "train/hit_rate", "eval/mrr"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 3


def test_plot_draws_a_png_and_bad_targets_fail_before_training(tmp_path):
    pytest.importorskip("matplotlib")
    from mlkv.errors import PathNotFoundError

    out = tmp_path / "train.png"
    run([*small("kge", ""), "--epochs", "2", "--max-steps", "2", "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(PathNotFoundError, match=r"directory .*missing does not exist"):
        cmd_train(PARSER.parse_args(["train", "kge", "--plot", str(tmp_path / "missing" / "p.png")]))


def test_cli_errors_name_the_flags():
    from mlkv.errors import MlkvError

    cases = [
        (["--resume", "--path", "/nonexistent/store"], "--resume: no mlkv store at /nonexistent/store"),
        (["--cache-bytes", "lots"], "--cache-bytes must look like"),
        (["--cache-bytes", "0%"], r"--cache-bytes 0%: a share must be in"),
        (["--path", "/etc/hostname"], "--path /etc/hostname exists and is not a directory"),
    ]
    for flags, message in cases:
        with pytest.raises(MlkvError, match=message):
            cmd_train(PARSER.parse_args(["train", "kge", *flags]))


@pytest.mark.parametrize("dtype, engine", [("float32", "slab"), ("bfloat16", "memory")])
def test_kernel_warm_up_runs_on_a_throw_away_store_and_leaves_nothing(dtype, engine):
    from mlkv.workloads.warmup import compile_kernels

    pattern = os.path.join(tempfile.gettempdir(), "mlkv-warmup-*")
    before = set(glob.glob(pattern))
    assert compile_kernels(dtype, engine) > 0
    assert set(glob.glob(pattern)) == before

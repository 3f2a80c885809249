"""The training workloads end to end at tiny scale: they learn, they are deterministic, a resumed run ends
with the same rows as an uninterrupted one, the in-memory PyTorch baseline agrees, and `mlkv train`'s
--json output is one JSON object on the last line of stdout."""

from __future__ import annotations

import argparse
import io
import json

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


def test_overwrite_on_an_old_store_starts_over(tmp_path):
    path = str(tmp_path / "s")
    first = run([*small("kge", ""), "--epochs", "1", "--path", path])
    second = run([*small("kge", ""), "--epochs", "1", "--path", path, "--overwrite"])
    assert second["final_loss"] == first["final_loss"]


# ---- the command ------------------------------------------------------------------------------------------
def test_json_is_the_last_line_of_stdout(capsys, data_dir):
    args = PARSER.parse_args(["train", *small("dlrm", data_dir), "--max-steps", "4", "--json", "--baseline"])
    assert cmd_train(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    for key in ("final_loss", "samples_per_s", "auc", "logloss", "hit_rate", "stall_seconds"):
        assert isinstance(report[key], float), key
    assert set(report["baseline"]) >= {"final_loss", "samples_per_s", "auc", "logloss"}


def test_bad_flags_are_clear_errors():
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        cmd_train(PARSER.parse_args(["train", "kge", "--epochs", "0"]))
    with pytest.raises(ValueError, match="--dataset criteo needs --data"):
        cmd_train(PARSER.parse_args(["train", "dlrm", "--dataset", "criteo"]))
    with pytest.raises(ValueError, match="one number per layer"):
        cmd_train(PARSER.parse_args(["train", "gnn", "--layers", "1"]))
    with pytest.raises(FileNotFoundError, match="no such Criteo file"):
        cmd_train(PARSER.parse_args(["train", "dlrm", "--data", "/nonexistent/train.txt"]))

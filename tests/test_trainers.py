"""Concurrent trainers (issue 10): `mlkv train ... --trainers N` and TrainConfig(trainers=N).

N threads over one store on disjoint batches; dense layers shared (one master, one optimizer step per
batch). What must hold: every batch trained exactly once, the dense optimizer stepped once per batch, the
staleness bound respected (the lag histogram never passes s), checkpoints a consistent cut that --resume
continues from, no deadlock at s=0, no thread left behind.
"""

from __future__ import annotations

import argparse
import io
import threading

import pytest
import torch

import mlkv
from mlkv.workloads import runner
from mlkv.workloads.cli import add_train_parsers, config_from_args, make_workload


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlkv")
    add_train_parsers(p.add_subparsers(dest="command"))
    return p


PARSER = _parser()
KGE = ["kge", "--dataset", "nations", "--dim", "16", "--negatives", "16", "--batch-size", "64"]


def train(argv: list[str]) -> tuple[dict, object]:
    args = PARSER.parse_args(["train", *argv, "--no-progress"])
    workload = make_workload(args)
    return runner.train(workload, config_from_args(args, log=io.StringIO())), workload


def trainer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("mlkv-trainer", "mlkv-applier"))]


@pytest.mark.parametrize("bound", [0, 1, 4])
def test_two_trainers_train_every_batch_once_within_the_bound(tmp_path, bound):
    single, _ = train(
        [*KGE, "--epochs", "2", "--path", str(tmp_path / "one"), "--staleness-bound", str(bound)]
    )
    report, _ = train(
        [
            *KGE,
            "--epochs",
            "2",
            "--path",
            str(tmp_path / "two"),
            "--staleness-bound",
            str(bound),
            "--trainers",
            "2",
        ]
    )
    assert report["trainers"] == 2
    assert report["steps"] == single["steps"] and report["samples"] == single["samples"]
    assert report["final_loss"] < 10 and report["mrr"] > 0.3  # it learns (nations: 14 entities)
    hist = report["staleness_lag_hist"]
    assert sum(hist[bound + 1 :]) == 0, f"a read passed the bound {bound}: {hist}"
    if bound:
        assert report["async_updates"] == report["steps"] * 2  # two tables, each step asynchronous
    assert not trainer_threads()


def test_two_trainers_share_dense_layers_one_step_per_batch(tmp_path, monkeypatch):
    names = []
    real_step = torch.optim.Adam.step

    def counting_step(self, *a, **kw):
        names.append(threading.current_thread().name)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    dlrm = [
        "dlrm",
        "--samples",
        "8192",
        "--test-samples",
        "2048",
        "--scale",
        "0.001",
        "--batch-size",
        "512",
        "--data-dir",
        str(tmp_path / "data"),
        "--cache-bytes",
        "128KiB",
    ]
    report, _ = train([*dlrm, "--path", str(tmp_path / "s"), "--staleness-bound", "2", "--trainers", "2"])
    assert report["steps"] == 16
    assert len(names) == 16  # one dense step per batch, by the trainer that trained it
    assert set(names) == {"mlkv-trainer-0", "mlkv-trainer-1"}
    assert report["auc"] > 0.55
    assert not trainer_threads()


def test_trainers_checkpoint_is_a_cut_that_resume_continues(tmp_path):
    path = str(tmp_path / "s")
    first, _ = train(
        [
            *KGE,
            "--epochs",
            "1",
            "--path",
            path,
            "--staleness-bound",
            "2",
            "--trainers",
            "2",
            "--checkpoint-every",
            "3",
        ]
    )
    with mlkv.open(path, readonly=True, create=False) as store:
        _, meta = store.last_checkpoint()
        assert meta["loop"]["epoch"] == 1 and meta["loop"]["global_step"] == first["steps"]
    resumed, _ = train(
        [*KGE, "--epochs", "2", "--path", path, "--staleness-bound", "2", "--trainers", "2", "--resume"]
    )
    assert resumed["steps"] == 2 * first["steps"] and resumed["epochs"] == 2


def test_trainer_error_stops_all_trainers_and_is_raised(tmp_path, monkeypatch):
    from mlkv.workloads import kge

    real = kge.KGEWorkload.loss
    calls = [0]
    lock = threading.Lock()

    def failing(self, model, batch):
        with lock:
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("injected trainer failure")
        return real(self, model, batch)

    monkeypatch.setattr(kge.KGEWorkload, "loss", failing)
    with pytest.raises(RuntimeError, match="injected trainer failure"):
        train(
            [
                *KGE,
                "--epochs",
                "3",
                "--path",
                str(tmp_path / "s"),
                "--staleness-bound",
                "1",
                "--trainers",
                "2",
            ]
        )
    assert not trainer_threads()


def test_trainers_flag_must_be_positive(capsys):
    from mlkv.cli import main

    assert main(["train", "kge", "--trainers", "0"]) == 2
    assert "--trainers must be >= 1" in capsys.readouterr().err

"""`mlkv bench churn`: table size and accuracy on an id stream that never stops growing.

The stream: each step draws a batch of samples, each naming `bag` hashed 64-bit ids. Ids are born and die:
the active id population shifts by `--churn` of its size per `--period` steps (new ids with fresh hidden
weights replace the oldest), popularity within the active ids is Zipf(`--zipf`), and a fraction of every
bag is one-off noise ids that never come back (typos, bots: the ids admission is for). The label of a
sample is Bernoulli(sigmoid(sum of its active ids' hidden weights)); noise ids weigh nothing.

Each configuration trains the same model (EmbeddingBag(sum) over an mlkv table + a bias, Adagrad) on the
same stream in one run, prequentially: every batch is first scored (progressive AUC / logloss over the
last `--window` steps), then trained on. Reported per configuration: rows stored at the end and their
peak, AUC and logloss, admitted/rejected/expired/evicted counts. Configurations: `plain` (no admission,
no expiry: the table grows with every id ever seen), `admit2`, `ttl` (ttl_steps=`--ttl`), `cap`
(max_rows=`--cap`) and `admit2+ttl`; expiry runs every `--expire-every` steps (what a checkpoint would do).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIGS = {
    "plain": {},
    "admit2": {"admit_after": 2},
    "ttl": {"ttl": True},
    "cap": {"cap": True},
    "admit2+ttl": {"admit_after": 2, "ttl": True},
}


@dataclass
class Stream:
    steps: int = 600
    batch: int = 512
    bag: int = 4
    active: int = 20_000
    churn: float = 0.05
    period: int = 10
    zipf: float = 1.1
    noise: float = 0.25
    seed: int = 0

    def batches(self):
        """(keys (batch, bag) uint64, labels (batch,)) per step; deterministic in the seed."""
        rng = np.random.default_rng(self.seed)
        born = 0  # ids are born in order: id i has hidden weight w(i)
        first = 0  # the oldest active id
        ranks = np.arange(1, self.active + 1, dtype=np.float64) ** -self.zipf
        popularity = ranks / ranks.sum()
        for step in range(self.steps):
            if step and step % self.period == 0:
                first += int(self.active * self.churn)
            born = max(born, first + self.active)
            slot = rng.choice(self.active, size=(self.batch, self.bag), p=popularity)
            ids = first + (slot * 7919) % self.active  # popularity spread over the active range
            weights = _hidden_weight(ids)
            noisy = rng.random((self.batch, self.bag)) < self.noise
            ids = np.where(noisy, (1 << 40) + rng.integers(0, 1 << 40, size=ids.shape), ids)
            weights = np.where(noisy, 0.0, weights)
            p = 1 / (1 + np.exp(-weights.sum(axis=1)))
            labels = (rng.random(self.batch) < p).astype(np.float32)
            yield _hash(ids.astype(np.uint64)), labels


def _hidden_weight(ids: np.ndarray) -> np.ndarray:
    return np.sin(ids * 0.7071) * 1.5


def _hash(ids: np.ndarray) -> np.ndarray:
    from ..engine.key_index import hash64

    return hash64(ids)


def run_config(name: str, stream: Stream, args) -> dict[str, Any]:
    import torch

    import mlkv
    import mlkv.torch

    from ..workloads.metrics import log_loss, roc_auc

    opts = CONFIGS[name]
    kw: dict[str, Any] = {}
    if "admit_after" in opts:
        kw["admit_after"] = opts["admit_after"]
    if opts.get("ttl"):
        kw["ttl_steps"] = args.ttl
    if opts.get("cap"):
        kw["max_rows"] = args.cap
    torch.manual_seed(stream.seed)
    path = tempfile.mkdtemp(prefix="mlkv-churn-")
    try:
        with mlkv.open(path, cache_bytes=args.cache_bytes) as store:
            table = store.table("ids", dim=args.dim, optimizer=mlkv.optim.Adagrad(lr=0.1),
                                init=mlkv.init.Normal(0.0, 0.01), **kw)  # fmt: skip
            emb = mlkv.torch.EmbeddingBag(table, mode="sum")
            head = torch.nn.Linear(args.dim, 1)
            sparse = mlkv.torch.SparseOptimizer([emb])
            dense = torch.optim.Adagrad(head.parameters(), lr=0.1)
            labels_w: list[np.ndarray] = []
            scores_w: list[np.ndarray] = []
            sizes = []
            for step, (keys, labels) in enumerate(stream.batches()):
                logits = head(emb(torch.from_numpy(keys.astype(np.int64)))).squeeze(1)
                y = torch.from_numpy(labels)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                labels_w.append(labels)
                scores_w.append(torch.sigmoid(logits).detach().numpy())
                labels_w, scores_w = labels_w[-args.window :], scores_w[-args.window :]
                sparse.zero_grad()
                dense.zero_grad()
                loss.backward()
                dense.step()
                sparse.step()
                if (step + 1) % args.expire_every == 0:
                    table.expire()
                sizes.append(len(table))
            lab, sc = np.concatenate(labels_w), np.concatenate(scores_w)
            stats = store.stats()
            return {
                "config": name,
                "options": kw,
                "rows_end": len(table),
                "rows_peak": max(sizes),
                "disk_bytes": store.disk_bytes(),
                "auc": roc_auc(lab, sc),
                "logloss": log_loss(lab, np.clip(sc, 1e-7, 1 - 1e-7)),
                "sizes": sizes[:: max(len(sizes) // 100, 1)],
                **{
                    k: stats[k]
                    for k in (
                        "rows_admitted",
                        "rows_rejected",
                        "grads_dropped",
                        "rows_expired",
                        "rows_evicted_by_cap",
                    )
                },
            }
    finally:
        shutil.rmtree(path, ignore_errors=True)


def format_report(report: dict) -> str:
    cols = ("config", "rows end", "rows peak", "AUC", "logloss", "rejected", "expired", "capped")
    widths = (12, 9, 10, 7, 8, 9, 8, 7)
    head = " ".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cols, widths, strict=True))
    )
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        lines.append(
            f"{r['config']:<12} {r['rows_end']:>9,} {r['rows_peak']:>10,} {r['auc']:>7.4f} "
            f"{r['logloss']:>8.4f} {r['rows_rejected']:>9,} {r['rows_expired']:>8,} "
            f"{r['rows_evicted_by_cap']:>7,}"
        )
    return "\n".join(lines)


def plot(report: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for r in report["rows"]:
        step = max(report["stream"]["steps"] // len(r["sizes"]), 1)
        a.plot(np.arange(len(r["sizes"])) * step, r["sizes"], label=r["config"])
    a.set_xlabel("step")
    a.set_ylabel("rows stored")
    a.set_title("table size on a churning id stream")
    a.legend()
    names = [r["config"] for r in report["rows"]]
    b.bar(names, [r["auc"] for r in report["rows"]])
    lo = min(r["auc"] for r in report["rows"])
    b.set_ylim(max(lo - 0.02, 0.5), None)
    b.set_title("progressive AUC (last window)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Stream()
    p.add_argument("--steps", type=int, default=d.steps, help=f"batches (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"samples per batch (default {d.batch})")
    p.add_argument("--active", type=int, default=d.active, help=f"live ids at a time (default {d.active})")
    p.add_argument("--churn", type=float, default=d.churn, help="share of live ids replaced per period")
    p.add_argument("--period", type=int, default=d.period, help=f"steps per churn period ({d.period})")
    p.add_argument("--noise", type=float, default=d.noise, help=f"share of one-off ids ({d.noise})")
    p.add_argument("--ttl", type=int, default=100, help="ttl_steps of the ttl configurations (100)")
    p.add_argument("--cap", type=int, default=15_000, help="max_rows of the cap configuration (15,000)")
    p.add_argument("--expire-every", type=int, default=50, help="steps between expire() calls (50)")
    p.add_argument("--dim", type=int, default=8, help="embedding dim (8)")
    p.add_argument("--window", type=int, default=100, help="steps in the progressive AUC window (100)")
    p.add_argument("--cache-bytes", default="4MiB", help="memory tier (4MiB)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="table size over steps and AUC per configuration")
    p.add_argument("--json", action="store_true", help="also print the report as JSON (last stdout line)")


def main(args) -> int:
    from ..errors import InvalidArgumentError

    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise InvalidArgumentError(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    stream = Stream(steps=args.steps, batch=args.batch, active=args.active, churn=args.churn,
                    period=args.period, noise=args.noise, seed=args.seed)  # fmt: skip
    rows = []
    for name in names:
        rows.append(run_config(name, stream, args))
        print(
            f"{name}: {rows[-1]['rows_end']:,} rows, AUC {rows[-1]['auc']:.4f}", file=sys.stderr, flush=True
        )
    report = {"stream": stream.__dict__, "rows": rows}
    print(format_report(report))
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report))
    return 0

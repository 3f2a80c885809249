"""Synthetic Criteo: files in the real Criteo format whose labels come from a hidden model.

Categorical column c has cardinality n_c = its Criteo Kaggle cardinality times `scale` (at least
MIN_CARDINALITY, never more than the real one). Its ids are Zipf(`zipf`)-distributed ranks in [0, n_c),
mapped to distinct 32-bit hashes by a bijection, so they look like Criteo's hex hashes and stay distinct.

Hidden model: every id has a weight w and a vector u (HIDDEN_DIM) drawn deterministically from
(seed, column, id), and each dense column a coefficient g; the click probability is
sigmoid(bias + sum_c w + sum_{c<c'} <u_c, u_c'> + sum_j g_j log(1 + I_j)), with the bias set so that about
a quarter of the labels are 1 (Kaggle: 25.6%). A model that learns the per-id embeddings and their pairwise
dot products (DLRM) can approach `bayes_auc`, the AUC of the true probabilities, recorded with each file.
Frequent ids are learned well and the long Zipf tail poorly, as on the real data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InvalidArgumentError
from ..init import Normal
from .criteo import (
    DENSE_MISSING,
    KAGGLE_CARDINALITIES,
    MISSING_KEY,
    N_CAT,
    N_DENSE,
    CriteoBatch,
    format_lines,
)
from .metrics import log_loss, roc_auc

MIN_CARDINALITY = 3
HIDDEN_DIM = 4
TARGET_CTR = 0.256
CHUNK = 1 << 16
FORMAT_VERSION = 1
#: Roughly the fraction of empty fields per column in the Kaggle training set.
DENSE_MISSING_RATE = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.77, 0.22)
CAT_MISSING_RATE = (
    0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0,
    0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44,
)  # fmt: skip
_M32 = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class SynthSpec:
    """What determines a synthetic Criteo dataset (the same spec always gives the same bytes)."""

    scale: float = 0.01
    zipf: float = 1.05
    seed: int = 0
    weight_std: float = 0.3
    pair_std: float = 0.15
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise InvalidArgumentError(f"scale must be in (0, 1], got {self.scale}")
        if self.zipf <= 0:
            raise InvalidArgumentError(f"zipf exponent must be > 0, got {self.zipf}")

    def cardinalities(self) -> list[int]:
        return [min(c, max(MIN_CARDINALITY, round(c * self.scale))) for c in KAGGLE_CARDINALITIES]


def zipf_ranks(rng: np.random.Generator, n: int, a: float, size: int) -> np.ndarray:
    """Ranks in [0, n) with P(r) ~ (r + 1)**-a: inverse CDF of the continuous power law on [1, n + 1)."""
    u = rng.random(size)
    if abs(a - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1))
    else:
        x = (((n + 1) ** (1 - a) - 1) * u + 1) ** (1 / (1 - a))
    return np.minimum(x.astype(np.int64) - 1, n - 1)


def rank_to_id(ranks: np.ndarray, column: int, seed: int) -> np.ndarray:
    """A bijection of [0, 2**32) per (column, seed), so distinct ranks get distinct hash-like ids."""
    h = ranks.astype(np.uint64)
    h = (h * np.uint64(0x9E3779B1) + np.uint64((seed * 131 + column * 0x632BE5AB) & 0xFFFFFFFF)) & _M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    h ^= h >> np.uint64(16)
    return h.astype(np.int64)


class HiddenModel:
    """The click model behind the labels; `logits` is a pure function of the features and the spec."""

    def __init__(self, spec: SynthSpec):
        self.spec = spec
        self._draw = Normal(0.0, 1.0, seed=spec.seed)
        self.dense_coef = self._draw(np.arange(N_DENSE), 1, salt=0)[:, 0] * 0.15
        self.bias = 0.0
        pilot = draw_features(spec, np.random.default_rng([spec.seed, 99]), 20000)
        self.bias = _bias_for_ctr(self.logits(pilot), TARGET_CTR)

    def draw_labels(self, batch: CriteoBatch, rng: np.random.Generator) -> np.ndarray:
        """Set `batch.labels` by drawing from the click probabilities, and return those probabilities."""
        p = 1 / (1 + np.exp(-self.logits(batch)))
        batch.labels = (rng.random(len(batch)) < p).astype(np.float32)
        return p

    def logits(self, batch: CriteoBatch) -> np.ndarray:
        n = len(batch)
        total = np.full(n, self.bias)
        u_sum = np.zeros((n, HIDDEN_DIM))
        u_sq = np.zeros(n)
        for c in range(N_CAT):
            ids = batch.cats[:, c]
            h = self._draw(ids, 1 + HIDDEN_DIM, salt=1 + c).astype(np.float64)
            h[ids == MISSING_KEY] = 0.0
            total += self.spec.weight_std * h[:, 0]
            u = self.spec.pair_std * h[:, 1:]
            u_sum += u
            u_sq += (u * u).sum(axis=1)
        total += 0.5 * ((u_sum * u_sum).sum(axis=1) - u_sq)
        total += np.log1p(np.maximum(batch.dense, 0)) @ self.dense_coef
        return total


def _bias_for_ctr(logits: np.ndarray, ctr: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logits + mid)))) < ctr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def draw_features(spec: SynthSpec, rng: np.random.Generator, n: int) -> CriteoBatch:
    """`n` samples' features (labels left 0; see HiddenModel.draw_labels)."""
    cats = np.empty((n, N_CAT), dtype=np.int64)
    for c, card in enumerate(spec.cardinalities()):
        cats[:, c] = rank_to_id(zipf_ranks(rng, card, spec.zipf, n), c, spec.seed)
        cats[rng.random(n) < CAT_MISSING_RATE[c], c] = MISSING_KEY
    scales = np.linspace(0.5, 3.0, N_DENSE)  # some columns hold small counts, some large ones
    dense = np.floor(np.expm1(np.abs(rng.normal(0.0, scales, (n, N_DENSE))) * 1.5)).astype(np.int64)
    dense[:, 1] -= (rng.random(n) < 0.1) * rng.integers(1, 4, n)  # I2 has small negative values, like Kaggle
    dense[rng.random((n, N_DENSE)) < np.array(DENSE_MISSING_RATE)] = DENSE_MISSING
    return CriteoBatch(np.zeros(n, dtype=np.float32), dense, cats)


def write_file(
    path: str, n_samples: int, spec: SynthSpec, part: int, progress: Callable[[int], None] | None = None
) -> dict:
    """Write `n_samples` lines to `path` (atomically); `part` numbers independent streams (train, test)."""
    model = HiddenModel(spec)
    labels, probs = [], []
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for i, start in enumerate(range(0, n_samples, CHUNK)):
            rng = np.random.default_rng([spec.seed, part, i])
            batch = draw_features(spec, rng, min(CHUNK, n_samples - start))
            probs.append(model.draw_labels(batch, rng))
            labels.append(batch.labels)
            f.write(format_lines(batch))
            if progress:
                progress(len(batch))
    os.replace(tmp, path)
    y, p = np.concatenate(labels), np.concatenate(probs)
    return {
        "samples": n_samples,
        "ctr": float(y.mean()),
        "bayes_auc": roc_auc(y, p),
        "bayes_logloss": log_loss(y, p),
    }


def ensure_dataset(
    data_dir: str, n_train: int, n_test: int, spec: SynthSpec, progress: Callable[[int], None] | None = None
) -> tuple[str, str, dict]:
    """Paths of a synthetic train and test file for `spec`, generating them on first use; and their facts."""
    os.makedirs(data_dir, exist_ok=True)
    stem = os.path.join(
        data_dir, f"criteo-synth-v{spec.version}-s{spec.scale:g}-z{spec.zipf:g}-seed{spec.seed}"
    )
    train, test, meta_path = (
        f"{stem}-{n_train}.train.txt",
        f"{stem}-{n_test}.test.txt",
        f"{stem}-{n_train}-{n_test}.json",
    )
    if os.path.exists(meta_path) and os.path.exists(train) and os.path.exists(test):
        with open(meta_path) as f:
            return train, test, json.load(f)
    meta = {
        "spec": asdict(spec),
        "cardinalities": spec.cardinalities(),
        "train": write_file(train, n_train, spec, part=0, progress=progress),
        "test": write_file(test, n_test, spec, part=1, progress=progress),
    }
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return train, test, meta


def default_data_dir() -> str:
    """Where generated files are cached: $MLKV_DATA_DIR, else ~/.cache/mlkv."""
    return os.environ.get("MLKV_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mlkv")


__all__ = [
    "HiddenModel",
    "SynthSpec",
    "default_data_dir",
    "ensure_dataset",
    "draw_features",
    "write_file",
    "zipf_ranks",
]

"""Evaluation metrics: ROC AUC and log loss for click/link prediction, filtered ranks for knowledge graphs.

All are plain numpy so the mlkv run and the in-memory PyTorch baseline are scored by the same code.
"""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(a random positive scores above a random negative), ties count 1/2."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average rank (1-based) of each group of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities `probs` (clipped to [eps, 1-eps])."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def filtered_ranks(scores: np.ndarray, targets: np.ndarray, known: list[np.ndarray]) -> np.ndarray:
    """Rank of each target among all candidates, ignoring the other known true answers ("filtered").

    scores: (n, n_candidates); targets: (n,) the index of the answer being ranked; known[i]: every
    candidate that is a true answer for query i (it may include targets[i]). Ties with the target count
    half (the mean of the optimistic and pessimistic rank), so a constant scorer gets the middle rank.
    Returns float64 ranks, 1 = best.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(targets)
    rows = np.arange(n)
    target_score = scores[rows, targets]
    masked = scores.copy()
    if n:
        lens = np.fromiter((len(k) for k in known), dtype=np.int64, count=n)
        masked[np.repeat(rows, lens), np.concatenate(known).astype(np.int64)] = -np.inf
        masked[rows, targets] = -np.inf
    higher = (masked > target_score[:, None]).sum(axis=1)
    ties = (masked == target_score[:, None]).sum(axis=1)
    return 1.0 + higher + ties / 2.0


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """MRR and Hits@1/3/10 of filtered ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"mrr": float(np.mean(1.0 / ranks))}
    for k in (1, 3, 10):
        out[f"hits@{k}"] = float(np.mean(ranks <= k))
    return out


__all__ = ["filtered_ranks", "log_loss", "ranking_metrics", "roc_auc"]

"""Knowledge graphs available offline, as integer triples (head, relation, tail) with train/valid/test splits.

- nations, kinships, umls: the standard splits shipped in the `pykeen` wheel (tab-separated name triples).
- ml100k-kg: the Freebase graph of the MovieLens-100k films shipped in the `recbole` wheel (`ml-100k.kg`);
  it has no split, so one is drawn (90/5/5, fixed seed, independent of --seed). Many of its relations come
  in inverse pairs (film.film.genre / film.film_genre.films_in_this_genre), as in FB15k.
- wordnet: WordNet 3.0 from Debian's `wordnet-base` (/usr/share/wordnet): synsets are entities, pointer
  symbols (hypernym '@', hyponym '~', antonym '!', ...) relations; split like ml100k-kg.
Entities and relations are numbered in sorted name order. Drawn splits keep in valid/test only triples whose
entities and relation occur in train (an unseen entity's row would never be trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .sources import wheel_file, wordnet_file

DATASETS = ("nations", "kinships", "umls", "ml100k-kg", "wordnet")
SPLIT_SEED = 20240
_WORDNET_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


@dataclass
class KGDataset:
    name: str
    entities: np.ndarray  # names, index = entity id
    relations: np.ndarray
    train: np.ndarray  # int64 (n, 3): head, relation, tail
    valid: np.ndarray
    test: np.ndarray
    source: str

    @property
    def n_entities(self) -> int:
        return len(self.entities)

    @property
    def n_relations(self) -> int:
        return len(self.relations)

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "valid", "test"):
            raise InvalidArgumentError(f"split must be train, valid or test, got {name!r}")
        return getattr(self, name)


def _read_tsv(path: str, skip_header: bool = False) -> np.ndarray:
    """Name triples (n, 3) of a tab-separated file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[1 if skip_header else 0 :]
    rows = [ln.split("\t") for ln in lines if ln.strip()]
    bad = next((i for i, r in enumerate(rows) if len(r) != 3), None)
    if bad is not None:
        raise InvalidArgumentError(
            f"{path}: line {bad + 1 + skip_header} has {len(rows[bad])} fields, expected 3"
        )
    return np.array(rows, dtype=str).reshape(-1, 3)


def _index(name: str, splits: dict[str, np.ndarray], source: str) -> KGDataset:
    """Number the names of all splits (sorted order) and return the integer dataset."""
    allnames = np.concatenate(list(splits.values()))
    entities = np.unique(np.concatenate([allnames[:, 0], allnames[:, 2]]))
    relations = np.unique(allnames[:, 1])

    def ids(t: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                np.searchsorted(entities, t[:, 0]),
                np.searchsorted(relations, t[:, 1]),
                np.searchsorted(entities, t[:, 2]),
            ],
            axis=1,
        ).astype(np.int64)

    return KGDataset(name, entities, relations, *(ids(splits[s]) for s in ("train", "valid", "test")), source)


def _draw_split(name: str, triples: np.ndarray, source: str) -> KGDataset:
    """90/5/5 split of name triples (duplicates dropped); valid/test keep only what train has seen."""
    triples = np.unique(triples, axis=0)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(triples))
    n_eval = len(triples) // 20
    test, valid, train = (
        triples[order[:n_eval]],
        triples[order[n_eval : 2 * n_eval]],
        triples[order[2 * n_eval :]],
    )
    seen_e = np.unique(np.concatenate([train[:, 0], train[:, 2]]))
    seen_r = np.unique(train[:, 1])

    def known(t: np.ndarray) -> np.ndarray:
        ok = np.isin(t[:, 0], seen_e) & np.isin(t[:, 2], seen_e) & np.isin(t[:, 1], seen_r)
        return t[ok]

    return _index(name, {"train": train, "valid": known(valid), "test": known(test)}, source)


def _pykeen(name: str) -> KGDataset:
    paths = {s: wheel_file("pykeen", f"pykeen/datasets/{name}/{s}.txt") for s in ("train", "valid", "test")}
    return _index(name, {s: _read_tsv(p) for s, p in paths.items()}, paths["train"])


def _ml100k_kg() -> KGDataset:
    path = wheel_file("recbole", "recbole/dataset_example/ml-100k/ml-100k.kg")
    return _draw_split("ml100k-kg", _read_tsv(path, skip_header=True), path)


def _wordnet_triples(path: str, pos: str) -> list[tuple[str, str, str]]:
    """(synset, pointer symbol, synset) of one data.<pos> file; adjective satellites ('s') count as 'a'."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the license header
                continue
            fields = line.split(" | ", 1)[0].split()
            n_words = int(fields[3], 16)
            at = 4 + 2 * n_words
            n_ptr = int(fields[at])
            head = f"{fields[0]}{pos}"
            for k in range(n_ptr):
                symbol, offset, target_pos = fields[at + 1 + 4 * k : at + 4 + 4 * k]
                out.append((head, symbol, f"{offset}{'a' if target_pos == 's' else target_pos}"))
    return out


def _wordnet() -> KGDataset:
    triples: list[tuple[str, str, str]] = []
    for suffix, pos in _WORDNET_POS.items():
        triples += _wordnet_triples(wordnet_file(f"data.{suffix}"), pos)
    return _draw_split("wordnet", np.array(triples, dtype=str), wordnet_file("data.noun"))


def load(name: str) -> KGDataset:
    """The dataset `name` (one of DATASETS)."""
    if name in ("nations", "kinships", "umls"):
        return _pykeen(name)
    if name == "ml100k-kg":
        return _ml100k_kg()
    if name == "wordnet":
        return _wordnet()
    raise InvalidArgumentError(f"unknown knowledge graph {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "KGDataset", "load"]

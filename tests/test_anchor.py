"""KoSBERT --anchor_file: an STS (or NLI) run that keeps the starting model's embeddings of other texts, one
anchor text a training pair, by 1 - cos against the frozen starting model (model.anchor_loss)."""
import copy
import json
import os
import random

import numpy as np
import pytest
import torch

from conftest import load_method


@pytest.fixture(scope="module")
def kosbert():
    return load_method("KoSBERT")


def write_anchor_pairs(path, n=60, seed=0):
    """(query, passage) rows in data/make_ict.py's layout, Korean words the tiny tokenizer knows."""
    rng = random.Random(seed)
    words = ["고양이", "바나나", "사과", "도서관", "해변", "경기", "우산", "구름", "소설", "기차"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("anchor\tpositive\n")
        for _ in range(n):
            f.write(" ".join(rng.choices(words, k=4)) + "\t" + " ".join(rng.choices(words, k=40)) + "\n")
    return str(path)


def train(kosbert, model, data, out, *extra):
    kosbert.train.main(["--model", model, "--data_dir", data, "--output_dir", str(out), "--mode", "sts",
                        "--batch_size", "16", "--max_len", "24", "--seed", "0", "--logging_steps", "1",
                        "--sts_epochs", "3", "--lr", "3e-3", "--eval_steps", "1000", "--device", "cpu", *extra])
    return os.path.join(str(out), "best_model")


def test_anchor_loss_is_the_mean_cosine_distance(kosbert):
    g = torch.Generator().manual_seed(0)
    e, r = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    en, rn = e.numpy() / np.linalg.norm(e.numpy(), axis=1, keepdims=True), r.numpy() / np.linalg.norm(r.numpy(), axis=1,
                                                                                                      keepdims=True)
    expected = np.mean(1 - np.sum(en * rn, axis=1))
    assert kosbert.model.anchor_loss(e, r).item() == pytest.approx(expected, abs=1e-6)
    assert kosbert.model.anchor_loss(e, e).item() == pytest.approx(0, abs=1e-6)


def test_an_unmoved_model_has_no_anchor_loss_or_gradient(kosbert, tiny_bert_no_dropout):
    """At the start the model is its reference: the anchored step's loss and gradients equal the plain step's."""
    m = kosbert.model
    encoder = m.SentenceEncoder.from_pretrained(tiny_bert_no_dropout)
    plain = m.PairObjective(encoder, sts_loss="cosent")
    anchored = m.PairObjective(copy.deepcopy(encoder), sts_loss="cosent", reference=copy.deepcopy(encoder))
    assert not any(n.startswith("reference") for n in anchored.state_dict())  # not trained, not checkpointed
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, 100, (8, 6), generator=g), "attention_mask": torch.ones(8, 6, dtype=torch.long),
             "labels": torch.rand(4, generator=g)}
    anchors = {"anchor_input_ids": torch.randint(5, 100, (4, 9), generator=g),
               "anchor_attention_mask": torch.ones(4, 9, dtype=torch.long)}
    args = type("A", (), {"anchor_weight": 5.0})()
    loss_plain, _ = kosbert.train.training_step(plain.train(), "sts", batch, args, 1)
    loss_anchored, logged = kosbert.train.training_step(anchored.train(), "sts", {**batch, **anchors}, args, 1)
    assert logged["anchor_distance"].item() == pytest.approx(0, abs=1e-6)
    assert loss_anchored.item() == pytest.approx(loss_plain.item(), abs=1e-5)
    loss_plain.backward()
    loss_anchored.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), anchored.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_batch_carries_one_prefixed_anchor_text_a_pair(kosbert, tiny_bert, synthetic_data, tmp_path):
    from transformers import AutoTokenizer
    anchor = write_anchor_pairs(tmp_path / "ict.tsv")
    args = kosbert.train.parse_args(["--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "sts",
                                     "--anchor_file", anchor, "--query_prefix", "정말 ", "--passage_prefix", "함께 ",
                                     "--anchor_max_len", "20", "--max_len", "24", "--output_dir", str(tmp_path / "o")])
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    source = kosbert.train.build_source("sts", args, tok, 0, 1, lambda _: None)
    batch = source.collate([source.dataset[i] for i in range(16)])
    assert batch["anchor_input_ids"].shape[0] == 16 and batch["input_ids"].shape[0] == 32
    q, p = (tok(prefix, add_special_tokens=False)["input_ids"] for prefix in ("정말 ", "함께 "))
    starts = [row[1:1 + len(q)].tolist() for row in batch["anchor_input_ids"]]
    kinds = ["query" if s == q else "passage" if s[:len(p)] == p else "?" for s in starts]
    assert "?" not in kinds and {"query", "passage"} == set(kinds)
    lengths = batch["anchor_attention_mask"].sum(1)
    assert all(n <= 20 for n, k in zip(lengths.tolist(), kinds) if k == "passage")
    assert max(n for n, k in zip(lengths.tolist(), kinds) if k == "passage") == 20  # 40-word passages are cut
    again = kosbert.train.build_source("sts", args, tok, 0, 1, lambda _: None)  # the same texts in a new process
    assert torch.equal(again.collate([again.dataset[i] for i in range(16)])["anchor_input_ids"],
                       batch["anchor_input_ids"])


@pytest.mark.slow
def test_the_anchor_keeps_its_texts_near_the_starting_model(kosbert, tiny_bert_no_dropout, synthetic_data, tmp_path):
    """The same STS run with and without --anchor_file: the anchored model's embeddings of the anchor texts
    stay closer to the starting model's, and its log records the distance."""
    anchor = write_anchor_pairs(tmp_path / "ict.tsv")
    plain = train(kosbert, tiny_bert_no_dropout, synthetic_data, tmp_path / "plain")
    anchored = train(kosbert, tiny_bert_no_dropout, synthetic_data, tmp_path / "anchored", "--anchor_file", anchor,
                     "--anchor_weight", "20", "--anchor_max_len", "48")
    log = [json.loads(line) for line in open(tmp_path / "anchored" / "train_log.jsonl")]
    assert any("anchor_distance" in e for e in log)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert_no_dropout)
    texts = [t for line in open(anchor, encoding="utf-8").read().splitlines()[1:] for t in line.split("\t")]
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")

    def embed(folder):
        e = kosbert.model.SentenceEncoder.from_pretrained(folder).eval()
        with torch.no_grad():
            return e(enc["input_ids"], enc["attention_mask"])
    start = embed(tiny_bert_no_dropout)
    drift = {name: kosbert.model.anchor_loss(embed(folder), start).item()
             for name, folder in (("plain", plain), ("anchored", anchored))}
    assert drift["plain"] > 1e-3, drift  # the STS run did move them
    assert drift["anchored"] < 0.5 * drift["plain"], drift


def test_anchor_flags_and_files_are_checked(kosbert, tiny_bert, synthetic_data, tmp_path, capsys):
    base = ["--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "sts", "--output_dir", str(tmp_path / "o")]
    for extra, message in ((["--anchor_weight", "2"], "--anchor_weight acts on --anchor_file, which is not given"),
                           (["--anchor_max_len", "64"], "--anchor_max_len acts on --anchor_file, which is not given"),
                           (["--anchor_file", "x.tsv", "--anchor_weight", "0"], "--anchor_weight 0.0: give a weight above 0"),
                           (["--anchor_file", "x.tsv", "--anchor_weight", "-1"], "--anchor_weight -1.0: give a weight above 0")):
        with pytest.raises(SystemExit):
            kosbert.train.parse_args(base + extra)
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("anchor\tpositive\n고양이\t강아지 학교\n산 바다\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        train(kosbert, tiny_bert, synthetic_data, tmp_path / "bad", "--anchor_file", str(bad), "--max_steps", "1",
              "--anchor_max_len", "48")
    assert str(e.value) == f"error: {bad}:3: 1 tab-separated field(s), the header has 2 (anchor, positive)"
    good = write_anchor_pairs(tmp_path / "ict.tsv")
    with pytest.raises(SystemExit) as e:  # tiny_bert has 64 positions
        train(kosbert, tiny_bert, synthetic_data, tmp_path / "long", "--anchor_file", good, "--anchor_max_len", "100",
              "--max_steps", "1")
    assert str(e.value) == f"error: --anchor_max_len 100: {tiny_bert} takes at most 64 tokens; give at most that"


def test_decontamination_reads_the_anchor_file(kosbert, tiny_bert, synthetic_data, tmp_path):
    """An evaluation sentence planted in --anchor_file stops a --decontaminate fail run."""
    with open(os.path.join(synthetic_data, "KorSTS", "sts-test.tsv"), encoding="utf-8") as f:
        leak = f.read().splitlines()[2].split("\t")[5]
    anchor = tmp_path / "ict.tsv"
    anchor.write_text(f"anchor\tpositive\n{leak}\t고양이 강아지 학교 도서관\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        train(kosbert, tiny_bert, synthetic_data, tmp_path / "o", "--anchor_file", str(anchor), "--decontaminate",
              "fail", "--max_steps", "1", "--anchor_max_len", "48")
    assert "the evaluation set KorSTS test" in str(e.value)

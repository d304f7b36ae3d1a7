"""KoSimCSE readers (the origin of the readers the other folders copy): formats, quirks, errors."""
import json
import os

import numpy as np
import pytest

from conftest import readers


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


STS_HEADER = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"


def test_korsts_quoted_fields_are_read_verbatim_and_no_final_newline(kosimcse, tmp_path):
    path = write(tmp_path, "sts.tsv", STS_HEADER
                 + 'main-forums\tf\t2016\t1\t3.8\t"슈퍼맨" 셔츠를 입은 개\t"more posh 라는 말\n'
                 + "main-forums\tf\t2016\t2\t5\t개가 뛴다.\t개가 달린다.")  # no newline at the end
    rows = kosimcse.data.read_sts(path)
    assert rows == [('"슈퍼맨" 셔츠를 입은 개', '"more posh 라는 말', 3.8), ("개가 뛴다.", "개가 달린다.", 5.0)]


@pytest.mark.parametrize("body, message", [
    ("main\tf\t2016\t1\t3.8\t하나\n", ":2: expected 7 tab-separated fields"),
    ("main\tf\t2016\t1\tabc\t하나\t둘\n", ":2: score 'abc' is not a number"),
    ("main\tf\t2016\t1\t5.5\t하나\t둘\n", ":2: score '5.5' is outside 0-5"),
    ("main\tf\t2016\t1\t1\t하나\t둘\nmain\tf\t2016\t1\t-1\t하나\t둘\n", ":3: score '-1' is outside 0-5"),
])
def test_sts_errors_name_file_line_and_problem(kosimcse, tmp_path, body, message):
    path = write(tmp_path, "bad.tsv", STS_HEADER + body)
    with pytest.raises(kosimcse.data.DataError) as err:
        kosimcse.data.read_sts(path)
    assert str(err.value).startswith(path) and message in str(err.value)


def test_missing_empty_and_non_utf8_files(kosimcse, tmp_path):
    dl = readers(kosimcse)
    with pytest.raises(dl.DataError, match="file not found"):
        dl.read_sts(str(tmp_path / "nope.tsv"))
    with pytest.raises(dl.DataError, match="file is empty"):
        dl.read_sts(write(tmp_path, "empty.tsv", ""))
    path = write(tmp_path, "latin1.tsv", (STS_HEADER + "m\tf\t1\t1\t2\tcaf\xe9\tx\n").encode("latin-1"), mode="wb")
    with pytest.raises(dl.DataError, match=r"latin1.tsv:2: not valid UTF-8"):
        dl.read_sts(path)


def test_nli_labels_and_triplet_rule(kosimcse, tmp_path):
    dl = readers(kosimcse)
    path = write(tmp_path, "nli.tsv", "sentence1\tsentence2\tgold_label\n"
                 "P1\tE1\tentailment\nP1\tN1\tneutral\nP1\tC1\tcontradiction\n"
                 "P2\tE2\tentailment\nP2\tN2\tneutral\n"                          # no contradiction
                 "P3\tC3\tcontradiction\nP3\tE3a\tentailment\nP3\tE3b\tentailment\n"
                 '"P4\t"E4\tentailment\n"P4\tC4"\tcontradiction\nP5\tX\t-\n')
    rows, unlabeled = dl.read_nli(path)
    assert unlabeled == 1 and len(rows) == 10
    assert dl.nli_to_triplets(rows) == [("P1", "E1", "C1"), ("P3", "E3a", "C3"), ('"P4', '"E4', 'C4"')]
    bad = write(tmp_path, "bad.tsv", "sentence1\tsentence2\tgold_label\nP\tH\tentail\n")
    with pytest.raises(dl.DataError, match=r"bad.tsv:2: unknown NLI label 'entail'"):
        dl.read_nli(bad)


def test_klue_json_and_csv(kosimcse, tmp_path):
    dl = readers(kosimcse)
    items = [{"guid": "a", "sentence1": "하나", "sentence2": "둘", "labels": {"label": 3.7, "real-label": 3.714}}]
    path = write(tmp_path, "klue.json", json.dumps(items, ensure_ascii=False))
    assert dl.read_sts(path) == [("하나", "둘", 3.714)]
    csv_path = write(tmp_path, "klue.csv", 'sentence1,sentence2,label\n"하나, ""둘""",셋,3.5\n')
    assert dl.read_sts(csv_path) == [('하나, "둘"', "셋", 3.5)]
    nli = write(tmp_path, "nli.json", json.dumps([{"premise": "P", "hypothesis": "H", "gold_label": "neutral"}]))
    assert dl.read_nli(nli) == ([("P", "H", "neutral")], 0)


def test_tokenized_texts_truncation_and_padding(kosimcse, tiny_bert):
    from transformers import AutoTokenizer
    dl = readers(kosimcse)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["사과 바나나.", " ".join(["사과"] * 40), "바다"]
    tt = dl.TokenizedTexts(tok, texts, max_len=8)
    assert len(tt) == 3 and tt.num_truncated == 1
    for i, text in enumerate(texts):
        assert list(tt[i]) == tok(text, truncation=True, max_length=8)["input_ids"]
    batch = dl.pad_batch([tt[0], tt[1]], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [len(tt[0]), 8]
    assert (batch["input_ids"][0, len(tt[0]):] == tok.pad_token_id).all()


def test_collator_stacks_columns(kosimcse):
    dl = readers(kosimcse)
    a = [np.array([1, 2]), np.array([3]), np.array([4, 5, 6])]
    b = [np.array([7]), np.array([8, 9]), np.array([10])]
    batch = dl.ColumnCollator(pad_id=0)([tuple(a), tuple(b)])
    assert batch["input_ids"].tolist() == [[1, 2, 0], [7, 0, 0], [3, 0, 0], [8, 9, 0], [4, 5, 6], [10, 0, 0]]


def test_real_data_counts(kosimcse, shared_data):
    dl = readers(kosimcse)
    counts = {name: len(dl.read_sts(dl.resolve_path(name, shared_data)))
              for name in ("korsts-train", "korsts-dev", "korsts-test", "klue-sts-dev", "klue-sts-train")}
    assert counts == {"korsts-train": 5749, "korsts-dev": 1500, "korsts-test": 1379,
                      "klue-sts-dev": 519, "klue-sts-train": 11668}
    # Rows with raw quotes keep them: 128 dev rows contain '"'.
    dev = dl.read_sts(dl.resolve_path("korsts-dev", shared_data))
    assert sum('"' in a or '"' in b for a, b, _ in dev) == 128
    json_dev = dl.read_sts(os.path.join(shared_data, "KLUE-STS", "klue-sts-v1.1_dev.json"))
    csv_val = dl.read_sts(os.path.join(shared_data, "KLUE-STS", "klue_sts_val.csv"))
    assert [r[:2] for r in json_dev] == [r[:2] for r in csv_val]
    assert np.allclose([r[2] for r in json_dev], [r[2] for r in csv_val], atol=1e-9)
    triplets = [dl.nli_to_triplets(dl.read_nli(os.path.join(shared_data, f))[0])
                for f in ("KorNLI/xnli.dev.ko.tsv", "KorNLI/xnli.test.ko.tsv", "KLUE-NLI/klue-nli-v1.1_dev.json")]
    assert [len(t) for t in triplets] == [830, 1670, 1000]

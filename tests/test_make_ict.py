"""data/make_ict.py: Inverse Cloze Task pairs from a corpus in document order."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "data", "make_ict.py")
TOPICS = ["고양이 강아지 동물 먹이", "바다 파도 해변 모래", "기차 역 승객 선로", "축구 공 선수 경기"]


def corpus(path):
    """40 lines: ten per topic in a row (every adjacent pair of one topic shares words), then a line planted from
    a KorQuAD paragraph inside the third topic."""
    lines = []
    for t, words in enumerate(TOPICS):
        for i in range(10):
            lines.append(f"{words} 이야기 {t}번 주제의 {i}번째 문장입니다.")
    lines[25] = "이 문장은 평가 세트의 문단에서 그대로 가져온 아주 긴 문장이라서 걸러져야 한다."
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def data_dir(root):
    os.makedirs(os.path.join(root, "KorQuAD"))
    context = "앞의 이야기. 이 문장은 평가 세트의 문단에서 그대로 가져온 아주 긴 문장이라서 걸러져야 한다. 뒤의 이야기."
    with open(os.path.join(root, "KorQuAD", "KorQuAD_v1.0_dev.json"), "w", encoding="utf-8") as f:
        json.dump({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
            {"id": "1", "question": "무엇인가?", "answers": [{"text": "이야기", "answer_start": 3}]}]}]}]}, f,
            ensure_ascii=False)
    return root


def run(tmp_path, out, *extra):
    r = subprocess.run([sys.executable, SCRIPT, "--corpus", str(tmp_path / "c.txt"), "--data_dir", str(tmp_path / "d"),
                        "--out", str(out), "--window", "3", "--block", "10", "--dev_share", "0.25",
                        "--dev_queries", "2", "--dev_corpus", "3", "--keep_query", "0.5", *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def read(out):
    return {name: open(os.path.join(out, name), encoding="utf-8").read()
            for name in ("train.tsv", "dev/queries.jsonl", "dev/corpus.jsonl", "dev/qrels/dev.tsv")}


@pytest.mark.slow
def test_windows_split_and_decontamination(tmp_path):
    lines = corpus(tmp_path / "c.txt")
    data_dir(str(tmp_path / "d"))
    run(tmp_path, tmp_path / "a")
    files = read(tmp_path / "a")
    run(tmp_path, tmp_path / "b")
    assert files == read(tmp_path / "b")  # deterministic, byte for byte
    stats = json.load(open(tmp_path / "a" / "ict.json"))
    assert stats["contaminated_lines_by_set"] == {"KorQuAD dev": 1}
    # 4 blocks of 10 lines, 3 non-overlapping windows each, minus the one holding the planted line
    assert stats["windows_kept"] == 11 and stats["windows_refused"]["contaminated"] >= 1
    assert stats["dev_queries"] == 2 and stats["train_pairs"] + 3 == 11
    rows = [line.split("\t") for line in files["train.tsv"].splitlines()[1:]]
    used = set()
    for query, passage in rows:
        q = lines.index(query)
        window = [i for i in range(q - 2, q + 3) if 0 <= i < len(lines) and lines[i] in passage]
        assert len(window) in (2, 3) and window == list(range(window[0], window[0] + len(window)))
        assert all(i // 10 == q // 10 for i in window)  # inside one block (one topic here)
        assert (q in window) == (query in passage)  # the query is kept only where the passage holds it
        assert 25 not in window
        used.update(window + [q])
    kept = sum(query in passage for query, passage in rows)
    assert 0 < kept < len(rows)  # --keep_query 0.5
    queries = [json.loads(line) for line in files["dev/queries.jsonl"].splitlines()]
    corpus_docs = {json.loads(line)["_id"]: json.loads(line)["text"] for line in files["dev/corpus.jsonl"].splitlines()}
    for q in queries:
        assert q["text"] not in corpus_docs["d" + q["_id"][1:]]  # dev passages never hold their query
        assert lines.index(q["text"]) // 10 not in {i // 10 for i in used}  # dev blocks are not trained on
    assert len(corpus_docs) == 3 and files["dev/qrels/dev.tsv"].startswith("query-id\tcorpus-id\tscore\n")


@pytest.mark.slow
def test_bad_corpus_and_flags_are_one_line(tmp_path):
    bad = tmp_path / "c.txt"
    bad.write_bytes("첫 줄\n둘째 \x00줄\n".encode("utf-8"))
    r = subprocess.run([sys.executable, SCRIPT, "--corpus", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {bad}:2: NUL byte in the text (a binary or corrupted file)"
    r = subprocess.run([sys.executable, SCRIPT, "--corpus", str(bad), "--window", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--window 1" in r.stderr



@pytest.mark.slow
def test_unwritable_output_is_one_line(tmp_path):
    """--out under a file (what a full disk or a read-only folder also give: an OSError): one line, no traceback."""
    corpus(tmp_path / "c.txt")
    data_dir(str(tmp_path / "d"))
    (tmp_path / "file").write_text("x")
    r = subprocess.run([sys.executable, SCRIPT, "--corpus", str(tmp_path / "c.txt"), "--data_dir", str(tmp_path / "d"),
                        "--out", str(tmp_path / "file" / "ict"), "--window", "3", "--block", "10", "--dev_share",
                        "0.25", "--dev_queries", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot write"), r.stderr

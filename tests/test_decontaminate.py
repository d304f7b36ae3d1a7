"""The decontamination guard (common/decontaminate.py): training sentences that occur in an evaluation set are
reported per set, dropped with --decontaminate drop, and stop the run with fail."""
import json
import os

import pytest

from conftest import SHARED_DATA

LEAK = "고양이 한 마리가 창가에서 졸고 있다."


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def data(tmp_path):
    """Evaluation sets with known sentences, and training files with planted copies of them."""
    root = str(tmp_path / "data")
    header = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
    write(f"{root}/KorSTS/sts-test.tsv", header + f"main\tf\t2020\t1\t4.0\t{LEAK}\t다른 문장이 여기에 있다.\n")
    write(f"{root}/KorSTS/sts-dev.tsv", header + "main\tf\t2020\t1\t1.0\t개발 세트의 첫 문장.\t개발 세트의 둘째 문장.\n")
    write(f"{root}/KLUE-NLI/klue-nli-v1.1_dev.json", json.dumps(
        [{"premise": "클루 개발 세트의 전제 문장.", "hypothesis": "클루 가설 문장입니다.", "gold_label": "entailment"}],
        ensure_ascii=False))
    rows = [("전제 문장 하나가 있다.", "함의 문장 하나가 있다.", "entailment"),
            ("전제 문장 하나가 있다.", "모순 문장 하나가 있다.", "contradiction"),
            # a KorSTS test sentence with other spacing and punctuation: found after normalisation
            ("고양이 한마리가 창가에서  졸고 있다!", "함의 문장 둘이 있다.", "entailment"),
            ("고양이 한마리가 창가에서  졸고 있다!", "모순 문장 둘이 있다.", "contradiction"),
            ("클루 개발 세트의 전제 문장.", "함의 문장 셋이 있다.", "entailment")]  # KLUE-NLI dev, exactly
    write(f"{root}/train/nli.tsv", "sentence1\tsentence2\tgold_label\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    write(f"{root}/train/wiki.txt", f"위키 문장 하나.\n{LEAK}\n위키 문장 둘.\n")
    return root


def guard(ns, data, mode, tmp_path, source="sup", files=("train/nli.tsv",)):
    import argparse
    args = argparse.Namespace(train_file=list(files), sts_file=None, nli_file=None, data_dir=data, decontaminate=mode,
                              output_dir=str(tmp_path / "out"))
    lines = []
    report = ns.decontaminate.guard(args, [source], 0, lines.append)
    return args, report, lines


def test_normalisation(kosimcse):
    n = kosimcse.decontaminate.normalize
    assert n("고양이 한 마리가 창가에서 졸고 있다.") == n("고양이 한마리가  창가에서 졸고 있다!") == "고양이한마리가창가에서졸고있다"
    assert n("ＡＢＣ Ｄｅｆ") == "abcdef"  # NFKC + casefold
    assert n("고양이가 있다") != n("고양이는 있다")


def test_warn_reports_each_evaluation_set(kosimcse, data, tmp_path):
    args, report, lines = guard(kosimcse, data, "warn", tmp_path)
    assert report["KorSTS test"] == {"exact": 0, "normalized": 1, "ngram": 0,
                                     "examples": ["고양이 한마리가 창가에서  졸고 있다!"]}
    assert report["KLUE-NLI dev"]["exact"] == report["KLUE-NLI dev"]["normalized"] == 1
    assert report["KorSTS dev"]["normalized"] == 0
    assert args.train_file == ["train/nli.tsv"]  # warn trains on the files as given
    assert any("1 training sentence(s) occur in KorSTS test" in line for line in lines)
    assert args.decontamination["mode"] == "warn"


def test_drop_filters_every_row_with_a_leaked_sentence(kosimcse, data, tmp_path):
    args, _, _ = guard(kosimcse, data, "drop", tmp_path)
    copy = args.train_file[0]
    assert copy == str(tmp_path / "out" / "decontaminated" / "nli.tsv")
    rows, _ = kosimcse.data.read_nli(copy)
    assert rows == [("전제 문장 하나가 있다.", "함의 문장 하나가 있다.", "entailment"),
                    ("전제 문장 하나가 있다.", "모순 문장 하나가 있다.", "contradiction")]
    args, report, _ = guard(kosimcse, data, "drop", tmp_path, source="unsup", files=("train/wiki.txt",))
    assert kosimcse.data.read_sentences(args.train_file[0]) == ["위키 문장 하나.", "위키 문장 둘."]


def test_fail_stops_with_one_line_naming_the_set(kosimcse, data, tmp_path):
    with pytest.raises(SystemExit) as e:
        guard(kosimcse, data, "fail", tmp_path, source="unsup", files=("train/wiki.txt",))
    assert str(e.value).startswith("error: 1 training sentence(s) occur in the evaluation set KorSTS test")
    assert "\n" not in str(e.value)


def test_training_run_records_the_report_and_trains_without_dropped_rows(kosimcse, tiny_bert, data, tmp_path):
    """train.py --decontaminate drop: the filtered file is what trains, and training.json says so."""
    with open(f"{data}/KorSTS/sts-dev.tsv", "a", encoding="utf-8") as f:
        f.write("".join(f"main\tf\t2020\t{i}\t{i % 5}.0\t문장 {i} 하나.\t문장 {i} 둘.\n" for i in range(2, 12)))
    with open(f"{data}/train/nli.tsv", "a", encoding="utf-8") as f:
        f.write("".join(f"깨끗한 전제 {i}.\t함의 {i}.\tentailment\n깨끗한 전제 {i}.\t모순 {i}.\tcontradiction\n"
                        for i in range(3)))
    out = str(tmp_path / "run")
    kosimcse.train.main(["--model", tiny_bert, "--mode", "sup", "--data_dir", data, "--train_file", "train/nli.tsv",
                         "--output_dir", out, "--batch_size", "2", "--max_len", "16", "--max_steps", "1",
                         "--eval_steps", "1", "--decontaminate", "drop", "--pooler", "mean"])
    with open(os.path.join(out, "best_model", "training.json")) as f:
        info = json.load(f)
    assert info["decontamination"]["evaluation_sets"]["KorSTS test"]["normalized"] == 1
    assert info["train_files"] == [os.path.join(out, "decontaminated", "nli.tsv")]
    rows, _ = kosimcse.data.read_nli(info["train_files"][0])
    assert len(rows) == 2 + 6 and not any("고양이" in a or "클루" in a for a, _, _ in rows)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "KLUE-NLI", "klue_nli_train.tsv")),
                    reason="the shared data is not beside the checkout")
@pytest.mark.slow
def test_finds_the_overlap_of_the_real_klue_nli_train_file(kosimcse, tmp_path):
    """KLUE-NLI train (24,998 pairs) shares a few sentences with KLUE-NLI dev and KLUE-STS dev (measured: 3 and 1)."""
    args, report, _ = guard(kosimcse, SHARED_DATA, "warn", tmp_path, files=("KLUE-NLI/klue_nli_train.tsv",))
    assert report["KLUE-NLI dev"]["normalized"] >= 1 and report["KLUE-STS dev"]["normalized"] >= 1
    assert sum(r["normalized"] for r in report.values()) < 50


PARAGRAPH = ("세종은 조선의 제4대 국왕으로 훈민정음을 창제하였다. 그는 집현전을 설치하여 학자들을 길렀고, 측우기와 "
             "해시계 같은 과학 기구의 발명을 장려하였다. 재위 기간 동안 농업과 의학 서적이 많이 편찬되었다.")


@pytest.fixture
def korquad(data):
    """``data`` plus a KorQuAD dev file whose one context is PARAGRAPH, and a wiki file that holds one of its
    sentences inside a longer line (no sentence equals an evaluation sentence: only the passage check sees it)."""
    write(f"{data}/KorQuAD/KorQuAD_v1.0_dev.json", json.dumps({"version": "KorQuAD_v1.0_dev", "data": [{
        "title": "세종", "paragraphs": [{"context": PARAGRAPH, "qas": [
            {"id": "q1", "question": "훈민정음을 만든 왕은?", "answers": [{"text": "세종", "answer_start": 0}]}]}]}]},
        ensure_ascii=False))
    planted = "역사책에 따르면 그는 집현전을 설치하여 학자들을 길렀고, 측우기와 해시계를 만들었다."  # 24 of PARAGRAPH's
    write(f"{data}/train/ict.txt", f"위키 문장 하나.\n{planted}\n집현전은 경복궁 안에 있었다.\n위키 문장 둘.\n")
    return data, planted


def test_passage_level_check_finds_a_planted_korquad_paragraph(kosimcse, korquad, tmp_path):
    """warn reports it (ngram count), drop trains without it, fail stops with one line naming KorQuAD dev; a short
    shared phrase ("집현전은", under 20 characters) is no hit."""
    data, planted = korquad
    args, report, lines = guard(kosimcse, data, "warn", tmp_path, source="unsup", files=("train/ict.txt",))
    assert report["KorQuAD dev"]["ngram"] == 1 and report["KorQuAD dev"]["normalized"] == 0
    assert report["KorQuAD dev"]["examples"] == [planted]
    assert any("share a 20-character run with a passage or query of KorQuAD dev" in line for line in lines)
    args, _, _ = guard(kosimcse, data, "drop", tmp_path, source="unsup", files=("train/ict.txt",))
    assert kosimcse.data.read_sentences(args.train_file[0]) == ["위키 문장 하나.", "집현전은 경복궁 안에 있었다.",
                                                                "위키 문장 둘."]
    with pytest.raises(SystemExit) as e:
        guard(kosimcse, data, "fail", tmp_path, source="unsup", files=("train/ict.txt",))
    assert str(e.value).startswith("error: 1 training sentence(s) share a 20-character run with a passage or query "
                                   "of the evaluation set KorQuAD dev") and "\n" not in str(e.value)


# --- reliability, second round (issue 35, class 7): a guard that cannot check says so ---------------------

def test_absent_evaluation_sets_are_named(kosimcse, data, tmp_path):
    """Most sets are absent from this --data_dir: one line names the ones that could not be checked."""
    _, report, lines = guard(kosimcse, data, "warn", tmp_path, source="unsup", files=("train/wiki.txt",))
    (absent,) = [l for l in lines if l.startswith("decontamination: not checked")]
    assert absent == f"decontamination: not checked, absent under --data_dir {data}: KLUE-STS dev, XNLI test, " \
                     f"KorQuAD dev, AutoRAG"
    assert set(report) == {"KorSTS dev", "KorSTS test", "KLUE-NLI dev"}


def test_a_korquad_file_of_another_shape_is_one_line(kosimcse, data, tmp_path):
    write(f"{data}/KorQuAD/KorQuAD_v1.0_dev.json", json.dumps({"data": ["not an article"]}))
    with pytest.raises(kosimcse.data.DataError, match=r"KorQuAD_v1\.0_dev\.json: not a KorQuAD 1\.0 file \(TypeError"):
        guard(kosimcse, data, "warn", tmp_path, source="unsup", files=("train/wiki.txt",))


def test_drop_that_removes_every_row_names_the_reason(kosimcse, data, tmp_path):
    write(f"{data}/train/leaks.txt", f"{LEAK}\n{LEAK.replace(' ', '  ')}\n")
    with pytest.raises(SystemExit) as e:
        guard(kosimcse, data, "drop", tmp_path, source="unsup", files=("train/leaks.txt",))
    assert str(e.value).startswith(f"error: --decontaminate drop removed every row of {data}/train/leaks.txt (each "
                                   f"shares a sentence") and "nothing is left to train on" in str(e.value)


@pytest.mark.slow
def test_drop_that_removes_every_row_stops_every_rank_under_torchrun(data, tiny_bert, tmp_path):
    """Rank 0 alone filters the files; its stop reaches rank 1, which used to be left at the barrier (killed by
    torchrun's agent on one machine, waiting out the collective timeout on the other machines of a multi-node run)."""
    import time
    from conftest import ROOT, torchrun
    write(f"{data}/train/leaks.txt", f"{LEAK}\n{LEAK.replace(' ', '  ')}\n")
    out = tmp_path / "run"
    start = time.time()
    proc = torchrun(os.path.join(ROOT, "KoSimCSE", "train.py"), "--model", tiny_bert, "--mode", "unsup",
                    "--train_file", f"{data}/train/leaks.txt", "--data_dir", data, "--decontaminate", "drop",
                    "--output_dir", str(out), "--device", "cpu", "--max_steps", "1", timeout=150)
    assert proc.returncode != 0 and time.time() - start < 150
    assert f"error: --decontaminate drop removed every row of {data}/train/leaks.txt" in proc.stderr, proc.stderr[-2000:]
    assert "error: rank 0 of this run stopped (its message is above); rank 1 stops too" in proc.stderr, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr  # no rank aborted
    assert 'train.py", line' not in proc.stderr and "common/" not in proc.stderr  # no traceback of ours (torchrun's own
    assert not (out / "best_model").exists()                                     # report of a failed child is its)

"""Reliability, second round (issue 35), retrieval inputs: each case a bad file or flag a careful user could hit,
and what it must give: one line naming the file, line and problem, or a run that works and says what it did.

Classes: 1. dataset names that are neither a known set nor a BEIR folder; 2. BEIR ids and texts of the wrong
type; 3. qrels semantics (scores, conflicts, queries without a relevant document); 4. a failed write after a
finished dataset.
"""
import json
import os
import re
import stat

import pytest

from test_retrieval import write_beir

DOC = '{"_id": "doc0", "title": "과일", "text": "사과 바나나"}'
QUERY = '{"_id": "q0", "text": "사과"}'

# case: (write_beir keyword arguments, the error's pattern after the folder path)
BEIR_CASES = {
    "id_null": (dict(corpus_lines=[DOC, '{"_id": null, "text": "바다"}']), r"corpus\.jsonl:2: _id None is not"),
    "id_list": (dict(corpus_lines=[DOC, '{"_id": [1, 2], "text": "바다"}']), r"corpus\.jsonl:2: _id \[1, 2\] is not"),
    "id_empty": (dict(corpus_lines=[DOC, '{"_id": " ", "text": "바다"}']), r"corpus\.jsonl:2: _id ' ' is not"),
    "id_bool": (dict(query_lines=[QUERY, '{"_id": true, "text": "바다"}']), r"queries\.jsonl:2: _id True is not"),
    "text_null": (dict(corpus_lines=[DOC, '{"_id": "d1", "text": null}']), r"corpus\.jsonl:2: 'text' is NoneType"),
    "text_missing": (dict(corpus_lines=[DOC, '{"_id": "d1", "title": "바다"}']), r"corpus\.jsonl:2: no 'text' field"),
    "text_int": (dict(corpus_lines=[DOC, '{"_id": "d1", "text": 7}']), r"corpus\.jsonl:2: 'text' is int 7, not"),
    "title_int": (dict(corpus_lines=[DOC, '{"_id": "d1", "title": 3, "text": "바다"}']), r"corpus\.jsonl:2: 'title' is int"),
    "query_text_int": (dict(query_lines=[QUERY, '{"_id": "q1", "text": 5}']), r"queries\.jsonl:2: 'text' is int"),
    "query_text_missing": (dict(query_lines=[QUERY, '{"_id": "q1"}']), r"queries\.jsonl:2: no 'text' field"),
    "corpus_blank": (dict(corpus_lines=["", "  "]), r"corpus\.jsonl: the corpus is empty"),
    "score_superscript": (dict(qrel_lines=["q0\tdoc0\t²"]), r"test\.tsv:2: expected query-id<TAB>corpus-id<TAB>integer"),
    "score_float": (dict(qrel_lines=["q0\tdoc0\t1.5"]), r"test\.tsv:2: expected query-id"),
    "score_conflict": (dict(qrel_lines=["q0\tdoc0\t1", "q0\tdoc0\t0"]),
                       r"test\.tsv:3: query 'q0' and document 'doc0' are judged twice, 1 and 0"),
    "all_zero": (dict(qrel_lines=["q0\tdoc0\t0", "q1\tdoc1\t0"]), r"test\.tsv: no query has a relevant document"),
    "two_columns": (dict(qrel_lines=["q0\tdoc0"]), r"test\.tsv:2: expected query-id"),
}


@pytest.mark.parametrize("case", sorted(BEIR_CASES))
def test_bad_beir_input_is_one_line_with_file_and_line(kosimcse, tmp_path, case):
    kwargs, pattern = BEIR_CASES[case]
    folder = write_beir(str(tmp_path / case), **kwargs)
    with pytest.raises(kosimcse.data.DataError, match=pattern) as e:
        kosimcse.retrieval.read_beir(folder, log=lambda message: None)
    assert "\n" not in str(e.value) and str(e.value).startswith(folder)


def test_beir_integer_ids_work_and_repeated_judgements_agree(kosimcse, tmp_path):
    """What works: integer ids (BEIR exports hold them) read as strings; one judgement written twice."""
    folder = write_beir(str(tmp_path / "ints"), corpus_lines=['{"_id": 0, "text": "사과"}', '{"_id": 1, "text": "바다"}'],
                        query_lines=['{"_id": 10, "text": "사과?"}'], qrel_lines=["10\t0\t1", "10\t0\t1"])
    corpus, queries, qrels = kosimcse.retrieval.read_beir(folder)
    assert corpus == {"0": "사과", "1": "바다"} and queries == {"10": "사과?"} and qrels == {"10": {"0": 1}}


def test_queries_without_a_relevant_document_are_dropped_and_counted(kosimcse, tmp_path):
    """MTEB leaves out a query whose judgements are all 0; so do we, and say how many."""
    folder = write_beir(str(tmp_path / "zeros"), qrel_lines=["q0\tdoc0\t1", "q1\tdoc1\t0", "q2\tdoc1\t0"])
    said = []
    corpus, queries, qrels = kosimcse.retrieval.read_beir(folder, log=said.append)
    assert set(queries) == set(qrels) == {"q0"}
    assert said == [f"{folder}/qrels/test.tsv: 2 of 3 judged queries have no relevant document (score above 0); "
                    f"they are left out, as MTEB leaves them out"]


# name routing: (the --dataset value, made under tmp_path by the function, the error's pattern)
def make_json_corpus(root):
    folder = write_beir(str(root / "jsoncorpus"))
    os.rename(os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "corpus.json"))
    return folder


def make_dir_corpus(root):
    folder = write_beir(str(root / "dircorpus"))
    os.remove(os.path.join(folder, "corpus.jsonl"))
    os.makedirs(os.path.join(folder, "corpus.jsonl"))
    return folder


def make_queries_only(root):
    (root / "q").mkdir()
    (root / "q" / "queries.jsonl").write_text("{}")
    return str(root / "q")


NAME_CASES = {
    "typo": (lambda root: "autorg", r"--dataset autorg: not a known set, a file or a BEIR folder \(STS: korsts-train, korsts-dev"),
    "corpus_json": (make_json_corpus, r"jsoncorpus is a folder without corpus\.jsonl \(it has corpus\.json, qrels, "
                                      r"queries\.jsonl\)"),
    "corpus_dir": (make_dir_corpus, r"dircorpus/corpus\.jsonl is a directory, not a file"),
    "empty_folder": (lambda root: str(root), r": is a directory, not a file \(an STS set is a file; a retrieval set"),
    "queries_only": (lambda root: make_queries_only(root),
                     r"q is a folder without corpus\.jsonl \(it has queries\.jsonl\); a BEIR folder holds"),
}


@pytest.mark.parametrize("case", sorted(NAME_CASES))
def test_unknown_dataset_names_are_refused_before_anything_runs(kosimcse, tmp_path, capsys, case):
    """Even beside a good name: nothing runs, and the error names the known sets or what the folder lacks."""
    make, pattern = NAME_CASES[case]
    name = make(tmp_path)
    for given in ([name], ["korquad-dev", name]):
        with pytest.raises(SystemExit) as e:
            kosimcse.evaluation.parse_args(["--model_dir", "x", "--task", "retrieval", "--dataset", *given])
        assert e.value.code == 2
        (line,) = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
        assert re.search(pattern, line), line


def test_retrieval_task_without_a_retrieval_set_is_refused(kosimcse, capsys):
    """--task retrieval with only STS sets named used to run the default sets silently."""
    with pytest.raises(SystemExit):
        kosimcse.evaluation.parse_args(["--model_dir", "x", "--task", "sts", "retrieval", "--dataset", "korsts-test"])
    assert "--task retrieval: --dataset names no retrieval set" in capsys.readouterr().err
    args = kosimcse.evaluation.parse_args(["--model_dir", "x", "--task", "retrieval", "--dataset", "autorag", "autorag",
                                           "--truncate_dim", "8", "8"])
    assert args.retrieval_datasets == ["autorag"] and args.truncate_dim == [8]  # each once


def test_a_failed_mteb_write_keeps_the_finished_dataset(kosimcse, tiny_bert, tmp_path):
    """Two sets, --mteb_dir writable for the first only: the first set's row is in --output_json and its MTEB
    file written, and the one-line error says so."""
    first, second = write_beir(str(tmp_path / "first")), write_beir(str(tmp_path / "second"))
    mteb, out = tmp_path / "mteb", str(tmp_path / "rows.json")
    mteb.mkdir()
    (mteb / "second.json").mkdir()  # a folder where the second file must go: os.replace fails
    with pytest.raises(SystemExit) as e:
        kosimcse.evaluation.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "retrieval", "--dataset",
                                  first, second, "--max_len", "8", "--output_json", out, "--mteb_dir", str(mteb),
                                  "--device", "cpu"])
    message = str(e.value)
    assert message.startswith(f"error: could not write {mteb}/second.json: ") and "\n" not in message
    assert f"--output_json {out} holds the rows of {first}, {second}" in message
    assert f"{mteb}/first.json written" in message
    assert [r["dataset"] for r in json.load(open(out))] == [first, second]
    assert json.load(open(mteb / "first.json"))["task_name"] == "first"


def test_a_failed_write_before_the_last_set_says_what_did_not_run(kosimcse, tiny_bert, tmp_path):
    first, second = write_beir(str(tmp_path / "first")), write_beir(str(tmp_path / "second"))
    mteb, out = tmp_path / "mteb", str(tmp_path / "rows.json")
    mteb.mkdir()
    (mteb / "first.json").mkdir()
    with pytest.raises(SystemExit) as e:
        kosimcse.evaluation.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "retrieval", "--dataset",
                                  first, second, "--max_len", "8", "--output_json", out, "--mteb_dir", str(mteb),
                                  "--device", "cpu"])
    assert str(e.value).endswith(f"--output_json {out} holds the rows of {first}; {second} not run")
    assert [r["dataset"] for r in json.load(open(out))] == [first]
    assert stat.S_ISDIR(os.stat(mteb / "first.json").st_mode)

"""--task retrieval: metrics against hand-computed values, a BEIR-layout folder end to end, one-line errors
for bad inputs, and the real KorQuAD / AutoRAG files' counts when ../shared/data is present."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, TOPICS


@pytest.fixture(scope="module")
def ret(kosimcse):
    return kosimcse.retrieval


def test_metrics_equal_hand_computed_values(ret):
    """4 documents, 3 queries; the score matrix fixes the rankings:
    q1 -> d2 d3 d4 d1 (its relevant d1 at rank 4); q2 -> d1 d2 d4 d3 (relevant d2, d3 at 2 and 4);
    q3 -> d4 first (relevant d4 at rank 1)."""
    doc_ids, query_ids = ["d1", "d2", "d3", "d4"], ["q1", "q2", "q3"]
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d4": 1}}
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.9, 0.8, 0.1, 0.2], [0.2, 0.3, 0.1, 0.9]], dtype=np.float32)
    ids = np.tile(np.arange(4), (3, 1))  # unsorted on purpose: pytrec_eval ranks by score
    m = ret.compute_metrics(qrels, ret.scores_to_run(scores, ids, doc_ids, query_ids))
    ndcg = [1 / np.log2(5), (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)), 1.0]
    assert m["ndcg_at_10"] == pytest.approx(np.mean(ndcg), abs=1e-5) == pytest.approx(0.69387, abs=1e-5)
    assert m["main_score"] == m["ndcg_at_10"]
    assert m["mrr_at_10"] == pytest.approx((1 / 4 + 1 / 2 + 1) / 3, abs=1e-5)
    assert m["mrr_at_3"] == pytest.approx((0 + 1 / 2 + 1) / 3, abs=1e-5)  # q1's hit at rank 4 is past the cut
    assert m["mrr_at_1"] == pytest.approx(1 / 3, abs=1e-5)
    assert m["map_at_10"] == pytest.approx((1 / 4 + (1 / 2 + 2 / 4) / 2 + 1) / 3, abs=1e-5)
    assert m["recall_at_1"] == pytest.approx(1 / 3, abs=1e-5)
    assert m["recall_at_3"] == pytest.approx((0 + 0.5 + 1) / 3, abs=1e-5)
    assert m["recall_at_5"] == m["recall_at_10"] == m["recall_at_100"] == 1.0


def test_mrr_ties_follow_pytrec_eval_and_missing_queries_score_zero(ret):
    # d_a and d_b tie: pytrec_eval (trec_eval) ranks ties by doc id descending, so d_b comes first
    qrels = {"q": {"d_a": 1}, "lost": {"d_a": 1}}
    run = {"q": {"d_a": 0.5, "d_b": 0.5, "d_c": 0.1}}
    m = ret.compute_metrics(qrels, run)
    assert m["mrr_at_1"] == 0.0 and m["mrr_at_10"] == pytest.approx(0.5 / 2)
    assert m["recall_at_1"] == 0.0 and m["recall_at_10"] == pytest.approx(0.5)


def test_exact_search_is_cosine(ret):
    rng = np.random.default_rng(0)
    passages, queries = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    scores, ids = ret.exact_search(queries * 3, passages * 7, top_k=10)
    p = passages / np.linalg.norm(passages, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cos = q @ p.T
    assert (ids == np.argsort(-cos, axis=1)[:, :10]).all()
    assert np.allclose(scores, np.sort(cos, axis=1)[:, ::-1][:, :10], atol=1e-5)


def write_beir(folder, corpus_lines=None, query_lines=None, qrel_lines=None):
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    docs = [{"_id": f"doc{i}", "title": words[0], "text": " ".join(words[1:]) + " 이야기"} for i, words in enumerate(TOPICS)]
    queries = [{"_id": f"q{i}", "text": " ".join(words[1:4])} for i, words in enumerate(TOPICS)]
    qrels = [f"q{i}\tdoc{i}\t1" for i in range(len(TOPICS))] + ["q0\tdoc1\t0"]
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        f.write("\n".join(corpus_lines or [json.dumps(d, ensure_ascii=False) for d in docs]) + "\n")
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        f.write("\n".join(query_lines or [json.dumps(q, ensure_ascii=False) for q in queries]
                          + [json.dumps({"_id": "unjudged", "text": "판정 없는 질문"}, ensure_ascii=False)]) + "\n")
    with open(os.path.join(folder, "qrels", "test.tsv"), "w") as f:
        f.write("\n".join(["query-id\tcorpus-id\tscore"] + (qrel_lines or qrels)) + "\n")
    return folder


def test_beir_folder_end_to_end(kosimcse, ret, tiny_bert, tmp_path, capsys):
    folder = write_beir(str(tmp_path / "mybeir"))
    corpus, queries, qrels = ret.read_beir(folder)
    assert corpus["doc0"] == " ".join(TOPICS[0]) + " 이야기"  # MTEB: title + " " + text
    assert "unjudged" not in queries and len(queries) == len(TOPICS)  # queries without qrels are dropped
    out, mteb_dir = str(tmp_path / "rows.json"), str(tmp_path / "mteb")
    kosimcse.evaluation.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "retrieval", "--dataset", folder,
                              "--max_len", "8", "--query_prefix", "query: ", "--passage_prefix", "passage: ",
                              "--output_json", out, "--mteb_dir", mteb_dir, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and "truncated at 8 tokens" in printed
    (row,) = json.load(open(out))
    assert row["dataset"] == folder and row["n_docs"] == len(TOPICS) and row["n_queries"] == len(TOPICS)
    assert row["passages_truncated"] > 0 and row["passage_prefix"] == "passage: "
    assert 0 <= row["metrics"]["ndcg_at_10"] <= 1 and row["metrics"]["recall_at_100"] == 1.0
    result = json.load(open(os.path.join(mteb_dir, "mybeir.json")))
    assert result["task_name"] == "mybeir"
    (scores,) = result["scores"]["test"]
    assert scores["main_score"] == scores["ndcg_at_10"] == row["metrics"]["ndcg_at_10"]
    assert scores["hf_subset"] == "default" and scores["languages"] == ["kor-Hang"]
    assert {"mrr_at_10", "map_at_10", "recall_at_1", "recall_at_5", "recall_at_100"} <= scores.keys()


def test_dataset_names_go_to_their_task(kosimcse):
    ev = kosimcse.evaluation
    args = ev.parse_args(["--model_dir", "x", "--task", "sts", "retrieval", "--dataset", "korsts-test", "autorag"])
    assert args.sts_datasets == ["korsts-test"] and args.retrieval_datasets == ["autorag"]
    args = ev.parse_args(["--model_dir", "x"])
    assert args.sts_datasets == ["korsts-test"] and args.retrieval_datasets == ["autorag", "korquad-dev"]


BAD = {
    "not_json": (dict(corpus_lines=['{"_id": "doc0", "text": "사과 바나나"}', '{"_id": "doc1", "text": ']),
                 r"corpus\.jsonl:2: not JSON"),
    "empty_query": (dict(query_lines=['{"_id": "q0", "text": "사과"}', '{"_id": "q1", "text": "  "}']),
                    r"queries\.jsonl:2: query 'q1' is empty"),
    "missing_doc": (dict(qrel_lines=["q0\tdoc0\t1", "q1\tdoc99\t1"]),
                    r"test\.tsv:3: document 'doc99' is not in .*corpus\.jsonl"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_stop_with_file_and_line(kosimcse, ret, tmp_path, case):
    kwargs, pattern = BAD[case]
    folder = write_beir(str(tmp_path / case), **kwargs)
    with pytest.raises(kosimcse.data.DataError, match=pattern) as e:
        ret.read_beir(folder)
    assert "\n" not in str(e.value) and str(e.value).startswith(folder)


@pytest.mark.slow
def test_bad_input_cli_prints_one_error_line(tiny_bert, tmp_path):
    folder = write_beir(str(tmp_path / "bad"), **BAD["missing_doc"][0])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "KoSimCSE", "evaluation.py"), "--model_dir", tiny_bert,
                        "--pooling", "mean", "--task", "retrieval", "--dataset", folder, "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    (line,) = [l for l in r.stderr.splitlines() if l.strip()]
    assert line.startswith(f"error: {folder}/qrels/test.tsv:3: document 'doc99'")


REAL = os.path.isfile(os.path.join(SHARED_DATA, "KorQuAD", "KorQuAD_v1.0_dev.json")) and os.path.isfile(
    os.path.join(SHARED_DATA, "AutoRAG", "qa_v4.parquet"))


@pytest.mark.skipif(not REAL, reason=f"KorQuAD/AutoRAG not found under {SHARED_DATA} (set KOSENT_SHARED_DATA)")
def test_real_retrieval_sets_match_mteb_counts(ret):
    task, revision, corpus, queries, qrels = ret.load_retrieval("korquad-dev", SHARED_DATA)
    assert task == "SQuADKorV1Retrieval"
    # 961 distinct contexts in the file, one without questions; MTEB's corpus is the 960 positives
    assert len(corpus) == 960 and len(queries) == len(qrels) == 5774
    assert {d for rel in qrels.values() for d in rel} == set(corpus)
    lengths = [len(t) for t in corpus.values()]  # MTEB's stats: avg 545.2, min 352, max 2952 (title + context)
    assert (round(sum(lengths) / len(lengths), 1), min(lengths), max(lengths)) == (545.2, 352, 2952)
    task, revision, corpus, queries, qrels = ret.load_retrieval("autorag", SHARED_DATA)
    assert task == "AutoRAGRetrieval" and len(corpus) == 720 and len(queries) == len(qrels) == 114
    assert all(len(rel) == 1 and set(rel) <= corpus.keys() for rel in qrels.values())
    lengths = [len(t) for t in corpus.values()]  # MTEB's stats: avg 823.6, min 7, max 2484
    assert (round(sum(lengths) / len(lengths), 1), min(lengths), max(lengths)) == (823.6, 7, 2484)


@pytest.mark.slow
def test_several_truncate_dims_score_from_one_encoding(kosimcse, tiny_bert, synthetic_data, tmp_path, monkeypatch):
    """--truncate_dim 32 16 4: a row per dimension for sts and retrieval, each equal to a run with that one
    dimension, while the backbone encodes every batch once (the truncations reuse the full-width embeddings)."""
    ev = kosimcse.evaluation
    folder = write_beir(str(tmp_path / "beir"))
    common = ["--model_dir", tiny_bert, "--pooling", "mean", "--task", "sts", "retrieval", "--data_dir", synthetic_data,
              "--dataset", "korsts-test", folder, "--max_len", "16", "--device", "cpu"]
    calls = []

    class Counting(ev.FolderEncoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.backbone.register_forward_hook(lambda *_: calls.append(1))

    monkeypatch.setattr(ev, "FolderEncoder", Counting)
    single = {}
    for dim in (32, 16, 4):
        out = str(tmp_path / f"dim{dim}.json")
        ev.main(common + ["--truncate_dim", str(dim), "--output_json", out])
        single[dim] = json.load(open(out))
    per_run = len(calls) // 3
    calls.clear()
    out, mteb_dir = str(tmp_path / "all.json"), str(tmp_path / "mteb")
    ev.main(common + ["--truncate_dim", "32", "16", "4", "--output_json", out, "--mteb_dir", mteb_dir])
    assert len(calls) == per_run  # one encoding for three dimensions
    rows = json.load(open(out))
    assert [r["truncate_dim"] for r in rows] == [32, 32, 16, 16, 4, 4]
    for dim in (32, 16, 4):
        mine = [r for r in rows if r["truncate_dim"] == dim]
        assert [r["dataset"] for r in mine] == [r["dataset"] for r in single[dim]]
        for got, want in zip(mine, single[dim]):  # pytest >= 9's approx compares flat dicts, not lists of them
            assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-6), (dim, got["dataset"])
        assert os.path.isfile(os.path.join(mteb_dir, f"dim{dim}", "beir.json"))
    assert rows[0]["metrics"] != pytest.approx(rows[4]["metrics"], abs=1e-3)  # 4 dimensions do score differently
    with pytest.raises(SystemExit):  # several dims are for sts and retrieval only
        ev.parse_args(["--model_dir", "x", "--task", "search", "--truncate_dim", "8", "4"])


@pytest.mark.slow
def test_retrieval_speed_bench_runs_and_agrees_with_sentence_transformers(tiny_bert, tmp_path):
    """bench/retrieval_speed.py on a BEIR folder: both encoders timed, and their embeddings the same texts' (cos 1)."""
    pytest.importorskip("sentence_transformers")
    folder = write_beir(str(tmp_path / "beir"))
    out = str(tmp_path / "speed.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "retrieval_speed.py"), "--model", tiny_bert,
                        "--data_dir", str(tmp_path), "--dataset", folder, "--output_json", out],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(out))
    assert result["passages"] == result["queries"] == len(TOPICS)
    assert result["median_seconds"]["ours"] > 0 and result["median_seconds"]["st"] > 0
    assert min(result["mean_cosine_ours_vs_st"]) > 0.9999

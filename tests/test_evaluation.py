"""evaluation.py and what it drives in common/: the 8 STS metrics against scipy and sentence-transformers'
evaluator, BM-K's per-batch protocol, inference encoding (each distinct sentence once, one-length batches),
streaming search, clustering and several tasks on one loaded model."""
import json
import os
import random

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from conftest import evaluation_api, topic_sentence


def test_sts_metrics_match_scipy(kosimcse):
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    gold = rng.uniform(0, 5, 50)
    m = kosimcse.sts.sts_metrics(e1, e2, gold)
    cos = (e1 * e2).sum(1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    sims = {"cosine": cos, "euclidean": -np.linalg.norm(e1 - e2, axis=1),
            "manhattan": -np.abs(e1 - e2).sum(1), "dot": (e1 * e2).sum(1)}
    for name, sim in sims.items():
        assert m[f"{name}_pearson"] == pytest.approx(100 * pearsonr(gold, sim)[0], abs=1e-9)
        assert m[f"{name}_spearman"] == pytest.approx(100 * spearmanr(gold, sim)[0], abs=1e-9)
    keys = kosimcse.sts.METRICS
    assert m["avg"] == pytest.approx(np.mean([m[k] for k in keys]))
    assert m["max_spearman"] == max(m[k] for k in keys if "spearman" in k)


def test_bmk_protocol_averages_shuffled_batches(kosimcse):
    ev = evaluation_api(kosimcse)
    rng = np.random.default_rng(1)
    e1, e2, gold = rng.normal(size=(70, 4)), rng.normal(size=(70, 4)), rng.uniform(0, 5, 70)
    got = ev.bmk_metrics(e1, e2, gold, batch_size=32, seed=3)
    order = torch.randperm(70, generator=torch.Generator().manual_seed(3)).numpy()
    batches = [order[:32], order[32:64], order[64:]]  # the last batch of 6 weighs as much as the others
    want = np.mean([ev.sts_metrics(e1[b], e2[b], gold[b])["cosine_spearman"] for b in batches])
    assert got["cosine_spearman"] == pytest.approx(want)
    whole = ev.sts_metrics(e1, e2, gold)
    assert ev.bmk_metrics(e1, e2, gold, batch_size=100, seed=3)["avg"] == pytest.approx(whole["avg"])
    assert got["avg"] != pytest.approx(whole["avg"])


@pytest.mark.slow
def test_metrics_agree_with_sentence_transformers_evaluator(kosimcse, sup_run, synthetic_data):
    st_module = pytest.importorskip("sentence_transformers")
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    from transformers import AutoTokenizer
    _, best = sup_run
    ev = evaluation_api(kosimcse)
    pairs = kosimcse.data.read_sts(os.path.join(synthetic_data, "KorSTS", "sts-dev.tsv"))
    ours = ev.evaluate_sts(ev.FolderEncoder(best).eval(), AutoTokenizer.from_pretrained(best), pairs, 24, 32, "cpu")
    evaluator = EmbeddingSimilarityEvaluator([p[0] for p in pairs], [p[1] for p in pairs], [p[2] / 5 for p in pairs],
                                             similarity_fn_names=["cosine", "euclidean", "manhattan", "dot"])
    theirs = evaluator(st_module.SentenceTransformer(best, device="cpu"))
    for key in ev.METRICS:  # ours: cosine_pearson; theirs: pearson_cosine
        fn, stat = key.split("_")
        assert ours["standard"][key] / 100 == pytest.approx(theirs[f"{stat}_{fn}"], abs=1e-4), key


def test_search_finds_planted_sentence_across_chunks(kosimcse, sup_run, tmp_path):
    from transformers import AutoTokenizer
    _, best = sup_run
    ev = evaluation_api(kosimcse)
    encoder, tok = ev.FolderEncoder(best).eval(), AutoTokenizer.from_pretrained(best)
    rng = random.Random(5)
    corpus = list(dict.fromkeys(topic_sentence(rng, t % 3, 3) for t in range(90)))[:60]  # no train topic 3
    corpus.insert(30, "기차 역 승객 표 출발.")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    queries = ["기차 역 승객 표 출발.", corpus[45]]
    hits = ev.semantic_search(encoder, tok, queries, str(path), top_k=4, chunk_size=7, max_len=24)
    assert hits[0][0][2] == "기차 역 승객 표 출발." and hits[0][0][1] == 30
    assert hits[1][0][1] == 45 and hits[1][0][0] == pytest.approx(1.0, abs=1e-5)
    # Chunked top-k equals brute force over the whole corpus.
    q = torch.nn.functional.normalize(torch.from_numpy(ev.encode(encoder, tok, queries, 24)), dim=-1)
    c = torch.nn.functional.normalize(torch.from_numpy(ev.encode(encoder, tok, corpus, 24)), dim=-1)
    brute = (q @ c.T).topk(4, dim=1)
    assert [[h[1] for h in row] for row in hits] == brute.indices.tolist()


@pytest.mark.slow
def test_search_and_cluster_cli_output(kosimcse, sup_run, tmp_path, capsys):
    _, best = sup_run
    kosimcse.evaluation.main(["--model_dir", best, "--task", "search", "--top_k", "2"])
    out = capsys.readouterr().out
    assert out.count("Query:") == 3 and "Top 2 most similar sentences in corpus:" in out and "(Score: " in out
    plot = str(tmp_path / "clusters.png")
    kosimcse.evaluation.main(["--model_dir", best, "--task", "cluster", "--num_clusters", "3", "--plot", plot])
    out = capsys.readouterr().out
    assert out.count("Cluster  ") == 3 and out.count("'") >= 24  # all 12 sentences listed
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_several_tasks_run_in_order_on_one_loaded_model(kosimcse, sup_run, synthetic_data, tmp_path, capsys,
                                                        monkeypatch):
    """--task sts search (run_example.sh's call): the STS rows, then the search demo, one model load; the
    output equals the two tasks run one by one."""
    _, best = sup_run
    ev = evaluation_api(kosimcse)
    common = ["--model_dir", best, "--data_dir", synthetic_data, "--dataset", "korsts-test", "--top_k", "2"]
    ev.main(common + ["--task", "sts", "--output_json", str(tmp_path / "one.json")])
    ev.main(common + ["--task", "search"])
    alone = capsys.readouterr().out
    loads, real = [], ev.FolderEncoder.__init__

    def counted(self, *a, **k):
        loads.append(1)
        real(self, *a, **k)
    monkeypatch.setattr(ev.FolderEncoder, "__init__", counted)
    ev.main(common + ["--task", "sts", "search", "--output_json", str(tmp_path / "both.json")])
    both = capsys.readouterr().out
    assert loads == [1] and both == alone and both.index("| cosS |") < both.index("Query:")
    assert json.load(open(tmp_path / "one.json")) == json.load(open(tmp_path / "both.json"))
    with pytest.raises(SystemExit):
        ev.parse_args(["--model_dir", best, "--task", "index", "search", "--corpus_file", "c", "--index_dir", "d"])


def test_encode_runs_each_distinct_sentence_once(kosimcse, tiny_bert):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="mean").eval()
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(len(kwargs["input_ids"])), with_kwargs=True)
    sentences = ["사과 바나나.", "바다 파도.", "사과 바나나.", "기차 역.", "바다 파도."]
    emb = kosimcse.encoding.encode(model, tok, sentences, 24, batch_size=2)
    assert sum(seen) == 3 and emb.shape[0] == 5
    np.testing.assert_array_equal(emb[0], emb[2])
    alone = kosimcse.encoding.encode(model, tok, ["기차 역."], 24)
    np.testing.assert_allclose(emb[3], alone[0], atol=1e-6)


def test_encoding_batches_hold_one_length_when_they_can(kosimcse, tiny_bert):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="mean").eval()
    widths = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: widths.append(kwargs["attention_mask"].sum(1).unique().tolist()), with_kwargs=True)
    sentences = [" ".join(["사과"] * n) + f" {i}." for n in (1, 3, 6) for i in range(10)]  # 3 lengths x 10
    tokenized = kosimcse.data.TokenizedTexts(tok, sentences, 24)
    emb = kosimcse.encoding.encode_tokenized(model, tokenized, tok.pad_token_id, batch_size=16)
    assert len(widths) == 3 and all(len(w) == 1 for w in widths)  # no padding in any batch
    widths.clear()
    kosimcse.encoding.encode_tokenized(model, tokenized, tok.pad_token_id, batch_size=64)  # 10 < 64 // 4 rows
    assert len(widths) == 2 and max(len(w) for w in widths) > 1
    alone = kosimcse.encoding.encode(model, tok, [sentences[25]], 24)
    np.testing.assert_allclose(emb[25], alone[0], atol=1e-6)


def test_truncate_dim_equals_sentence_transformers_and_is_read_from_the_folder(kosimcse, sup_run, tmp_path):
    """--truncate_dim D: the first D dimensions, as SentenceTransformer(folder, truncate_dim=D).encode; a folder
    whose config_sentence_transformers.json records truncate_dim loads truncated; a D wider than the model fails."""
    import shutil
    from sentence_transformers import SentenceTransformer
    _, best = sup_run
    ev = evaluation_api(kosimcse)
    sentences = ["사과 바나나 포도.", "기차 역 승객 표 출발.", "고양이 강아지 산책."]
    full = ev.FolderEncoder(best).eval()
    cut = ev.FolderEncoder(best, truncate_dim=8).eval()
    ours = ev.encode(cut, cut.tokenizer, sentences, 24)
    assert ours.shape == (3, 8)
    np.testing.assert_allclose(ours, ev.encode(full, full.tokenizer, sentences, 24)[:, :8], atol=1e-6)
    theirs = SentenceTransformer(best, device="cpu", truncate_dim=8).encode(sentences)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    recorded = shutil.copytree(best, str(tmp_path / "recorded"))
    with open(os.path.join(recorded, "config_sentence_transformers.json"), "w") as f:
        json.dump({"truncate_dim": 8}, f)
    assert ev.FolderEncoder(recorded).truncate_dim == 8
    assert SentenceTransformer(recorded, device="cpu").encode(sentences).shape == (3, 8)
    with pytest.raises(ValueError, match="truncate_dim 64: the embeddings of .* have 32 dimensions"):
        ev.FolderEncoder(best, truncate_dim=64)

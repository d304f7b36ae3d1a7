# Copied from KoSimCSE/common/retrieval.py (whole file; delete this line to own it)
"""Retrieval evaluation: MTEB(kor)'s SQuADKorV1Retrieval and AutoRAGRetrieval rebuilt from local files,
and any folder in the BEIR layout; exact cosine search (faiss IndexFlatIP over L2-normalised rows) and
the IR metrics from pytrec_eval, as MTEB computes them.

A dataset is (corpus {doc_id: text}, queries {query_id: text}, qrels {query_id: {doc_id: score}}).
Document text follows MTEB: ``(title + " " + text).strip()`` when a title is present, else
``text.strip()``.

  korquad-dev  KorQuAD/KorQuAD_v1.0_dev.json: the corpus is the distinct paragraph contexts that have at
               least one question (960; the raw file has 961 distinct contexts, one of them without
               questions, and MTEB counts 960, each the positive of some query), each with its article
               title in front (MTEB's documents average 545.2 characters, min 352, max 2952: exactly
               title + " " + context); every question (5,774, stripped) has its own paragraph as the one
               relevant document. Document ids are ``korquad-<n>`` in file order, query ids KorQuAD's.
  autorag      AutoRAG/ocr_corpus_v3.parquet (doc_id, contents: 720 pages) and qa_v4.parquet (qid, query,
               retrieval_gt: a list of lists of doc_ids; 114 queries), read with pyarrow.
  <folder>     BEIR layout: corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}),
               qrels/test.tsv (header, then query-id, corpus-id, score), or qrels/dev.tsv in a folder
               that has no test split (a dev set for model selection, e.g. data/make_ict.py's). Queries
               without qrels are dropped, as MTEB's loader does.
"""
import json
import math
import os
import re
import time

import numpy as np
import torch

from common.data import STS_SPLITS, DataError, iter_lines, not_a_file, resolve_path
from common.encoding import encode
from common.index import build_faiss_index

K_VALUES = (1, 3, 5, 10, 20, 100)
TOP_K = 100
# name: (file or folder under --data_dir, MTEB task name, MTEB's dataset revision)
RETRIEVAL_DATASETS = {
    "korquad-dev": ("KorQuAD/KorQuAD_v1.0_dev.json", "SQuADKorV1Retrieval", "2b4ee1f3b143a04792da93a3df21933c5fe9eed3"),
    "autorag": ("AutoRAG", "AutoRAGRetrieval", "fd7df84ac089bbec763b1c6bb1b56e985df5cc5c"),
}


def doc_text(title, text):
    """MTEB's document string: title + " " + text when there is a title."""
    return f"{title} {text}".strip() if title else (text or "").strip()


def _require(path):
    if not os.path.isfile(path):
        raise not_a_file(path, " (point --data_dir at a folder that has it)")


def read_korquad(path):
    """(corpus, queries, qrels) of KorQuAD 1.0 dev as SQuADKorV1Retrieval builds them."""
    _require(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    corpus, doc_ids, queries, qrels = {}, {}, {}, {}
    for article in data.get("data", []):
        for paragraph in article["paragraphs"]:
            if not paragraph.get("qas"):
                continue  # not a positive of any question: MTEB's corpus has only the 960 positives
            context = paragraph["context"]
            if context not in doc_ids:
                doc_ids[context] = f"korquad-{len(doc_ids)}"
                corpus[doc_ids[context]] = doc_text(article.get("title"), context)
            for qa in paragraph["qas"]:
                question = qa["question"].strip()
                if not question:
                    raise DataError(f"{path}: question {qa['id']} is empty")
                if qa["id"] in queries:
                    raise DataError(f"{path}: question id {qa['id']} occurs twice")
                queries[qa["id"]] = question
                qrels[qa["id"]] = {doc_ids[context]: 1}
    return corpus, queries, qrels


def read_autorag(folder):
    """(corpus, queries, qrels) of the AutoRAG benchmark as AutoRAGRetrieval has them: doc_id and
    contents as given, qid and query, every doc_id in retrieval_gt relevant."""
    import pyarrow.parquet as pq
    corpus_path, qa_path = os.path.join(folder, "ocr_corpus_v3.parquet"), os.path.join(folder, "qa_v4.parquet")
    _require(corpus_path)
    _require(qa_path)
    corpus = {}
    for row, r in enumerate(pq.read_table(corpus_path, columns=["doc_id", "contents"]).to_pylist(), 1):
        if r["doc_id"] in corpus:
            raise DataError(f"{corpus_path}: row {row}: doc_id {r['doc_id']!r} occurs twice")
        corpus[r["doc_id"]] = doc_text(None, r["contents"])
    queries, qrels = {}, {}
    for row, r in enumerate(pq.read_table(qa_path, columns=["qid", "query", "retrieval_gt"]).to_pylist(), 1):
        query = (r["query"] or "").strip()
        if not query:
            raise DataError(f"{qa_path}: row {row}: query {r['qid']!r} is empty")
        relevant = {doc for group in r["retrieval_gt"] for doc in group}
        missing = sorted(relevant - corpus.keys())
        if missing:
            raise DataError(f"{qa_path}: row {row}: retrieval_gt names {missing[0]!r}, not in {corpus_path}")
        queries[r["qid"]] = query
        qrels[r["qid"]] = {doc: 1 for doc in relevant}
    return corpus, queries, qrels


def _jsonl(path):
    """(line number, id, object) of every non-blank line of a BEIR jsonl file; an id is a non-empty string or
    an integer (BEIR's exports hold both), read as a string."""
    if os.path.isdir(path) or not os.path.isfile(path):
        raise not_a_file(path)
    for lineno, line in iter_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "_id" not in obj:
            raise DataError(f"{path}:{lineno}: not a JSON object with an _id")
        doc_id = obj["_id"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
            raise DataError(f"{path}:{lineno}: _id {doc_id!r} is not a non-empty string or an integer")
        yield lineno, str(doc_id).strip(), obj


def _text_field(obj, key, path, lineno, required=True):
    """obj[key] as a string: a missing key (when ``required``), null or a non-string value is a DataError
    naming the file and line."""
    if key not in obj:
        if required:
            raise DataError(f"{path}:{lineno}: no {key!r} field")
        return ""
    value = obj[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: {key!r} is {type(value).__name__} {value!r}, not a string")
    return value


SCORE = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses


def read_beir(folder, split="test", log=print):
    """(corpus, queries, qrels) of a BEIR-layout folder. Every field is checked where it is read, with its
    line: ids (non-empty strings or integers, each once), texts (strings; a document may have an empty
    text, a query may not), qrels scores (integers; a pair judged twice with different scores is refused).
    Queries with no judgement above 0 are dropped, as MTEB does, and counted in one line (``log``); a file
    where no query has a relevant document is refused."""
    corpus_path, queries_path = os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "queries.jsonl")
    qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
    corpus, queries, qrels = {}, {}, {}
    for lineno, doc_id, obj in _jsonl(corpus_path):
        if doc_id in corpus:
            raise DataError(f"{corpus_path}:{lineno}: document {doc_id!r} occurs twice")
        corpus[doc_id] = doc_text(_text_field(obj, "title", corpus_path, lineno, required=False),
                                  _text_field(obj, "text", corpus_path, lineno))
    if not corpus:
        raise DataError(f"{corpus_path}: the corpus is empty (no document)")
    for lineno, query_id, obj in _jsonl(queries_path):
        text = _text_field(obj, "text", queries_path, lineno).strip()
        if not text:
            raise DataError(f"{queries_path}:{lineno}: query {query_id!r} is empty")
        if query_id in queries:
            raise DataError(f"{queries_path}:{lineno}: query {query_id!r} occurs twice")
        queries[query_id] = text
    if not queries:
        raise DataError(f"{queries_path}: no query")
    if os.path.isdir(qrels_path) or not os.path.isfile(qrels_path):
        raise not_a_file(qrels_path)
    for n, (lineno, line) in enumerate(iter_lines(qrels_path)):
        fields = [f.strip() for f in line.split("\t")]
        if n == 0 and not SCORE.fullmatch(fields[-1]):
            continue  # the header
        if len(fields) != 3 or not SCORE.fullmatch(fields[2]):
            raise DataError(f"{qrels_path}:{lineno}: expected query-id<TAB>corpus-id<TAB>integer score (ASCII "
                            f"digits), got {line.strip()!r}")
        query_id, doc_id, score = fields[0], fields[1], int(fields[2])
        if query_id not in queries:
            raise DataError(f"{qrels_path}:{lineno}: query {query_id!r} is not in {queries_path}")
        if doc_id not in corpus:
            raise DataError(f"{qrels_path}:{lineno}: document {doc_id!r} is not in {corpus_path}")
        earlier = qrels.get(query_id, {}).get(doc_id)
        if earlier is not None and earlier != score:
            raise DataError(f"{qrels_path}:{lineno}: query {query_id!r} and document {doc_id!r} are judged twice, "
                            f"{earlier} and {score}; keep one judgement")
        qrels.setdefault(query_id, {})[doc_id] = score
    if not qrels:
        raise DataError(f"{qrels_path}: no qrels")
    unjudged = {q for q, docs in qrels.items() if max(docs.values()) <= 0}
    if len(unjudged) == len(qrels):
        raise DataError(f"{qrels_path}: no query has a relevant document (every score is 0 or below), so every "
                        f"metric would be 0")
    if unjudged:
        log(f"{qrels_path}: {len(unjudged):,} of {len(qrels):,} judged queries have no relevant document (score "
            f"above 0); they are left out, as MTEB leaves them out")
    qrels = {q: docs for q, docs in qrels.items() if q not in unjudged}
    return corpus, {q: t for q, t in queries.items() if q in qrels}, qrels


def read_beir_pairs(folder):
    """Training pairs of a BEIR-layout folder: (query text, document text) for every qrels/train.tsv judgement
    with a positive score, in the file's order (pairs training, KoSimCSE --mode pairs)."""
    if not os.path.isfile(os.path.join(folder, "qrels", "train.tsv")):
        raise DataError(f"{folder}: no qrels/train.tsv (pairs training reads the train split of a BEIR folder: "
                        f"queries.jsonl, corpus.jsonl, qrels/train.tsv)")
    corpus, queries, qrels = read_beir(folder, "train")
    pairs = [(queries[q], corpus[d]) for q, docs in qrels.items() for d, score in docs.items() if score > 0]
    empty = next((d for q, docs in qrels.items() for d, score in docs.items() if score > 0 and not corpus[d]), None)
    if empty is not None:
        raise DataError(f"{folder}/corpus.jsonl: document {empty!r} has no text")
    if not pairs:
        raise DataError(f"{folder}/qrels/train.tsv: no judgement with a positive score, so no training pair")
    return pairs


def is_retrieval_dataset(name, data_dir):
    """A retrieval dataset name (korquad-dev, autorag) or a BEIR-layout folder."""
    if name in RETRIEVAL_DATASETS:
        return True
    return any(os.path.isfile(os.path.join(p, "corpus.jsonl")) for p in (name, os.path.join(data_dir, name)))


def beir_folder_problem(name, data_dir):
    """Why a folder ``name`` (as given, else under ``data_dir``) is not a BEIR folder, or None if there is no
    such folder: what a BEIR folder holds, and what this one has instead."""
    folder = next((p for p in (name, os.path.join(data_dir, name)) if os.path.isdir(p)), None)
    if folder is None:
        return None
    corpus = os.path.join(folder, "corpus.jsonl")
    if os.path.isdir(corpus):
        return f"{corpus} is a directory, not a file"
    near = sorted(f for f in os.listdir(folder) if f.startswith(("corpus", "queries", "qrels")))
    if not near:  # nothing of a BEIR folder: most likely an STS file's path that is a folder
        return (f"{folder}: is a directory, not a file (an STS set is a file; a retrieval set a BEIR folder with "
                f"corpus.jsonl, queries.jsonl and qrels/test.tsv)")
    return (f"{folder} is a folder without corpus.jsonl (it has {', '.join(near)}); a BEIR folder holds "
            f"corpus.jsonl, queries.jsonl and qrels/test.tsv")


def route_datasets(parser, names, data_dir, default_sts=("korsts-test",), default_retrieval=("autorag", "korquad-dev")):
    """(STS sets, retrieval sets) of evaluation.py's --dataset ``names`` (each once, in order); none given: the
    defaults. A name is an STS set (korsts-test, ...) or file, or a retrieval set (korquad-dev, autorag) or BEIR
    folder; anything else is refused with parser.error naming the known sets or what a folder lacks, so a typo
    never runs something else."""
    names = list(dict.fromkeys(names or []))
    if not names:
        return list(default_sts), list(default_retrieval)
    for name in names:
        if not (name in STS_SPLITS or is_retrieval_dataset(name, data_dir) or os.path.isfile(resolve_path(name, data_dir))):
            parser.error(f"--dataset {name}: " + (beir_folder_problem(name, data_dir) or (
                f"not a known set, a file or a BEIR folder (STS: {', '.join(STS_SPLITS)} or a KorSTS / KLUE-STS "
                f"file; retrieval: {', '.join(RETRIEVAL_DATASETS)} or a folder with corpus.jsonl, queries.jsonl "
                f"and qrels/test.tsv)")))
    retrieval = [n for n in names if is_retrieval_dataset(n, data_dir)]
    return [n for n in names if n not in retrieval], retrieval


def load_retrieval(name, data_dir):
    """(task name, MTEB dataset revision or None, corpus, queries, qrels) of ``name``."""
    if name in RETRIEVAL_DATASETS:
        rel, task, revision = RETRIEVAL_DATASETS[name]
        path = os.path.join(data_dir, rel)
        return (task, revision) + (read_korquad(path) if name == "korquad-dev" else read_autorag(path))
    folder = name if os.path.isfile(os.path.join(name, "corpus.jsonl")) else os.path.join(data_dir, name)
    qrels = os.path.join(folder, "qrels")
    split = "dev" if not os.path.isfile(os.path.join(qrels, "test.tsv")) and os.path.isfile(
        os.path.join(qrels, "dev.tsv")) else "test"
    return (os.path.basename(os.path.normpath(folder)), None) + read_beir(folder, split)


def scores_to_run(scores, ids, doc_ids, query_ids):
    """pytrec_eval's run {query_id: {doc_id: score}} from per-query (scores, row ids)."""
    return {q: {doc_ids[int(i)]: float(s) for s, i in zip(row_s, row_i) if i >= 0}
            for q, row_s, row_i in zip(query_ids, scores, ids)}


def _trec_order(docs):
    """trec_eval's ranking of a query's {doc_id: score}: score descending, ties by doc_id descending."""
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def compute_metrics(qrels, run, k_values=K_VALUES):
    """MTEB's retrieval scores of ``run`` against ``qrels``, averaged over the queries of qrels (a query
    with no results scores 0): ndcg/map/recall/precision at k from pytrec_eval (ndcg_cut, map_cut,
    recall, P), mrr at k as MTEB: the reciprocal rank of the first relevant document within the top k,
    ties ordered as pytrec_eval orders them (pytrec_eval's recip_rank over the run cut at k). Rounded
    to 5 decimals as MTEB stores them; main_score = ndcg_at_10."""
    import pytrec_eval
    ks = ",".join(str(k) for k in k_values)
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{ks}", f"map_cut.{ks}", f"recall.{ks}", f"P.{ks}"})
    per_query = evaluator.evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    n = len(qrels)
    out = {}
    for name, measure in (("ndcg", "ndcg_cut"), ("map", "map_cut"), ("recall", "recall"), ("precision", "P")):
        for k in k_values:
            out[f"{name}_at_{k}"] = sum(v[f"{measure}_{k}"] for v in per_query.values()) / n
    for k in k_values:
        cut = {q: dict(_trec_order(docs)[:k]) for q, docs in run.items()}
        out[f"mrr_at_{k}"] = sum(v["recip_rank"] for v in rr.evaluate(cut).values()) / n
    out = {key: round(value, 5) for key, value in out.items()}
    out["main_score"] = out.get("ndcg_at_10")
    return out


def exact_search(query_emb, passage_emb, top_k=TOP_K):
    """(scores, ids) of the top_k passages per query by cosine: faiss IndexFlatIP over L2-normalised rows."""
    normalize = lambda x: torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=-1).numpy()
    index, _ = build_faiss_index(normalize(passage_emb), "flat")
    return index.search(np.ascontiguousarray(normalize(query_emb)), min(top_k, len(passage_emb)))


def evaluate_retrieval(encoder, tokenizer, corpus, queries, qrels, max_len, batch_size=64, device="cpu",
                       query_prefix="", passage_prefix="", top_k=TOP_K, log=print):
    """(metrics, info) of one dataset: passages (with ``passage_prefix``) and queries (with
    ``query_prefix``) encoded at ``max_len``, each distinct text once, searched exactly."""
    start = time.time()
    doc_ids, query_ids = list(corpus), list(queries)
    passage_stats, query_stats = {}, {}
    passage_emb = encode(encoder, tokenizer, [passage_prefix + corpus[d] for d in doc_ids], max_len, batch_size,
                         device, desc="encode passages", stats=passage_stats)
    query_emb = encode(encoder, tokenizer, [query_prefix + queries[q] for q in query_ids], max_len, batch_size,
                       device, desc="encode queries", stats=query_stats)
    scores, ids = exact_search(query_emb, passage_emb, top_k)
    metrics = compute_metrics(qrels, scores_to_run(scores, ids, doc_ids, query_ids))
    info = {"n_docs": len(doc_ids), "n_queries": len(query_ids), "max_len": int(max_len),
            "passages_truncated": passage_stats["truncated"], "queries_truncated": query_stats["truncated"],
            "top_k": int(min(top_k, len(doc_ids))), "evaluation_time": round(time.time() - start, 2)}
    log(f"{len(doc_ids):,} passages ({info['passages_truncated']:,} truncated at {max_len} tokens), "
        f"{len(query_ids):,} queries ({info['queries_truncated']:,} truncated); {info['evaluation_time']:.1f} s")
    return metrics, info


def mteb_result(task_name, metrics, evaluation_time, dataset_revision=None):
    """One task's result in MTEB's result-file layout (results/<org>__<model>/<revision>/<Task>.json)."""
    return {"dataset_revision": dataset_revision, "task_name": task_name, "mteb_version": None,
            "scores": {"test": [dict(metrics, hf_subset="default", languages=["kor-Hang"])]},
            "evaluation_time": evaluation_time, "kg_co2_emissions": None}


def format_retrieval_table(rows):
    """A text table: one line per dataset, nDCG@10, MRR@10, MAP@10, Recall@1/5/10/100 (x100)."""
    cols = [("nDCG@10", "ndcg_at_10"), ("MRR@10", "mrr_at_10"), ("MAP@10", "map_at_10"), ("R@1", "recall_at_1"),
            ("R@5", "recall_at_5"), ("R@10", "recall_at_10"), ("R@100", "recall_at_100")]
    width = max([len("dataset")] + [len(r["dataset"]) for r in rows])
    lines = ["dataset".ljust(width) + "".join(f"{c:>9}" for c, _ in cols)]
    for r in rows:
        vals = [r["metrics"].get(key) for _, key in cols]
        lines.append(r["dataset"].ljust(width) + "".join(
            f"{'-':>9}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:9.2f}" for v in vals))
    return "\n".join(lines)

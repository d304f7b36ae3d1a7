# Copied from KoSimCSE/evaluation.py (whole file; delete this line to own it)
"""Evaluate a sentence-embedding model folder.

  --task sts      the 8 numbers of the Korean tables (Pearson/Spearman x cosine/euclidean/manhattan/
                  dot, x100) and their AVG on KorSTS test/dev, KLUE-STS dev or any STS file, under
                  the ``standard`` protocol (correlations over the whole set, as sentence-transformers'
                  EmbeddingSimilarityEvaluator) and/or BM-K's ``bmk`` protocol (correlations per
                  shuffled batch of --batch_size pairs, averaged over batches, as BM-K's KoSimCSE,
                  KoSentenceT5 and KoDiffCSE tables were computed).
  --task search   semantic search of queries against a corpus file, streamed in chunks so that a
                  1,000,000-sentence corpus needs memory for one chunk only; with --index_dir, against
                  an index built by --task index instead (the corpus is not encoded again).
  --task index    encode a corpus file once into --index_dir (embeddings, line offsets, a faiss index: flat =
                  exact, hnsw, ivf); a killed build resumes; searches must use the model, pooling, max_len
                  and prefixes it was built with (common/index.py).
  --task retrieval  MTEB-style retrieval on --dataset korquad-dev (SQuADKorV1Retrieval), autorag
                  (AutoRAGRetrieval) or a BEIR-layout folder: passages (--passage_prefix) and queries
                  (--query_prefix) at the model's max length, exact cosine top 100 (faiss IndexFlatIP),
                  nDCG@10 (main), MRR@10, MAP@10, Recall@1/5/10/100 from pytrec_eval; --output_json rows,
                  --mteb_dir one <Task>.json per dataset in MTEB's result layout.
  --task mine     hard negatives for the (anchor, positive) pairs of --pairs_file against --corpus_file,
                  with sentence-transformers' mine_hard_negatives filters, written as a triplet TSV that
                  train.py --mode sup reads (common/mining.py).
  --task cluster  seeded KMeans over sentence embeddings, printed as in the KoSBERT example, plus a
                  2-D PNG of the sentences coloured by cluster.

Prefixes, as asymmetric models such as multilingual-e5 expect them: --query_prefix goes before every
query (search) and every sentence of the symmetric tasks (sts, cluster), --passage_prefix before every
corpus sentence (search, index): ``--query_prefix "query: " --passage_prefix "passage: "`` for e5.

The model folder is read the way sentence-transformers reads it (modules.json: Transformer ->
Pooling -> [Dense] -> [Normalize]), so the embeddings here are the ones
``SentenceTransformer(folder).encode`` gives; a plain Hugging Face folder needs --pooling. Several tasks
may be given (``--task sts search``): they run in that order on one loaded model. The work is done in
common/ (sts.py, search.py, index.py, retrieval.py, mining.py, folder.py); this file is the command line.
"""
import argparse
import functools
import os
import sys

import torch

from common.data import DEFAULT_DATA_DIR, DataError, read_sts, resolve_path
from common.files import check_device, one_line_errors, require_file, save_json_atomic
from common.folder import BACKENDS, FolderEncoder
from common.index import add_index_args, load_index, run_index
from common.mining import add_mining_args, check_mining_args, run_mine
from common.model_card import write_model_card
from common.retrieval import evaluate_retrieval, format_retrieval_table, load_retrieval, mteb_result, route_datasets
from common.search import run_cluster, run_search
from common.sts import evaluate_sts, format_table

TASKS = ("sts", "search", "index", "cluster", "retrieval", "mine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="saved model folder (ours or any sentence-transformers "
                   "folder), or a Hugging Face model folder/id together with --pooling")
    p.add_argument("--task", nargs="+", choices=TASKS, default=["sts"],
                   help="index: encode --corpus_file once into --index_dir; search: with --index_dir, "
                        "answer from that index, else stream --corpus_file; several run in order on one loaded "
                        "model (default: sts)")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="folder with KorSTS/, KLUE-STS/ (default: %(default)s)")
    p.add_argument("--dataset", nargs="+", default=None,
                   help="sts: korsts-test, korsts-dev, klue-sts-dev, or a path to a KorSTS-style TSV / KLUE-STS "
                        "CSV or JSON (default: korsts-test); retrieval: korquad-dev, autorag or a BEIR-layout folder "
                        "(default: autorag korquad-dev); several may be given, each goes to the task it belongs to")
    p.add_argument("--protocol", nargs="+", choices=("standard", "bmk"), default=["standard"],
                   help="standard: correlations over the whole set; bmk: BM-K's per-batch average over "
                        "shuffled batches of --batch_size pairs (default: standard)")
    p.add_argument("--batch_size", type=int, default=256,
                   help="encoding batch size, and the correlation batch of the bmk protocol (BM-K: 256)")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed of the bmk protocol; KMeans seed")
    p.add_argument("--truncate_dim", type=int, nargs="+", default=None,
                   help="keep the first D dimensions of every embedding (a Matryoshka model; sentence-transformers' "
                        "truncate_dim), for every task (default: the folder's own truncate_dim, else all); several "
                        "(sts and retrieval only): each task scored at each D from one encoding, a row per D")
    p.add_argument("--max_len", type=int, default=None,
                   help="max tokens per sentence (default: max_seq_length of the folder, else 512)")
    p.add_argument("--pooling", choices=("cls", "mean", "pooler"), default=None,
                   help="pooling of a folder without modules.json, in sentence-transformers' names: cls = the raw "
                        "[CLS] vector (train.py's cls_before_pooler), mean, pooler = the checkpoint's pooler_output")
    p.add_argument("--query_prefix", default=None,
                   help="text put before every query and every sts/cluster sentence (e5: 'query: '; default: the "
                        "folder's \"query\" prompt in config_sentence_transformers.json, else none, or the index's with "
                        "--index_dir)")
    p.add_argument("--passage_prefix", default=None,
                   help="text put before every corpus sentence of search and index (e5: 'passage: '; default: the "
                        "folder's \"passage\" prompt (utils/set_prompts.py records them), else none, or the index's "
                        "with --index_dir)")
    p.add_argument("--output_json", default=None, help="write the result rows here (sts and retrieval tasks)")
    p.add_argument("--mteb_dir", default=None, help="retrieval: write one <Task>.json per dataset here, in MTEB's "
                   "result layout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="torch, or the folder's ONNX export "
                   "(utils/export_onnx.py) run by onnxruntime on the CPU: onnx (float32), onnx-int8 (dynamic int8)")
    p.add_argument("--corpus_file", default=None, help="search: one sentence per line (default: the README example corpus)")
    p.add_argument("--queries", nargs="+", default=None, help="search: query sentences (default: the README examples)")
    p.add_argument("--queries_file", default=None, help="search: one query per line")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--chunk_size", type=int, default=20_000,
                   help="search/index: corpus lines encoded at a time; index: also the unit of resuming (default: %(default)s)")
    p.add_argument("--index_dir", default=None, help="index: folder to build the index in (a killed build "
                   "resumes there); search: answer from this index instead of streaming a corpus")
    add_index_args(p)
    add_mining_args(p)
    p.add_argument("--sentences_file", default=None,
                   help="cluster: one sentence per line (default: the example corpus + queries)")
    p.add_argument("--num_clusters", type=int, default=5)
    p.add_argument("--plot", default=None, help="cluster: PNG path (default: clusters.png beside --output_json, else ./clusters.png)")
    args = p.parse_args(argv)
    for name, least in (("batch_size", 1), ("top_k", 1), ("chunk_size", 1), ("num_clusters", 1), ("max_len", 2),
                        ("num_negatives", 1), ("range_max", 1), ("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1), ("nlist", 1), ("nprobe", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            p.error(f"--{name} {value}: must be at least {least}")
    check_device(p, args.device)
    if args.backend != "torch" and args.device != "cpu":
        p.error(f"--backend {args.backend} runs on the CPU (onnxruntime's CPU provider): use --device cpu")
    if args.truncate_dim:
        args.truncate_dim = list(dict.fromkeys(args.truncate_dim))  # each width scored once
    if args.truncate_dim and min(args.truncate_dim) < 1:
        p.error(f"--truncate_dim {min(args.truncate_dim)}: must be at least 1")
    if args.truncate_dim and len(args.truncate_dim) > 1 and set(args.task) - {"sts", "retrieval"}:
        p.error("several --truncate_dim values are for --task sts and retrieval; index, search, cluster and mine "
                "take one")
    if "index" in args.task and not (args.corpus_file and args.index_dir):
        p.error("--task index needs --corpus_file and --index_dir")
    if "mine" in args.task and not (args.pairs_file and args.output_file):
        p.error("--task mine needs --pairs_file and --output_file")
    if "mine" in args.task:
        check_mining_args(p, args)
    if "index" in args.task and "search" in args.task:
        p.error("--task index and search: build the index first, then search it with --task search --index_dir")
    args.sts_datasets, args.retrieval_datasets = route_datasets(p, args.dataset, args.data_dir)
    if "sts" in args.task and not args.sts_datasets:
        p.error("--task sts: --dataset names no STS set (korquad-dev, autorag and BEIR folders are retrieval sets)")
    if "retrieval" in args.task and not args.retrieval_datasets:
        p.error("--task retrieval: --dataset names no retrieval set (korquad-dev, autorag or a BEIR folder); name "
                "the retrieval sets too, or leave --dataset out for autorag and korquad-dev")
    if "retrieval" in args.task and args.index_dir:
        p.error("--task retrieval searches exactly over its own corpus; --index_dir is not used there")
    if "search" in args.task and args.index_dir and args.corpus_file:
        p.error("--task search: give --index_dir (the index knows its corpus) or --corpus_file, not both")
    return args


def run_sts(args, encoder, max_len):
    """The 8 metrics of every --dataset under every --protocol: printed, written to --output_json, and
    merged into the model card of one of our training runs."""
    rows = []
    for name in args.sts_datasets:
        prefix = args.query_prefix or ""
        pairs = [(prefix + a, prefix + b, s) for a, b, s in read_sts(resolve_path(name, args.data_dir))]
        stats = {}
        results = evaluate_sts(encoder, encoder.tokenizer, pairs, max_len, args.batch_size, args.device, args.protocol,
                               args.seed, stats)
        print(f"{name}: {len(pairs):,} pairs; {stats['truncated']} of {stats['sentences']:,} distinct sentences "
              f"truncated at --max_len {max_len}")
        for protocol, metrics in results.items():
            rows.append({"model": args.model_dir.rstrip("/"), "dataset": name, "protocol": protocol,
                         "n_pairs": len(pairs), "batch_size": args.batch_size if protocol == "bmk" else None,
                         "seed": args.seed if protocol == "bmk" else None, "max_len": max_len,
                         "n_truncated": stats["truncated"], "prefix": prefix,
                         "truncate_dim": encoder.truncate_dim, "metrics": metrics})
    print(format_table(rows))
    if os.path.isfile(os.path.join(args.model_dir, "training.json")) and not (args.query_prefix or args.truncate_dim):
        try:
            write_model_card(args.model_dir, rows)  # one of our training runs: its card gets these rows
        except OSError as e:  # a read-only or full model folder: the metrics above stand, the card stays as it was
            print(f"warning: could not update the model card of {args.model_dir} (README.md, eval_results.json): "
                  f"{e.strerror or e}; both are unchanged", file=sys.stderr)
    return rows


def run_retrieval(args, encoder, max_len, datasets, publish):
    """nDCG@10, MRR@10, MAP@10, Recall@k of every retrieval dataset (name: load_retrieval's tuple), one after
    the other: each dataset's row is published (printed, --output_json) and its MTEB file written before the
    next starts, so a failed write loses no finished dataset and the error says where each one is."""
    rows, mteb_files = [], []
    query_prefix, passage_prefix = args.query_prefix or "", args.passage_prefix or ""
    for name, (task, revision, corpus, queries, qrels) in datasets.items():
        print(f"{name} ({task}):", end=" ")
        metrics, info = evaluate_retrieval(encoder, encoder.tokenizer, corpus, queries, qrels, max_len,
                                           args.batch_size, args.device, query_prefix, passage_prefix)
        rows.append({"model": args.model_dir.rstrip("/"), "task": "retrieval", "dataset": name, "mteb_task": task,
                     "query_prefix": query_prefix, "passage_prefix": passage_prefix, **info,
                     "truncate_dim": encoder.truncate_dim, "metrics": metrics})
        print(format_retrieval_table(rows[-1:]))
        publish(rows[-1:])
        if args.mteb_dir:  # several --truncate_dim values: one folder per dimension
            mteb_dir = (os.path.join(args.mteb_dir, f"dim{encoder.truncate_dim}") if len(args.truncate_dim or ()) > 1
                        else args.mteb_dir)
            path = os.path.join(mteb_dir, f"{task}.json")
            try:
                os.makedirs(mteb_dir, exist_ok=True)
                save_json_atomic(path, mteb_result(task, metrics, info["evaluation_time"], revision))
            except OSError as e:
                where = [f"--output_json {args.output_json} holds the rows of {', '.join(r['dataset'] for r in rows)}"
                         ] if args.output_json else [f"the scores of {', '.join(r['dataset'] for r in rows)} are "
                                                      f"printed above"]
                where += [f"{', '.join(mteb_files)} written"] if mteb_files else []
                sys.exit(f"error: could not write {path}: {e.strerror or e}; " + "; ".join(where)
                         + (f"; {', '.join(n for n in datasets if n not in {r['dataset'] for r in rows})} not run"
                            if len(rows) < len(datasets) else ""))
            mteb_files.append(path)
    if len(rows) > 1:
        print(format_retrieval_table(rows))


def main(argv=None):
    args = parse_args(argv)
    index = None
    if "index" in args.task:  # bad input fails before the model is loaded
        require_file(args.corpus_file)
    elif "search" in args.task and args.index_dir:
        index = load_index(args.index_dir, args.nprobe, args.ef_search, verify_corpus=args.verify_corpus or None)
    retrieval = ({name: load_retrieval(name, args.data_dir) for name in args.retrieval_datasets}
                 if "retrieval" in args.task else {})
    try:
        encoder = FolderEncoder(args.model_dir, pooling=args.pooling, backend=args.backend)
        encoder = encoder.to(args.device).eval()
        dims = args.truncate_dim or [encoder.truncate_dim]  # given, else the folder's own (None: all)
        for dim in dims:
            encoder.set_truncate_dim(dim)  # a dim wider than the model fails here, before any work
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load model from {args.model_dir}: {' '.join(str(e).split())}")  # one line
    max_len = args.max_len or encoder.max_len or 512
    for flag, name in (("query_prefix", "query"), ("passage_prefix", "passage")):  # the folder's prompts
        if getattr(args, flag) is None and encoder.prompts.get(name) is not None:
            setattr(args, flag, encoder.prompts[name])
            print(f"--{flag} {encoder.prompts[name]!r}: the folder's {name!r} prompt")
    rows = []

    def publish(new_rows):  # finished rows reach --output_json at once: a later failure cannot lose them
        rows.extend(new_rows)
        if args.output_json and new_rows:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
                save_json_atomic(args.output_json, rows)  # a failed write leaves an earlier file whole
            except OSError as e:
                sys.exit(f"error: could not write --output_json {args.output_json}: {e.strerror or e}; the results "
                         f"are printed above and any earlier file there is unchanged")
    runs = {"sts": run_sts, "index": run_index, "search": functools.partial(run_search, index=index),
            "cluster": run_cluster, "mine": run_mine,
            "retrieval": functools.partial(run_retrieval, datasets=retrieval, publish=publish)}
    encoder.cache = {} if len(dims) > 1 else None  # several dims: every batch is encoded once, at full width
    for dim in dims:
        encoder.set_truncate_dim(dim)
        if len(dims) > 1:
            print(f"--truncate_dim {dim}:")
        for task in dict.fromkeys(args.task):  # in the order given, each once
            result = runs[task](args, encoder, max_len)
            if task == "sts":
                publish(result)


if __name__ == "__main__":
    one_line_errors(main, DataError)  # one line per error, the traceback to a file

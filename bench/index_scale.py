"""Index once, query many: KoSimCSE/evaluation.py --task index / --task search --index_dir on the
1,000,000-sentence wiki corpus.

    python bench/index_scale.py --corpus ../shared/data/wiki/wiki_corpus.txt \\
        --tokenizer ../shared/tokenizers/klue-roberta-base --work_dir /tmp/index_scale

Measures, each job in its own process so that its peak RSS (ru_maxrss from wait4) is its own:
  1. encoding throughput of the CLI build on the first 20k sentences (and the 1M build time it
     predicts; stops if that exceeds --max_build_minutes);
  2. the 1M flat build through the CLI, SIGKILLed once part-way (after --kill_after_chunks chunks
     and a moment into the next) and rerun: the rerun must say it resumed, the count must be the
     corpus' and spot-checked chunks (one saved before the kill, the last one) must equal a fresh
     encode of the same chunk byte for byte;
  3. hnsw and ivf (and a float16 flat) indexes built from the *same* stored embeddings
     (build_faiss_index over the memory-mapped embeddings.npy; the encoding is not repeated);
  4. per index: load time, peak RSS of a search process, latency p50/p95 of 1 query and of a batch
     of 100 queries (with and without query encoding), and for hnsw/ivf/fp16 the recall@10 against
     exact search, over --num_queries held-out wiki sentences (removed from the indexed corpus).

The encoder is a random-init BERT with the real KLUE vocabulary, deliberately tiny (--layers,
--hidden): the figures are index mechanics (I/O, faiss, memory), not retrieval quality. Scale the
build time to another model by its encoding throughput. Results: <work_dir>/results.json and a
markdown table on stdout. OMP_WAIT_POLICY=PASSIVE is set for every job (on a shared 2-core machine
the default spinning OpenMP barrier of torch and faiss slows small kernels 10-100x when the other
core is busy).
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ itself, also when imported by path
from benchio import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATION = os.path.join(ROOT, "KoSimCSE", "evaluation.py")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/faiss load their OpenMP runtimes
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")


def _evaluation():
    """KoSimCSE's evaluation CLI and the common modules it drives, as one namespace."""
    sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
    import types
    import evaluation
    from common import data, encoding, folder, index, search
    names = {}
    for module in (data, encoding, folder, search, index, evaluation):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    return types.SimpleNamespace(**names)


def run(cmd, log_file, kill=None):
    """Run ``cmd`` (output to ``log_file``); ``kill()`` polled every 50 ms says when to SIGKILL it.
    Returns (returncode, wall seconds, peak RSS in MiB, output). Heavy work happens in such
    children only: Linux carries the parent's RSS into a child's ru_maxrss across fork+exec, so
    this process imports neither torch nor numpy."""
    start = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        while kill is not None and proc.poll() is None:
            if kill():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(log_file) as f:
        out = f.read()
    return proc.returncode, time.time() - start, usage.ru_maxrss / 1024, out


def check(result, what):
    if result[0] != 0:
        sys.exit(f"{what} failed (rc {result[0]}):\n{result[3][-3000:]}")
    return result


def build_model(tokenizer_dir, out, layers, hidden):
    """A random-init BERT (seed 0) with the tokenizer's vocabulary and mean pooling, saved with
    modules.json so that --pooling is not needed."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                                max_position_embeddings=514, pad_token_id=tok.pad_token_id))
    bert.save_pretrained(out)
    tok.save_pretrained(out)
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    write_json(os.path.join(out, "modules.json"),
               [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    write_json(os.path.join(out, "1_Pooling", "config.json"),
               {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    return sum(p.numel() for p in bert.parameters())


def split_corpus(corpus, work, num_queries, seed=0):
    """work/corpus.txt = the corpus minus ``num_queries`` seeded random lines, which go to
    work/queries.txt (held out: the index does not contain them); work/corpus_20k.txt = the first
    20k lines. Streamed, so that this process stays small (its children's ru_maxrss starts from it)."""
    with open(corpus, "rb") as f:
        total = sum(1 for line in f if line.strip())
    held = set(random.Random(seed).sample(range(total), num_queries))
    with open(corpus, "rb") as f, open(os.path.join(work, "corpus.txt"), "wb") as c, \
            open(os.path.join(work, "queries.txt"), "wb") as q, open(os.path.join(work, "corpus_20k.txt"), "wb") as s:
        for i, line in enumerate(line for line in f if line.strip()):
            (q if i in held else c).write(line)
            if i < 20_000:
                s.write(line)
    return total - num_queries


def index_cmd(model, corpus, index_dir, args, *extra):
    return [sys.executable, EVALUATION, "--model_dir", model, "--task", "index", "--corpus_file", corpus,
            "--index_dir", index_dir, "--max_len", str(args.max_len), "--chunk_size", str(args.chunk_size),
            "--device", "cpu", *extra]


def worker_faiss(index_dir, source_dir, kind, dtype):
    """Job: an index of type ``kind`` in ``index_dir`` over the embeddings of ``source_dir`` (hard
    links to its embeddings.npy / offsets.npy, or a float16 copy), meta copied with the new index."""
    import numpy as np
    ev = _evaluation()
    os.makedirs(index_dir, exist_ok=True)
    with open(os.path.join(source_dir, ev.INDEX_META)) as f:
        meta = json.load(f)
    emb_path = os.path.join(index_dir, ev.INDEX_FILES["embeddings"])
    for name in ("embeddings", "offsets"):
        target = os.path.join(index_dir, ev.INDEX_FILES[name])
        if not os.path.exists(target) and not (name == "embeddings" and dtype != meta["dtype"]):
            os.link(os.path.join(source_dir, ev.INDEX_FILES[name]), target)
    source = np.load(os.path.join(source_dir, ev.INDEX_FILES["embeddings"]), mmap_mode="r")
    if dtype != meta["dtype"]:
        out = np.lib.format.open_memmap(emb_path, mode="w+", dtype=dtype, shape=source.shape)
        for start in range(0, len(source), 100_000):
            out[start:start + 100_000] = source[start:start + 100_000].astype(dtype)
        out.flush()
        del out
    start = time.time()
    meta["index"] = ev.write_faiss_index(index_dir, np.load(emb_path, mmap_mode="r"), kind, dtype)
    meta.update(dtype=dtype, faiss_seconds=round(time.time() - start, 1),
                note=f"faiss index built from the embeddings of {source_dir} by bench/index_scale.py")
    ev.save_json_atomic(os.path.join(index_dir, ev.INDEX_META), meta)
    print(json.dumps({"faiss_seconds": meta["faiss_seconds"], "index": meta["index"]}))


def percentiles(times):
    import numpy as np
    return {"p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
            "p95_ms": round(float(np.percentile(times, 95)) * 1e3, 2)}


def worker_search(index_dir, model, queries_file, out_file, max_len, sweep):
    """Job: load the index, time queries, save the top-10 ids of every query (for recall)."""
    import torch
    ev = _evaluation()
    queries = [line.strip() for line in open(queries_file, encoding="utf-8")]
    t = time.time()
    encoder = ev.FolderEncoder(model).eval()
    model_seconds = time.time() - t
    t = time.time()
    index = ev.load_index(index_dir)
    ev.check_index_recipe(index, model, encoder, max_len, "", "")
    load_seconds = time.time() - t
    tok = encoder.tokenizer

    def answer(qs, emb=None):
        if emb is None:
            return ev.index_search(encoder, tok, qs, index, top_k=10, max_len=max_len, batch_size=128)
        scores, ids = ev.search_vectors(index, emb, 10)
        wanted = sorted({int(i) for row in ids for i in row})
        ev.read_lines_at(index["meta"]["corpus"]["path"], index["offsets"][wanted])
        return ids

    with torch.inference_mode():
        emb = ev.encode_queries(encoder, tok, queries, max_len, 128)
        t = time.time()
        first = answer(queries[:1])
        first_query_seconds = time.time() - t
        timings = {}
        for label, with_encoding in (("with_encoding", True), ("search_only", False)):
            single = []
            for i in range(len(queries)):
                t = time.time()
                answer(queries[i:i + 1], None if with_encoding else emb[i:i + 1])
                single.append(time.time() - t)
            batch = []
            for rep in range(10):
                lo = 100 * (rep % 2)
                t = time.time()
                answer(queries[lo:lo + 100], None if with_encoding else emb[lo:lo + 100])
                batch.append(time.time() - t)
            timings[label] = {"1": percentiles(single), "100": percentiles(batch)}
        _, ids = ev.search_vectors(index, emb, 10)
        result = {"model_seconds": round(model_seconds, 2), "load_seconds": round(load_seconds, 3),
                  "first_query_seconds": round(first_query_seconds, 3), "first_hit": first[0][0][2],
                  "timings": timings, "ids": [row.tolist() for row in ids], "sweep": {}}
        faiss_index, kind = index["faiss"], index["meta"]["index"]["type"]
        for value in sweep if kind in ("hnsw", "ivf") else []:
            if kind == "ivf":
                faiss_index.nprobe = value
            else:
                faiss_index.hnsw.efSearch = value
            single = []
            for i in range(len(queries)):
                t = time.time()
                ev.search_vectors(index, emb[i:i + 1], 10)
                single.append(time.time() - t)
            result["sweep"][value] = {"ids": [row.tolist() for row in ev.search_vectors(index, emb, 10)[1]],
                                      **percentiles(single)}
    write_json(out_file, result)


def recall_at_10(ids, exact):
    return sum(len(set(a) & set(b)) for a, b in zip(ids, exact)) / (10 * len(exact))


def spot_check(model, corpus, index_dir, chunk_size, max_len, chunks):
    """{chunk: (bytes equal, max |diff|)} between the stored rows of ``chunks`` and a fresh encode of
    the same chunk (as the build encodes it: same boundaries, batch size 256, normalised)."""
    import numpy as np
    import torch
    ev = _evaluation()
    encoder = ev.FolderEncoder(model).eval()
    index = ev.load_index(index_dir)
    out = {}
    for c in chunks:
        lo, hi = c * chunk_size, min(len(index["offsets"]), (c + 1) * chunk_size)
        sentences = ev.read_lines_at(corpus, index["offsets"][lo:hi])
        fresh = torch.nn.functional.normalize(torch.from_numpy(
            ev.encode(encoder, encoder.tokenizer, sentences, max_len, 256)), dim=-1).numpy().astype(index["meta"]["dtype"])
        stored = np.asarray(index["embeddings"][lo:hi])
        out[c] = (bool(np.array_equal(fresh.view(np.uint8), stored.view(np.uint8))),
                  float(np.abs(fresh.astype(np.float64) - stored).max()))
    return out


def mib(path):
    return os.path.getsize(path) / 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="one sentence per line (the 1M wiki corpus)")
    p.add_argument("--tokenizer", help="tokenizer folder (the KLUE 32k vocabulary)")
    p.add_argument("--work_dir", help="model, corpus split, indexes and logs go here (several GB)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--chunk_size", type=int, default=20_000)
    p.add_argument("--num_queries", type=int, default=200, help="held-out wiki sentences used as queries")
    p.add_argument("--kill_after_chunks", type=int, default=20, help="SIGKILL the 1M build once this many chunks are saved")
    p.add_argument("--max_build_minutes", type=float, default=40, help="stop if the 20k throughput predicts a longer build")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "model":
            return print(build_model(rest[0], rest[1], int(rest[2]), int(rest[3])))
        if kind == "spot":
            spots = spot_check(*rest[:3], int(rest[3]), int(rest[4]), [int(c) for c in rest[5:]])
            return print(json.dumps(spots))
        if kind == "faiss":
            return worker_faiss(*rest)
        if kind == "baseline":  # the search job without an index: imports, model, query encoding
            ev = _evaluation()
            encoder = ev.FolderEncoder(rest[0]).eval()
            queries = [line.strip() for line in open(rest[1], encoding="utf-8")]
            return ev.encode_queries(encoder, encoder.tokenizer, queries, int(rest[2]), 128)
        return worker_search(rest[0], rest[1], rest[2], rest[3], int(rest[4]), [int(v) for v in rest[5:]])
    if not (args.corpus and args.tokenizer and args.work_dir):
        p.error("--corpus, --tokenizer and --work_dir are required")

    worker = [sys.executable, os.path.abspath(__file__), "--worker"]
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    model, logs = os.path.join(work, "model"), os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpus": os.cpu_count(), "argv": sys.argv,
               "model": f"random-init BERT, {args.layers} layers, hidden {args.hidden}, KLUE vocab, mean pooling",
               "max_len": args.max_len, "chunk_size": args.chunk_size}
    r = check(run([*worker, "model", args.tokenizer, model, str(args.layers), str(args.hidden)],
                  os.path.join(logs, "model.log")), "model")
    results["model_params"] = int(r[3].strip().splitlines()[-1])
    n = split_corpus(args.corpus, work, args.num_queries)
    corpus, queries = os.path.join(work, "corpus.txt"), os.path.join(work, "queries.txt")
    results["count"] = n
    print(f"model: {results['model']} ({results['model_params']:,} parameters); corpus {n:,} sentences "
          f"+ {args.num_queries} held-out queries", flush=True)

    # 1. Throughput on 20k.
    d20 = os.path.join(work, "index_20k")
    r = check(run(index_cmd(model, os.path.join(work, "corpus_20k.txt"), d20, args), os.path.join(logs, "build_20k.log")), "20k build")
    with open(os.path.join(d20, "index_meta.json")) as f:
        meta20 = json.load(f)
    throughput = 20_000 / meta20["encode_seconds"]
    predicted = n / throughput / 60
    results["throughput_20k"] = {"sent_per_s": round(throughput, 1), "wall_s": round(r[1], 1), "peak_rss_mib": round(r[2])}
    print(f"20k: {throughput:,.0f} sentences/s encoding (wall {r[1]:.0f} s incl. start-up); 1M build predicted "
          f"{predicted:.1f} min", flush=True)
    if predicted > args.max_build_minutes:
        sys.exit(f"predicted build {predicted:.0f} min > --max_build_minutes {args.max_build_minutes}: use a smaller "
                 f"--layers/--hidden")

    # 2. The 1M flat build, killed once part-way, then resumed.
    flat = os.path.join(work, "index_flat")
    progress = os.path.join(flat, "chunks", "progress.json")
    seen = {}

    def killed_enough():
        try:
            with open(progress) as f:
                done = json.load(f)["chunks_done"]
        except (OSError, ValueError):
            return False
        if done >= args.kill_after_chunks:
            seen.setdefault("at", time.time())
            return time.time() - seen["at"] > 0.5 * args.chunk_size / throughput  # half-way into the next chunk
        return False
    if not os.path.exists(os.path.join(flat, "index_meta.json")):
        r1 = run(index_cmd(model, corpus, flat, args), os.path.join(logs, "build_1m_killed.log"), kill=killed_enough)
        if r1[0] != -signal.SIGKILL:
            sys.exit(f"the 1M build was not killed (rc {r1[0]}):\n{r1[3][-2000:]}")
        with open(progress) as f:
            saved = json.load(f)["chunks_done"]
        r2 = check(run(index_cmd(model, corpus, flat, args), os.path.join(logs, "build_1m_resumed.log")), "resumed build")
        resumed = re.search(r"resuming after (\d+) of (\d+) chunks", r2[3])
        with open(os.path.join(flat, "index_meta.json")) as f:
            meta = json.load(f)
        results["build"] = {
            "killed_run": {"wall_s": round(r1[1], 1), "peak_rss_mib": round(r1[2]), "chunks_saved": saved},
            "resumed_run": {"wall_s": round(r2[1], 1), "peak_rss_mib": round(r2[2]),
                            "resumed_after_chunks": int(resumed[1]) if resumed else None,
                            "num_chunks": int(resumed[2]) if resumed else None,
                            "encode_s": meta["encode_seconds"], "build_s": meta["build_seconds"]},
            "total_wall_s": round(r1[1] + r2[1], 1)}
        print(f"1M build: killed after {r1[1]:.0f} s with {saved} chunks saved; resumed "
              f"({resumed[0] if resumed else 'NOT RESUMED'}) and finished in {r2[1]:.0f} s", flush=True)
    with open(os.path.join(flat, "index_meta.json")) as f:
        meta = json.load(f)
    results["flat_faiss_seconds"] = meta.get("faiss_seconds")
    num_chunks = -(-n // args.chunk_size)
    r = check(run([*worker, "spot", model, corpus, flat, str(args.chunk_size), str(args.max_len), "1",
                   str(num_chunks - 1)], os.path.join(logs, "spot_check.log")), "spot check")
    spots = {int(c): v for c, v in json.loads(r[3].strip().splitlines()[-1]).items()}
    results["resume_check"] = {"count": meta["count"], "count_ok": meta["count"] == n,
                               "spot_chunks": {str(c): {"bytes_equal": eq, "max_abs_diff": diff}
                                               for c, (eq, diff) in spots.items()}}
    print(f"resume check: count {meta['count']:,} (corpus {n:,}); fresh re-encode of chunks "
          f"{list(spots)}: {spots}", flush=True)

    # 3. hnsw, ivf and float16 flat over the same embeddings.
    dirs = {"flat": flat}
    for kind, dtype in (("hnsw", "float32"), ("ivf", "float32"), ("flat", "float16")):
        name = kind if dtype == "float32" else "flat-fp16"
        dirs[name] = os.path.join(work, f"index_{name}")
        if not os.path.exists(os.path.join(dirs[name], "index_meta.json")):
            r = check(run([*worker, "faiss", dirs[name], flat, kind, dtype], os.path.join(logs, f"faiss_{name}.log")),
                      f"{name} index")
            results.setdefault("faiss_build", {})[name] = {"wall_s": round(r[1], 1), "peak_rss_mib": round(r[2]),
                                                           **json.loads(r[3].strip().splitlines()[-1])}
            print(f"{name}: faiss index built in {r[1]:.0f} s, peak RSS {r[2]:.0f} MiB", flush=True)

    # 4. Search jobs (and their floor: the same process without an index).
    r = check(run([*worker, "baseline", model, queries, str(args.max_len)], os.path.join(logs, "baseline.log")), "baseline")
    results["search_baseline_rss_mib"] = round(r[2])
    sweeps = {"hnsw": [16, 64, 256], "ivf": [4, 16, 64]}
    for name, d in dirs.items():
        out_file = os.path.join(work, f"search_{name}.json")
        r = check(run([*worker, "search", d, model, queries, out_file, str(args.max_len),
                       *map(str, sweeps.get(name, []))], os.path.join(logs, f"search_{name}.log")), f"search {name}")
        with open(out_file) as f:
            res = json.load(f)
        res["peak_rss_mib"], res["wall_s"] = round(r[2]), round(r[1], 1)
        res["disk_mib"] = {k: round(mib(os.path.join(d, v)), 1) for k, v in
                           (("embeddings", "embeddings.npy"), ("offsets", "offsets.npy"), ("index", "index.faiss"))}
        results.setdefault("search", {})[name] = res
        print(f"search {name}: peak RSS {r[2]:.0f} MiB, {json.dumps(res['timings'])}", flush=True)
    # 5. The command line itself: one search (model load included), and a refused one (other max_len).
    cli = [sys.executable, EVALUATION, "--model_dir", model, "--task", "search", "--index_dir", flat, "--top_k", "3",
           "--queries", open(queries, encoding="utf-8").readline().strip()]
    r = check(run(cli + ["--max_len", str(args.max_len)], os.path.join(logs, "cli_search.log")), "CLI search")
    results["cli_search"] = {"wall_s": round(r[1], 1), "peak_rss_mib": round(r[2]), "output": r[3].strip()[-600:]}
    r = run(cli + ["--max_len", str(args.max_len // 2)], os.path.join(logs, "cli_refused.log"))
    results["cli_refused"] = {"rc": r[0], "wall_s": round(r[1], 1), "output": r[3].strip()}
    print(f"CLI search: {results['cli_search']['wall_s']} s wall incl. start-up; refused run: rc {r[0]}: {r[3].strip()}",
          flush=True)
    exact = results["search"]["flat"]["ids"]
    for name, res in results["search"].items():
        res["recall_at_10"] = round(recall_at_10(res["ids"], exact), 4)
        for value, s in res["sweep"].items():
            s["recall_at_10"] = round(recall_at_10(s.pop("ids"), exact), 4)
        res.pop("ids")
    write_json(os.path.join(work, "results.json"), results, indent=2, ensure_ascii=False)
    print_table(results)


def print_table(results):
    print(f"\nsearch process floor (imports + model + encoding the queries, no index): "
          f"{results.get('search_baseline_rss_mib')} MiB peak RSS")
    print("\n| index | disk: embeddings / index (MiB) | faiss build (s) | search peak RSS (MiB) | load (s) | "
          "1 query p50 / p95 (ms) | 1 query, no encoding | 100 queries p50 / p95 (ms) | 100, no encoding | recall@10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, res in results["search"].items():
        t = res["timings"]
        fb = results.get("faiss_build", {}).get(name, {}).get("faiss_seconds", results.get("flat_faiss_seconds"))
        print(f"| {name} | {res['disk_mib']['embeddings']:,.0f} / {res['disk_mib']['index']:,.0f} | {fb} | "
              f"{res['peak_rss_mib']:,} | {res['load_seconds']} | "
              + " | ".join(f"{t[k][b]['p50_ms']} / {t[k][b]['p95_ms']}" for b, k in
                           (("1", "with_encoding"), ("1", "search_only"), ("100", "with_encoding"), ("100", "search_only")))
              + f" | {res['recall_at_10']} |")
    for name, res in results["search"].items():
        for value, s in res["sweep"].items():
            print(f"  {name} {'nprobe' if name == 'ivf' else 'efSearch'}={value}: recall@10 {s['recall_at_10']}, "
                  f"1 query (no encoding) p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms")


if __name__ == "__main__":
    main()

"""GPU figures in one command (issue 26): CUDA tests, every method folder trained and re-evaluated on the
GPU, ours vs sentence-transformers (ST) training and encoding speed, MFU, and peak GPU memory.

    bash bench/gpu.sh prepare                # here: data + KLUE tokenizer into bench/.gpu_carry (ignored)
    bash bench/gpu.sh                        # device: python bench/gpu.py --data ... --out $OUT
    python bench/gpu.py --dry-run --data <data> --tokenizer <tokenizer> --out /tmp/gpu-dry   # CPU, tiny

Parts (each guarded: one that fails records its error and the others still write their figures; the JSON
and the Markdown table are rewritten after every part, so a run killed at its time limit keeps what it had):
  probe     device, versions, and the bf16 matmul peak (8192^3 random operands, CUDA events, median of 10).
  cuda      1. the CUDA tests (files of tests/ that skip without CUDA, ``-k cuda``), and every method folder's
               train.py (bf16 autocast, a few steps, checkpoint + best_model written) as a subprocess, then the
               folder's evaluation.py on the saved model on the GPU and on the CPU (the two must agree).
  train     2. training examples/s, ours (KoSimCSE --mode sup, KoSBERT --mode sts, with --bucket_tokens on and
               off) vs ST (MultipleNegativesRankingLoss(scale=20) / CosineSimilarityLoss, a plain loop over the
               same batches), BERT-base shape, random init, KLUE vocabulary, max_len 64, bf16 autocast, batch
               64 and 256; same data, steps, seeds and optimiser settings; jobs alternate ours, ST, ours, ST
               (--repeats pairs) and the table gives medians.
  mfu       3. model FLOPs utilisation of those training steps against the probe's bf16 matmul peak:
               6 x non-embedding params x tokens + 12 x layers x hidden x sum(rows x width^2) per step, over the
               padded tokens each implementation really runs (and over real tokens only).
  encode    4. encoding sentences/s from raw strings (tokenisation included), ours (evaluation.py ``encode``)
               vs ST ``encode``, same model folder, batch and max_len, fp32 and bf16 weights, on the KorSTS test
               sentences and on the first 100,000 wiki lines.
  memory    5. peak GPU memory (torch.cuda.max_memory_allocated) of sup SimCSE at batch 512 and 4096, with
               and without --mini_batch_size; an out-of-memory run is recorded as "did not fit".

Timed runs of parts 2 and 5 execute train.py's command line inside one worker process per part (runpy, the
same argv as the CLI), so that ours and ST alternate in one CUDA context without a process start each;
part 1 runs every CLI as its own process. On CPU (--dry-run) there is no GPU memory: part 5 records the
process's peak RSS instead, and its "measure" field says so.
"""
import argparse
import gc
import glob
import itertools
import json
import os
import random
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ itself, also when imported by path
from benchio import write_json, write_text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE")
PARTS = ("cuda", "train", "encode", "memory")  # probe always runs; mfu comes from train
# Optimiser settings of the throughput runs, given to both implementations (as bench_vs_st.py).
HPARAMS = {"sup": dict(lr=5e-5, warmup_ratio=0.1, weight_decay=0.1, max_grad_norm=0.0),
           "sts": dict(lr=2e-5, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0)}
# Shapes and sizes of the device run and of the CPU dry run.
FULL = dict(base=(768, 12), small=(256, 4), t5=(256, 4), generator=(128, 2), matmul_n=8192, matmul_reps=10,
            batches=(64, 256), steps={64: 30, 256: 20}, warmup=5, repeats=2, cuda_steps=8,
            memory_batches=(512, 4096), mini_batch=256, memory_steps=3, n_wiki=100_000, encode_batch=256,
            encode_repeats=2)
DRY = dict(base=(32, 2), small=(32, 2), t5=(32, 2), generator=(16, 1), matmul_n=256, matmul_reps=3,
           batches=(8, 16), steps={8: 3, 16: 3}, warmup=1, repeats=1, cuda_steps=2,
           memory_batches=(16, 32), mini_batch=8, memory_steps=2, n_wiki=200, encode_batch=32,
           encode_repeats=1)


# ----------------------------------------------------------------------------- the project's internals
# The ONLY place that imports code of a method folder by name (everything else runs the folders' CLIs).
# If the folders are restructured (shared code moving into <folder>/common/), update the names here.
def internals():
    """KoSimCSE's data readers, BatchPlan, length_buckets and the evaluation encoder, imported under
    private names so that the in-process runs of train.py (which import the same module names) stay
    unaffected."""
    folder = os.path.join(ROOT, "KoSimCSE")
    with folder_on_path(folder):
        import dataloader
        from common import data, encoding
        from common.folder import FolderEncoder
        ns = argparse.Namespace(load_triplets=dataloader.load_triplets, load_sts_pairs=data.load_sts_pairs,
                                read_sts=data.read_sts, resolve_path=data.resolve_path,
                                BatchPlan=data.BatchPlan, length_buckets=encoding.length_buckets,
                                FolderEncoder=FolderEncoder, encode=encoding.encode)
    return ns


class folder_on_path:
    """Put a method folder first on sys.path; on exit remove it and forget every module loaded from it
    (the folders share module names: dataloader, model, ...)."""

    def __init__(self, folder):
        self.folder = os.path.abspath(folder)

    def __enter__(self):
        sys.path.insert(0, self.folder)

    def __exit__(self, *exc):
        sys.path.remove(self.folder)
        for name, mod in list(sys.modules.items()):
            path = getattr(mod, "__file__", None) or ""
            if os.path.abspath(path).startswith(self.folder + os.sep):
                del sys.modules[name]


def run_cli_in_process(script, argv):
    """``python script argv...`` inside this process (runpy with run_name __main__); raises on a non-zero exit."""
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        with folder_on_path(os.path.dirname(script)):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"{os.path.relpath(script, ROOT)} exited with {e.code}") from None
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------------ helpers
def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def nli_files(data):
    """Every NLI file of the data folder (relative paths, sorted): the supervised SimCSE training set."""
    found = sorted(glob.glob(os.path.join(data, "KorNLI", "*.tsv")) + glob.glob(os.path.join(data, "KLUE-NLI", "*")))
    return [os.path.relpath(f, data) for f in found]


def shrink_data(src, dst, n_wiki):
    """The dry run's data: the head of every file the run reads (100 NLI premises, 200 STS pairs a split,
    n_wiki wiki lines), so that it checks the real formats in seconds."""
    heads = {"KorNLI": 301, "KLUE-NLI": 301, "KorSTS": 201, "wiki": n_wiki}
    for sub, n in heads.items():
        for path in glob.glob(os.path.join(src, sub, "*")):
            out = os.path.join(dst, sub, os.path.basename(path))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if path.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    rows = json.load(f)
                write_json(out, rows[:300], ensure_ascii=False)
            else:
                with open(path, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
                    g.writelines(itertools.islice(f, n))
    return dst


def is_oom(error):
    """Whether an exception (or one in its chain) is a device out-of-memory error."""
    seen = 0
    while error is not None and seen < 10:
        name = type(error).__name__
        if name == "OutOfMemoryError" or "out of memory" in str(error).lower():
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device):
    import torch
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device):
    """(GiB, what was measured): CUDA max_memory_allocated, or this process's peak RSS on CPU."""
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process peak RSS (CPU run)"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------ workers
def worker_probe(a, cfg):
    """Device, versions, bf16 matmul peak; builds the random models (KLUE vocabulary) in a.work."""
    import torch
    import transformers
    import sentence_transformers
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, T5Config,
                              T5ForConditionalGeneration)
    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "sentence_transformers": sentence_transformers.__version__, "python": sys.version.split()[0],
           "device": a.device, "cpu_count": os.cpu_count()}
    if a.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2 ** 30, sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    out["matmul_bf16_tflops"] = matmul_peak(a.device, cfg["matmul_n"], cfg["matmul_reps"])
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    vocab, pad = len(tok), tok.pad_token_id
    torch.manual_seed(0)

    def bert(name, hidden, layers, cls=BertModel, **kw):
        path = os.path.join(a.work, name)
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                            max_position_embeddings=512, pad_token_id=pad)
        model = cls(config, **kw)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        return path, model

    base, model = bert("base-hf", *cfg["base"], add_pooling_layer=False)
    out["base_params"] = sum(p.numel() for p in model.parameters())
    write_st_folder(base, os.path.join(a.work, "base"), a.max_len)
    small, _ = bert("small-hf", *cfg["small"])
    write_st_folder(small, os.path.join(a.work, "small"), a.max_len)
    bert("generator", *cfg["generator"], cls=BertForMaskedLM)
    d, layers = cfg["t5"]
    t5 = os.path.join(a.work, "t5")
    T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=d, d_kv=64, d_ff=4 * d, num_layers=layers,
                                        num_heads=max(1, d // 64), pad_token_id=pad,
                                        eos_token_id=tok.sep_token_id or tok.eos_token_id or 0,
                                        decoder_start_token_id=pad)).save_pretrained(t5)
    tok.save_pretrained(t5)
    return out


def write_st_folder(path, out, max_len):
    """A sentence-transformers folder (Transformer + mean Pooling) of a saved BERT folder, written by ST itself
    (to another folder: the weights it loaded may be memory-mapped)."""
    from sentence_transformers import SentenceTransformer
    Transformer, Pooling = st_modules()
    transformer = Transformer(path, max_seq_length=max_len)
    dim = (getattr(transformer, "get_word_embedding_dimension", None) or transformer.get_embedding_dimension)()
    SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="mean")], device="cpu").save(out)


def st_modules():
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    return Transformer, Pooling


def matmul_peak(device, n, reps):
    """Median TFLOP/s of a bf16 n x n x n matrix product on random operands (3 warm-ups; CUDA events)."""
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        torch.matmul(x, y)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(x, y)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            torch.matmul(x, y)
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def ours_train_argv(a, c, out):
    """train.py's argv for one throughput / memory run (c: objective, batch, steps, bucket_tokens, mini)."""
    h = HPARAMS[c["objective"]]
    if c["objective"] == "sup":
        script = os.path.join(ROOT, "KoSimCSE", "train.py")
        argv = ["--mode", "sup", "--train_file", *nli_files(a.data)]
        if c.get("mini"):
            argv += ["--mini_batch_size", str(c["mini"])]
    else:
        script = os.path.join(ROOT, "KoSBERT", "train.py")
        argv = ["--mode", "sts", "--no-eval_each_epoch"]
    argv += ["--model", a.base, "--data_dir", a.data, "--dev_file", a.tiny_dev, "--output_dir", out,
             "--overwrite_output_dir", "--pooler", "mean", "--batch_size", str(c["batch"]),
             "--max_steps", str(c["steps"]), "--eval_steps", str(c["steps"]), "--logging_steps", "1",
             "--max_len", str(a.max_len), "--lr", str(h["lr"]), "--warmup_ratio", str(h["warmup_ratio"]),
             "--weight_decay", str(h["weight_decay"]), "--max_grad_norm", str(h["max_grad_norm"]),
             "--eval_batch_size", "128", "--seed", str(a.seed), "--bucket_tokens", str(c["bucket_tokens"]),
             "--device", a.device, "--bf16"]
    return script, argv


def run_ours(a, c, out):
    """One train.py run in this process; examples/s over the steps after the warm-up, from train_log.jsonl."""
    script, argv = ours_train_argv(a, c, out)
    reset_memory(a.device)
    run_cli_in_process(script, argv)
    with open(os.path.join(out, "train_log.jsonl")) as f:
        clock = {e["step"]: e["elapsed_s"] for e in map(json.loads, f) if "elapsed_s" in e}
    w, s = c["warmup"], c["steps"]
    seconds = clock[s] - clock[w]
    gib, _ = peak_memory(a.device)
    return {"examples_per_s": (s - w) * c["batch"] / seconds, "seconds": seconds, "peak_gib": gib}


def st_examples(a, objective, ns):
    if objective == "sup":
        return ns.load_triplets([os.path.join(a.data, f) for f in nli_files(a.data)], log=lambda m: None)
    return ns.load_sts_pairs(ns.resolve_path("korsts-train", a.data), log=lambda m: None)


def run_st(a, c, ns, examples):
    """ST trained in a plain loop over our batches (BatchPlan, same seed), bf16 autocast; padded-token counts of
    ST's, ours-with-buckets' and ours-without's forwards over the same timed steps, for the MFU."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer, losses
    from transformers import get_linear_schedule_with_warmup
    h = HPARAMS[c["objective"]]
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    reset_memory(a.device)
    Transformer, Pooling = st_modules()
    transformer = Transformer(a.base, max_seq_length=a.max_len)
    dim = (getattr(transformer, "get_word_embedding_dimension", None) or transformer.get_embedding_dimension)()
    model = SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="mean")], device=a.device)
    loss_model = (losses.MultipleNegativesRankingLoss(model, scale=20.0) if c["objective"] == "sup"
                  else losses.CosineSimilarityLoss(model))
    named = [(n, p) for n, p in loss_model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": h["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=h["lr"], fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(h["warmup_ratio"] * c["steps"]), c["steps"])
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    plan = ns.BatchPlan(len(examples), c["batch"], a.seed, drop_last=c["objective"] == "sup")
    order = itertools.chain.from_iterable(plan.batches(e) for e in itertools.count())
    dev_type = torch.device(a.device).type
    loss_model.train()
    masks, times = [], [time.perf_counter()]
    for step, idx in zip(range(c["steps"]), order):  # the step counts keep every timed batch full
        batch = [examples[i] for i in idx]
        if c["objective"] == "sup":
            columns = [[t[k] for t in batch] for k in range(3)]
            labels = torch.zeros(len(batch))
        else:
            columns = [[b[0] for b in batch], [b[1] for b in batch]]
            labels = torch.tensor([b[2] for b in batch], dtype=torch.float)
        features = [preprocess(col) for col in columns]
        masks.append([f["attention_mask"] for f in features])
        features = [{k: v.to(a.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in f.items()}
                    for f in features]
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            loss = loss_model(features, labels.to(a.device))
        loss.backward()
        if h["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(loss_model.parameters(), h["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()  # one sync per step, as ours with --logging_steps 1
        times.append(time.perf_counter())
    w = c["warmup"]
    seconds = times[-1] - times[w]
    gib, _ = peak_memory(a.device)
    tokens = {"real": 0, "st_padded": 0, "st_l2": 0, "ours_padded": 0, "ours_l2": 0, "flat_padded": 0, "flat_l2": 0}
    for step_masks in masks[w:]:
        lengths = torch.cat([m.sum(1) for m in step_masks])
        tokens["real"] += int(lengths.sum())
        for m in step_masks:
            tokens["st_padded"] += m.shape[0] * m.shape[1]
            tokens["st_l2"] += m.shape[0] * m.shape[1] ** 2
        for rows, width in ((len(i), n) for i, n in ns.length_buckets(lengths, c["bucket_tokens_on"])):
            tokens["ours_padded"] += rows * width
            tokens["ours_l2"] += rows * width ** 2
        tokens["flat_padded"] += len(lengths) * int(lengths.max())
        tokens["flat_l2"] += len(lengths) * int(lengths.max()) ** 2
    del model, loss_model, optimizer
    return {"examples_per_s": (c["steps"] - w) * c["batch"] / seconds, "seconds": seconds, "peak_gib": gib,
            "tokens": tokens}


def worker_train(a, cfg):
    """Part 2: ours (buckets on, off) and ST, alternating, for sup and sts at each batch size."""
    ns = internals()
    examples = {obj: st_examples(a, obj, ns) for obj in ("sup", "sts")}
    records, peaks = [], [matmul_peak(a.device, cfg["matmul_n"], cfg["matmul_reps"])]
    for rep in range(cfg["repeats"]):
        if rep and time.time() > a.deadline:
            log(f"train: time budget reached, {rep} of {cfg['repeats']} repeats")
            break
        for obj, batch in itertools.product(("sup", "sts"), cfg["batches"]):
            c = dict(objective=obj, batch=batch, steps=cfg["steps"][batch], warmup=cfg["warmup"],
                     bucket_tokens_on=a.bucket_tokens)
            for impl, bucket in (("ours", a.bucket_tokens), ("st", None), ("ours", 0)):
                try:
                    if impl == "ours":
                        r = run_ours(a, dict(c, bucket_tokens=bucket), os.path.join(a.work, f"train-{obj}-{batch}"))
                    else:
                        r = run_st(a, c, ns, examples[obj])
                except Exception as e:  # one failing run keeps the others' figures
                    r = {"error": f"{type(e).__name__}: {e}"[:500]}
                rec = {"objective": obj, "batch": batch, "impl": impl, "bucket_tokens": bucket, "rep": rep, **r}
                records.append(rec)
                log(f"train {obj} b{batch} {impl} buckets={bucket}: "
                    f"{r.get('examples_per_s', r.get('error'))}")
    peaks.append(matmul_peak(a.device, cfg["matmul_n"], cfg["matmul_reps"]))
    return {"records": records, "matmul_bf16_tflops": peaks}


def worker_memory(a, cfg):
    """Part 5: peak memory of sup SimCSE at each batch, with and without --mini_batch_size."""
    rows = []
    configs = [(b, m) for b in cfg["memory_batches"] for m in (cfg["mini_batch"], 0)]
    configs.sort(key=lambda bm: (bm[0], bm[1] == 0))  # with gradient caching first: the plain run may not fit
    for batch, mini in configs:
        c = dict(objective="sup", batch=batch, steps=cfg["memory_steps"], warmup=1, bucket_tokens=a.bucket_tokens,
                 mini=mini)
        row = {"batch": batch, "mini_batch_size": mini}
        try:
            r = run_ours(a, c, os.path.join(a.work, f"memory-{batch}-{mini}"))
            row.update(fit=True, peak_gib=r["peak_gib"], step_s=r["seconds"] / max(1, c["steps"] - 1),
                       examples_per_s=r["examples_per_s"])
        except BaseException as e:  # noqa: B036 -- an OOM can surface as anything train.py raises
            if isinstance(e, KeyboardInterrupt):
                raise
            if not is_oom(e):
                row.update(fit=None, error=f"{type(e).__name__}: {e}"[:500])
            else:
                row.update(fit=False, note="did not fit (out of memory)")
        row["measure"] = peak_memory(a.device)[1]
        reset_memory(a.device)
        rows.append(row)
        log(f"memory batch {batch} mini {mini}: {row.get('peak_gib', row.get('note', row.get('error')))}")
    return {"rows": rows}


def worker_encode(a, cfg):
    """Part 4: sentences/s, ours (evaluation.encode on a FolderEncoder) vs ST encode, alternating."""
    import torch
    from sentence_transformers import SentenceTransformer
    ns = internals()
    pairs = ns.read_sts(ns.resolve_path("korsts-test", a.data))
    with open(os.path.join(a.data, "wiki", "wiki_corpus.txt"), encoding="utf-8") as f:
        wiki = [line.strip() for line in itertools.islice(f, cfg["n_wiki"])]
    corpora = {"korsts-test": [p[0] for p in pairs] + [p[1] for p in pairs], "wiki": wiki}
    ours = ns.FolderEncoder(a.base).to(a.device).eval()
    st = SentenceTransformer(a.base, device=a.device)
    st.max_seq_length = a.max_len
    records = []
    for precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        ours.to(dtype)
        st.to(dtype)
        run = {"ours": lambda xs: ns.encode(ours, ours.tokenizer, xs, a.max_len, cfg["encode_batch"], a.device),
               "st": lambda xs: st.encode(xs, batch_size=cfg["encode_batch"], convert_to_numpy=True,
                                          show_progress_bar=False)}
        for impl in ("ours", "st"):  # warm-up
            with torch.inference_mode():
                run[impl](corpora["korsts-test"][:2 * cfg["encode_batch"]])
        for name, sentences in corpora.items():
            for rep in range(cfg["encode_repeats"] if name == "korsts-test" else 1):
                for impl in ("ours", "st"):
                    with torch.inference_mode():
                        sync(a.device)
                        t = time.perf_counter()
                        emb = run[impl](sentences)
                        sync(a.device)
                        seconds = time.perf_counter() - t
                    records.append({"corpus": name, "precision": precision, "impl": impl, "rep": rep,
                                    "n": len(sentences), "seconds": seconds, "dim": int(emb.shape[1]),
                                    "sentences_per_s": len(sentences) / seconds})
                    log(f"encode {name} {precision} {impl}: {len(sentences) / seconds:,.0f} sentences/s")
    return {"records": records}


WORKERS = {"probe": worker_probe, "train": worker_train, "memory": worker_memory, "encode": worker_encode}


# ------------------------------------------------------------------------------------ orchestration
class Bench:
    def __init__(self, a):
        self.a, self.cfg = a, (DRY if a.dry_run else FULL)
        self.result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": a.dry_run, "device": a.device,
                       "sections": {}}
        self.env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        if a.threads:
            self.env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))

    def worker(self, job, timeout, **extra):
        """bench/gpu.py --_job JOB in a fresh process; its return value comes back as JSON."""
        a = self.a
        out_json = os.path.join(a.work, f"{job}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--_job", job, "--_result", out_json, "--data", a.data,
               "--tokenizer", a.tokenizer, "--out", a.out, "--_work", a.work, "--device", a.device,
               "--max_len", str(a.max_len), "--seed", str(a.seed), "--bucket_tokens", str(a.bucket_tokens),
               "--folders", *a.folders, "--_deadline", str(extra.get("deadline", time.time() + timeout))]
        if a.dry_run:
            cmd.append("--dry-run")
        proc = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        self.logs[job] = proc.stdout[-3000:]
        if proc.returncode or not os.path.isfile(out_json):
            raise RuntimeError(f"worker {job} exited {proc.returncode}: {proc.stdout[-1500:]}")
        with open(out_json) as f:
            return json.load(f)

    def section(self, name, fn):
        start = time.time()
        log(f"--- {name}")
        try:
            self.result["sections"][name] = fn()
        except Exception as e:
            self.result["sections"][name] = {"error": f"{type(e).__name__}: {e}"[-2000:],
                                             "traceback": traceback.format_exc()[-2000:]}
            log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
        self.result["sections"][name]["seconds"] = time.time() - start
        self.write()

    def write(self):
        self.result["runtime_s"] = time.time() - self.start
        write_json(os.path.join(self.a.out, "gpu.json"), self.result, indent=2, ensure_ascii=False)
        write_text(os.path.join(self.a.out, "gpu.md"), markdown(self.result))

    def remaining(self):
        return self.a.budget_s - (time.time() - self.start)

    # --- parts
    def probe(self):
        r = self.worker("probe", timeout=max(60, self.remaining()))
        self.models = {k: os.path.join(self.a.work, k) for k in ("base", "small", "t5", "generator")}
        return r

    def cuda(self):
        """Part 1: CUDA tests and one short bf16 run of every folder, all as subprocesses in parallel."""
        a, cfg, d = self.a, self.cfg, self.a.data
        jobs = {}
        junit = os.path.join(a.work, "junit.xml")
        targets = a.cuda_tests or sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
                                         if "cuda.is_available()" in open(f, encoding="utf-8").read())
        jobs["pytest"] = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "cuda",
                          f"--junitxml={junit}", *targets]
        m, steps = self.models, str(cfg["cuda_steps"])
        common = ["--data_dir", d, "--dev_file", a.tiny_dev, "--batch_size", "32", "--max_len", str(a.max_len),
                  "--max_steps", steps, "--eval_steps", str(max(1, cfg["cuda_steps"] // 2)), "--logging_steps", "1",
                  "--lr", "1e-4", "--seed", str(a.seed), "--device", a.device, "--bf16", "--overwrite_output_dir"]
        specific = {"KoSimCSE": ["--mode", "sup", "--train_file", *nli_files(d), "--model", m["small"], "--pooler", "mean"],
                    "KoSBERT": ["--mode", "sts", "--no-eval_each_epoch", "--model", m["small"]],
                    "KoSentenceT5": ["--mode", "sup", "--train_file", *nli_files(d), "--model", m["t5"]],
                    "KoDiffCSE": ["--model", m["small"], "--generator_name", m["generator"], "--train_file",
                                  "wiki/wiki_corpus.txt", "--max_train_samples", "2000"]}
        outs = {f: os.path.join(a.work, f"cuda-{f}") for f in a.folders}
        for f in a.folders:
            jobs[f] = [sys.executable, os.path.join(ROOT, f, "train.py"), *specific[f], "--output_dir", outs[f], *common]
        done = self.parallel(jobs)
        result = {"pytest": pytest_summary(done["pytest"], junit), "folders": {}}
        evals = {}
        for f in a.folders:
            if done[f]["rc"] == 0:
                for dev in dict.fromkeys([a.device, "cpu"]):
                    evals[f"{f}@{dev}"] = [sys.executable, os.path.join(ROOT, f, "evaluation.py"), "--model_dir",
                                           os.path.join(outs[f], "best_model"), "--data_dir", d, "--dataset",
                                           "korsts-test", "--device", dev, "--output_json",
                                           os.path.join(a.work, f"eval-{f}-{dev.replace(':', '')}.json")]
        evaluated = self.parallel(evals)
        for f in a.folders:
            row = {"train_rc": done[f]["rc"], "train_s": done[f]["seconds"]}
            if done[f]["rc"]:
                row["error"] = done[f]["tail"][-1500:]
            else:
                entries = [json.loads(x) for x in open(os.path.join(outs[f], "train_log.jsonl"))]
                losses = [e["loss"] for e in entries if "loss" in e]
                row.update(steps=max(e.get("step", 0) for e in entries), last_loss=losses[-1] if losses else None,
                           losses_finite=all(x == x and abs(x) != float("inf") for x in losses),
                           best_model=os.path.isfile(os.path.join(outs[f], "best_model", "config.json")))
                for dev in dict.fromkeys([a.device, "cpu"]):
                    key, e = ("eval_device" if dev == a.device else "eval_cpu"), evaluated[f"{f}@{dev}"]
                    if e["rc"]:
                        row[key + "_error"] = e["tail"][-1000:]
                        continue
                    with open(os.path.join(a.work, f"eval-{f}-{dev.replace(':', '')}.json")) as fh:
                        metrics = json.load(fh)[0]["metrics"]
                    row[key] = metrics["cosine_spearman"]
                    row[key + "_s"] = e["seconds"]
                if "eval_cpu" in row and "eval_device" in row:
                    row["eval_abs_diff"] = abs(row["eval_device"] - row["eval_cpu"])
            result["folders"][f] = row
        return result

    def parallel(self, jobs):
        """Run {name: cmd} at once on the device machine (16 cores), one after the other on a CPU (a dry
        run: parallel runs there only fight over the cores); {name: {rc, seconds, tail}}."""
        if self.a.device == "cpu" and len(jobs) > 1:
            done = {}
            for name, cmd in jobs.items():
                done.update(self.parallel({name: cmd}))
            return done
        procs, start = {}, time.time()
        for name, cmd in jobs.items():
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True), time.time())
        done = {}
        for name, (p, t0) in procs.items():
            try:
                stdout, _ = p.communicate(timeout=max(30, self.remaining()))
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, _ = p.communicate()
            done[name] = {"rc": p.returncode, "seconds": time.time() - t0, "tail": stdout[-4000:]}
            self.logs[name] = stdout[-3000:]
        log(f"{len(jobs)} jobs in {time.time() - start:.0f}s: " + ", ".join(f"{k} rc={v['rc']}" for k, v in done.items()))
        return done

    def train(self):
        # the repeats after the first stop at 55 % of what is left, so parts 4 and 5 keep their time
        deadline = time.time() + 0.55 * self.remaining()
        return self.worker("train", timeout=max(60, self.remaining()), deadline=deadline)

    def mfu(self):
        tr = self.result["sections"].get("train", {})
        if "records" not in tr:
            raise RuntimeError("no training records (part 2 failed)")
        peak = max(tr["matmul_bf16_tflops"])
        hidden, layers = self.cfg["base"]
        nonemb = layers * (12 * hidden * hidden + 13 * hidden)  # QKVO 4h^2+4h, FFN 8h^2+5h, 2 LayerNorms 4h
        rows = []
        for obj, batch in itertools.product(("sup", "sts"), self.cfg["batches"]):
            st = [r for r in tr["records"] if r["objective"] == obj and r["batch"] == batch and r["impl"] == "st"
                  and "tokens" in r]
            if not st:
                continue
            t = st[0]["tokens"]  # the same batches in every run
            for label, impl, bucket, pad, l2 in (("ours, buckets", "ours", self.a.bucket_tokens, "ours_padded", "ours_l2"),
                                                 ("ours, no buckets", "ours", 0, "flat_padded", "flat_l2"),
                                                 ("st", "st", None, "st_padded", "st_l2")):
                secs = median([r.get("seconds") for r in tr["records"] if r["objective"] == obj and r["batch"] == batch
                               and r["impl"] == impl and r["bucket_tokens"] == bucket])
                if not secs:
                    continue
                flops = 6 * nonemb * t[pad] + 12 * layers * hidden * t[l2]
                flops_real = 6 * nonemb * t["real"] + 12 * layers * hidden * t["real"] * (t[l2] / t[pad])
                rows.append({"objective": obj, "batch": batch, "impl": label, "tflops": flops / secs / 1e12,
                             "mfu_padded_pct": 100 * flops / secs / 1e12 / peak,
                             "mfu_real_pct": 100 * flops_real / secs / 1e12 / peak,
                             "padding_pct": 100 * (1 - t["real"] / t[pad]), "padded_tokens": t[pad],
                             "real_tokens": t["real"]})
        return {"matmul_bf16_tflops": peak, "nonembedding_params": nonemb, "rows": rows}

    def encode(self):
        return self.worker("encode", timeout=max(60, self.remaining()))

    def memory(self):
        return self.worker("memory", timeout=max(60, self.remaining()))

    def run(self):
        a = self.a
        self.start, self.logs = time.time(), {}
        self.result["logs"] = self.logs
        self.section("probe", self.probe)
        if "error" in self.result["sections"]["probe"]:
            return
        a.base = self.models["base"]
        for part in a.parts:
            if part == "train":
                self.section("train", self.train)
                self.section("mfu", self.mfu)
            else:
                self.section(part, getattr(self, part))
        self.write()


def pytest_summary(job, junit):
    out = {"rc": job["rc"], "seconds": job["seconds"], "tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if os.path.isfile(junit):
        import xml.etree.ElementTree as ET
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for s in suites:
            for k in ("tests", "failures", "errors", "skipped"):
                out[k] += int(s.get(k, 0))
        out["cases"] = [{"name": c.get("name"), "outcome": next((x.tag for x in c), "passed")}
                        for s in suites for c in s.iter("testcase")]
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    if job["rc"] not in (0, 5):
        out["tail"] = job["tail"][-2000:]
    return out


# ------------------------------------------------------------------------------------------ report
def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if x == 0 or abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(res):
    s = res["sections"]
    out = [f"# GPU figures ({'DRY RUN on CPU, tiny shapes: not figures' if res['dry_run'] else 'device run'})", "",
           f"{res['date']}, device {res['device']}, runtime {res.get('runtime_s', 0):.0f} s", ""]

    def err(name):
        if "error" in s.get(name, {}):
            out.extend([f"**{name} failed:** `{s[name]['error'][:300]}`", ""])
            return True
        return name not in s

    if not err("probe"):
        p = s["probe"]
        out += ["## Probe", "", f"{p.get('gpu', 'CPU')}, torch {p['torch']}, transformers {p['transformers']}, "
                f"sentence-transformers {p['sentence_transformers']}; bf16 matmul peak {fmt(p['matmul_bf16_tflops'])} "
                f"TFLOP/s; BERT-base-shape model {p['base_params']:,} parameters", ""]
    if not err("cuda"):
        c = s["cuda"]
        t = c["pytest"]
        out += ["## 1. CUDA tests and every folder on the device", "",
                f"pytest -k cuda: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                f"{t['skipped']} skipped (rc {t['rc']})", "",
                table(["folder", "train rc", "steps", "last loss", "losses finite", "KorSTS test device",
                       "KorSTS test CPU", "abs diff", "train s"],
                      [[f, r["train_rc"], r.get("steps"), r.get("last_loss"), r.get("losses_finite"),
                        r.get("eval_device"), r.get("eval_cpu"), r.get("eval_abs_diff"), r["train_s"]]
                       for f, r in c["folders"].items()]), ""]
    if not err("train"):
        recs = s["train"]["records"]
        rows = []
        for obj in ("sup", "sts"):
            for batch in sorted({r["batch"] for r in recs}):
                def med(impl, bucket, key="examples_per_s"):
                    return median([r.get(key) for r in recs if r["objective"] == obj and r["batch"] == batch
                                   and r["impl"] == impl and r["bucket_tokens"] == bucket])
                on, off, st = med("ours", res_bucket(recs)), med("ours", 0), med("st", None)
                rows.append([obj, batch, on, off, st, on / st if on and st else None, off / st if off and st else None,
                             med("ours", res_bucket(recs), "peak_gib"), med("st", None, "peak_gib")])
        n = max([r["rep"] for r in recs] + [-1]) + 1
        errors = [r for r in recs if "error" in r]
        out += ["## 2. Training examples/s, ours vs sentence-transformers (bf16, max_len 64, BERT-base shape)", "",
                f"medians of {n} alternating repeat(s)" + (f"; {len(errors)} runs failed: `{errors[0]['error'][:200]}`"
                                                          if errors else ""), "",
                table(["objective", "batch", f"ours, buckets {res_bucket(recs)}", "ours, no buckets", "ST",
                       "ours/ST buckets", "ours/ST no buckets", "peak GiB ours", "peak GiB ST"], rows), ""]
    if not err("mfu"):
        m = s["mfu"]
        out += [f"## 3. MFU against the measured bf16 matmul peak ({fmt(m['matmul_bf16_tflops'])} TFLOP/s)", "",
                table(["objective", "batch", "impl", "TFLOP/s", "MFU % (padded tokens)", "MFU % (real tokens)",
                       "padding %"], [[r["objective"], r["batch"], r["impl"], r["tflops"], r["mfu_padded_pct"],
                                       r["mfu_real_pct"], r["padding_pct"]] for r in m["rows"]]), ""]
    if not err("encode"):
        recs = s["encode"]["records"]
        rows = []
        for corpus, precision in itertools.product(("korsts-test", "wiki"), ("fp32", "bf16")):
            sel = [r for r in recs if r["corpus"] == corpus and r["precision"] == precision]
            if sel:
                o = median([r["sentences_per_s"] for r in sel if r["impl"] == "ours"])
                t = median([r["sentences_per_s"] for r in sel if r["impl"] == "st"])
                rows.append([corpus, sel[0]["n"], precision, o, t, o / t if o and t else None])
        out += ["## 4. Encoding sentences/s from raw strings, ours vs sentence-transformers `encode`", "",
                table(["corpus", "sentences", "weights", "ours", "ST", "ours/ST"], rows), ""]
    if not err("memory"):
        rows = s["memory"]["rows"]
        out += ["## 5. Peak memory, sup SimCSE (BERT-base shape, bf16, max_len 64)", "",
                f"measured: {rows[0]['measure'] if rows else '-'}", "",
                table(["batch", "--mini_batch_size", "fits", "peak GiB", "step s", "examples/s"],
                      [[r["batch"], r["mini_batch_size"], r.get("note") or r.get("error", "")[:80] or r.get("fit"),
                        r.get("peak_gib"), r.get("step_s"), r.get("examples_per_s")] for r in rows]), ""]
    return "\n".join(out) + "\n"


def res_bucket(recs):
    return next((r["bucket_tokens"] for r in recs if r["impl"] == "ours" and r["bucket_tokens"]), None)


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data folder: KorNLI/, KLUE-NLI/, KorSTS/, wiki/ (bench/gpu.sh prepare)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder of the random models (klue-roberta-base)")
    p.add_argument("--out", required=True, help="where gpu.json and gpu.md are written")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="CPU, tiny shapes, few steps: checks the whole run end to end in about a minute")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (probe always runs)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="time the run plans for; repeats stop early to fit (default: 450; 1800 with --dry-run)")
    p.add_argument("--max_len", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bucket_tokens", type=int, default=None,
                   help="ours with buckets: --bucket_tokens (default: train.py's GPU default 8192; 128 on a dry run)")
    p.add_argument("--cuda_tests", nargs="*", default=None, help="test files for part 1's pytest -k cuda "
                   "(default: the files of tests/ that check torch.cuda.is_available())")
    p.add_argument("--folders", nargs="+", choices=FOLDERS, default=list(FOLDERS),
                   help="method folders of part 1 (default: all four)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of every process (default: unset; 1 with --dry-run)")
    p.add_argument("--keep_work", action="store_true", help="keep the work folder (models, runs)")
    p.add_argument("--_job", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.data, a.tokenizer, a.out = (os.path.abspath(x) for x in (a.data, a.tokenizer, a.out))
    a.device = a.device or ("cpu" if a.dry_run else "cuda")
    if a.bucket_tokens is None:
        a.bucket_tokens = 128 if a.dry_run else 8192
    cfg = DRY if a.dry_run else FULL
    a.budget_s = a.budget_s or (1800 if a.dry_run else 450)  # a dry run checks, it is not timed
    if a.dry_run and a.threads is None:
        a.threads = 1  # part 1 runs five processes at once
    if a._job:
        a.work, a.deadline, a.base = a._work, a._deadline, os.path.join(a._work, "base")
        a.tiny_dev = os.path.join(a.work, "tiny-dev.tsv")
        result = WORKERS[a._job](a, cfg)
        write_json(a._result, result, ensure_ascii=False)
        return 0
    if a.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device here: use --dry-run (CPU) or --device cpu")
    a.work = tempfile.mkdtemp(prefix="gpu_bench_")
    if a.dry_run:
        a.data = shrink_data(a.data, os.path.join(a.work, "data"), cfg["n_wiki"])
    a.tiny_dev = os.path.join(a.work, "tiny-dev.tsv")  # 30 dev pairs: train.py's end-of-run evaluation stays short
    with open(os.path.join(a.data, "KorSTS", "sts-dev.tsv"), encoding="utf-8") as src, \
            open(a.tiny_dev, "w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, 31))
    log(f"work folder {a.work}; figures to {a.out}; parts {' '.join(a.parts)}; budget {a.budget_s:.0f}s")
    bench = Bench(a)
    try:
        bench.run()
    finally:
        bench.write()
        if not a.keep_work:
            shutil.rmtree(a.work, ignore_errors=True)
    print(markdown(bench.result))
    failed = [k for k, v in bench.result["sections"].items() if "error" in v]
    log(f"done in {time.time() - bench.start:.0f}s" + (f"; failed parts: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

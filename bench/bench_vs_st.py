"""Our training and encoding vs sentence-transformers (ST), side by side in one run (issue 6).

    OMP_NUM_THREADS=2 python bench/bench_vs_st.py --data_dir /work/shared/data \\
        --tokenizer /work/shared/tokenizers/klue-roberta-base --proxy_model /tmp/me5-small \\
        --output_json output/bench_vs_st.json            # default run, <= 20 min on 2 CPU cores
    ... same with --quick                                 # smoke run, about 4 minutes

Four objectives, each ours vs ST on the same model folder, data, batch, max_len, steps, lr, warmup,
weight decay, clipping and seed, mean pooling everywhere:
  sup    KoSimCSE/train.py --mode sup        vs MultipleNegativesRankingLoss(scale=20), (anchor, pos, hard neg)
  unsup  KoSimCSE/train.py --mode unsup      vs MultipleNegativesRankingLoss(scale=20) on (s, s)
  sts    KoSBERT/train.py --mode sts         vs CosineSimilarityLoss
  nli    KoSBERT/train.py --mode nli         vs SoftmaxLoss (concat u, v, |u-v|)
ST is trained in a plain loop (no `datasets`/`accelerate` here) over the same batches: BatchPlan with
the same seed for sup/unsup, the same seeded DataLoader shuffle for sts/nli.

Every measured job is a fresh subprocess (peak RSS = ru_maxrss of that job alone, via RUSAGE_CHILDREN
of a one-job wrapper, as bench/memory_scale.py) and jobs alternate ours, ST, ours, ST, ...
(--repeats pairs per objective); medians are reported with the ratio ours/ST.

Figures:
  * training examples/s (triplets, sentences or pairs per step x steps) over the timed loop only: the
    steps after --warmup_steps. Ours: from `elapsed_s`/`step` of train_log.jsonl (--logging_steps 1;
    elapsed_s is rounded to 0.1 s by train.py). ST: the same clock around our own loop; its in-loop
    tokenisation (ST tokenises each batch, ours pre-tokenises in setup) is inside its figure, and the
    figure without it is given too.
  * encoding sentences/s from raw strings to embeddings, tokenisation included: ours =
    KoSimCSE/evaluation.py `encode` on a FolderEncoder, ST = SentenceTransformer.encode, same batch size
    and max_seq_length, on the KorSTS test sentences (both columns) and the first 20,000 wiki lines.
  * peak RSS of every job.
  * KorSTS test AVG and cosine Spearman of both saved models after training the --proxy_model for the
    same steps, scored by the same code (KoSimCSE/evaluation.py --output_json).
  * MFU on a random BERT-base-shape model (768/12, KLUE vocabulary), sup objective:
    FLOPs = 6 x non-embedding params x padded tokens + 12 x layers x hidden x L^2 per sequence
    (attention, fwd+bwd), per second, over the fp32 torch.matmul peak measured in this run with the
    same thread count. "padded" counts the tokens the forward really processes (padding counted as
    useful work, which flatters the implementation that pads more); the figure over real (unpadded)
    tokens is printed beside it (its attention term uses the padded width, ~1% of the FLOPs here).
    Padded token counts come from the ST job, which replays both padding rules on the same batches.
Models: random-init KLUE-shape encoders built from --tokenizer (small: --small_hidden/--small_layers
for the throughput and encoding runs; BERT-base shape for throughput + MFU), and --proxy_model for quality.
"""
import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ itself, also when imported by path
from benchio import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = ("sup", "unsup", "sts", "nli")
NLI_FILES = ["KLUE-NLI/klue_nli_train.tsv"]  # a training split (XNLI and KLUE-NLI dev are MTEB's)
# Optimiser settings per objective, passed explicitly to both implementations.
HPARAMS = {"sup": dict(lr=5e-5, warmup_ratio=0.1, weight_decay=0.1, max_grad_norm=0.0),
           "unsup": dict(lr=3e-5, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=0.0),
           "sts": dict(lr=2e-5, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0),
           "nli": dict(lr=2e-5, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0)}
TARGETS = {"train": 1.3, "encode": 1.2, "quality": -0.3, "mfu": 50.0}

# A fresh wrapper process per job, so that RUSAGE_CHILDREN's peak is that job's alone.
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "print('PEAK_KB', u.ru_maxrss, 'CPU_S', u.ru_utime + u.ru_stime); sys.exit(rc)")
LAST_FOREIGN = [0.0]  # CPU share taken by other processes during the last job


def busy_seconds():
    """CPU-seconds the whole machine has been busy (all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def run_job(cmd, env):
    """Run ``cmd`` in a fresh wrapper process: (wall s, peak RSS GB, stdout). Also notes in
    LAST_FOREIGN the fraction of the machine's CPU that *other* processes used meanwhile (another
    job on the same cores slows OpenMP threads far more than its share: such figures are suspect)."""
    start, busy0 = time.time(), busy_seconds()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)
    wall, busy1 = time.time() - start, busy_seconds()
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-4000:]}")
    tail = proc.stdout.rsplit("PEAK_KB", 1)[1].split()
    peak_kb, cpu_s = int(tail[0]), float(tail[2])
    if busy0 is not None and busy1 is not None:
        LAST_FOREIGN[0] = max(0.0, (busy1 - busy0 - cpu_s) / (wall * (os.cpu_count() or 1)))
    return wall, peak_kb / 1024 ** 2, proc.stdout


def job_result(stdout):
    """The JSON line a worker prints last, prefixed with RESULT."""
    return json.loads(stdout.rsplit("RESULT ", 1)[1].splitlines()[0])


# ----------------------------------------------------------------------------------------- workers
def use_package(folder):
    """KoSimCSE and KoSBERT both have dataloader/evaluation/model modules: a worker imports one set."""
    sys.path.insert(0, os.path.join(ROOT, folder))


def worker_build(a):
    """Random-init BERT with the real KLUE vocabulary, saved as HF + sentence-transformers folder."""
    use_package("KoSimCSE")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from common.encoding import write_sentence_transformers_config
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    heads = max(1, a.hidden // 64)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers,
                                 num_attention_heads=heads, intermediate_size=4 * a.hidden,
                                 pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    write_sentence_transformers_config(a.out, a.hidden, "mean", a.max_len)
    print("RESULT " + json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def worker_matmul(a):
    """Best-of fp32 torch.matmul throughput (GFLOP/s) with this process's thread count."""
    import torch
    n = a.n
    x, y = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.matmul(x, y)
    best = 0.0
    for _ in range(a.reps):
        t = time.perf_counter()
        torch.matmul(x, y)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    print("RESULT " + json.dumps({"gflops": best, "threads": torch.get_num_threads(), "n": n}))


def load_examples(a):
    """The training examples of ``a.objective`` exactly as our train.py builds them (before tokenising)."""
    import random as rnd
    if a.objective in ("sup", "unsup"):
        use_package("KoSimCSE")
        from common.data import read_sentences, resolve_path
        from dataloader import load_triplets
        if a.objective == "sup":
            rows = load_triplets([resolve_path(f, a.data_dir) for f in NLI_FILES], log=lambda m: None)
            if a.max_train_samples is not None and a.max_train_samples < len(rows):
                rows = rnd.Random(a.seed).sample(rows, a.max_train_samples)
            return rows
        return read_sentences(resolve_path("wiki/wiki_corpus.txt", a.data_dir), a.max_train_samples, a.seed,
                              log=lambda m: None)
    use_package("KoSBERT")
    from common.data import load_sts_pairs, resolve_path
    from dataloader import load_nli_pairs
    if a.objective == "sts":
        return load_sts_pairs(resolve_path("korsts-train", a.data_dir), log=lambda m: None)
    return load_nli_pairs([resolve_path(f, a.data_dir) for f in NLI_FILES], log=lambda m: None)


def batch_order(a, n):
    """Lists of example indices, step by step, as our trainers visit them: BatchPlan with the run's seed
    (KoSimCSE drops a last partial batch; KoSBERT keeps it, as sentence-transformers' fit)."""
    from common.data import BatchPlan
    plan = BatchPlan(n, a.batch_size, a.seed, drop_last=a.objective in ("sup", "unsup"))
    for epoch in itertools.count():
        yield from plan.batches(epoch)


def worker_st_train(a):
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer, losses
    from sentence_transformers.models import Pooling, Transformer
    from transformers import get_linear_schedule_with_warmup
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    examples = load_examples(a)
    from common.encoding import length_buckets  # the folder load_examples imported (KoSimCSE or KoSBERT)
    transformer = Transformer(a.model, max_seq_length=a.max_len)
    dim = transformer.get_embedding_dimension()
    model = SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="mean")], device="cpu")
    if a.objective in ("sup", "unsup"):
        loss_model = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    elif a.objective == "sts":
        loss_model = losses.CosineSimilarityLoss(model)
    else:
        loss_model = losses.SoftmaxLoss(model, dim, num_labels=3, concatenation_sent_rep=True,
                                        concatenation_sent_difference=True)
    named = [(n, p) for n, p in loss_model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(a.warmup_ratio * a.steps), a.steps)
    shapes = []  # (rows, padded width) of every forward of the ST Transformer module
    model[0].register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0]["input_ids"].shape)))
    loss_model.train()
    times, tok_s, pad_stats = [time.time()], [], []
    for step, idx in zip(range(a.steps), batch_order(a, len(examples))):
        t0 = time.time()
        batch = [examples[i] for i in idx]
        if a.objective == "sup":
            columns = [[t[c] for t in batch] for c in range(3)]
            labels = torch.zeros(len(batch))
        elif a.objective == "unsup":
            columns = [batch, batch]
            labels = torch.zeros(len(batch))
        else:
            columns = [[b[0] for b in batch], [b[1] for b in batch]]
            labels = torch.tensor([b[2] for b in batch], dtype=torch.float if a.objective == "sts" else torch.long)
        features = [model.preprocess(c) for c in columns]
        tok_s.append(time.time() - t0)
        del shapes[:]
        loss = loss_model(features, labels)
        loss.backward()
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(loss_model.parameters(), a.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()
        times.append(time.time())
        lengths = [f["attention_mask"].sum(1).tolist() for f in features]
        flat = [x for col in lengths for x in col]
        # ours: all rows of the step in one batch, encoded in length buckets (--bucket_tokens)
        groups = [(len(idx), width) for idx, width in length_buckets(torch.tensor(flat), a.bucket_tokens)]
        pad_stats.append({"real": sum(flat), "st_padded": sum(r * w for r, w in shapes),
                          "st_seq_l2": sum(r * w * w for r, w in shapes),
                          "ours_padded": sum(r * w for r, w in groups), "ours_seq_l2": sum(r * w * w for r, w in groups),
                          "one_pass_padded": len(flat) * max(flat), "rows": len(flat), "batch": len(batch)})
    if os.environ.get('BENCH_DEBUG'):
        print('step_s', [round(y - x, 3) for x, y in zip(times, times[1:])], file=sys.stderr)
    w = a.warmup_steps
    timed = a.steps - w
    seconds = times[-1] - times[w]  # end of the last warm-up step .. end of the last step
    examples_timed = sum(p["batch"] for p in pad_stats[w:])
    out = {"examples_per_s": examples_timed / seconds, "seconds": seconds, "timed_steps": timed,
           "tokenize_s": sum(tok_s[w:]),
           "examples_per_s_excl_tokenize": examples_timed / (seconds - sum(tok_s[w:])),
           "tokens": {k: sum(p[k] for p in pad_stats[w:]) for k in pad_stats[0] if k != "batch"},
           "loss": loss.item()}
    if a.save:
        model.save(a.save)
    print("RESULT " + json.dumps(out))


def worker_encode(a):
    import torch
    sentences = encode_corpus(a)
    warm = sentences[:2 * a.batch_size]
    if a.impl == "ours":
        use_package("KoSimCSE")
        from common.encoding import encode
        from common.folder import FolderEncoder
        encoder = FolderEncoder(a.model).eval()
        run = lambda xs: encode(encoder, encoder.tokenizer, xs, a.max_len, a.batch_size, "cpu")
    else:
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(a.model, device="cpu")
        model.max_seq_length = a.max_len
        run = lambda xs: model.encode(xs, batch_size=a.batch_size, convert_to_numpy=True, show_progress_bar=False)
    with torch.inference_mode():
        run(warm)
        t = time.time()
        emb = run(sentences)
        seconds = time.time() - t
    print("RESULT " + json.dumps({"sentences_per_s": len(sentences) / seconds, "seconds": seconds,
                                  "n": len(sentences), "dim": int(emb.shape[1])}))


def encode_corpus(a):
    if a.corpus == "korsts-test":
        use_package("KoSimCSE")
        from common.data import read_sts, resolve_path
        pairs = read_sts(resolve_path("korsts-test", a.data_dir))
        return [p[0] for p in pairs] + [p[1] for p in pairs]
    with open(os.path.join(a.data_dir, "wiki", "wiki_corpus.txt"), encoding="utf-8") as f:
        return [line.strip() for line in itertools.islice(f, a.n_wiki)]


WORKERS = {"build": worker_build, "matmul": worker_matmul, "st_train": worker_st_train, "encode": worker_encode}


# ------------------------------------------------------------------------------------ orchestration
class Bench:
    def __init__(self, args):
        self.args, self.env = args, dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                                         MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                                         TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.work = tempfile.mkdtemp(prefix="bench_vs_st_")
        self.records = []
        # A 30-pair dev file for the end-of-run evaluation train.py always does: keeps it out of the
        # way (checkpoint selection is moot: both runs evaluate once, at the last step).
        self.tiny_dev = os.path.join(self.work, "tiny-dev.tsv")
        with open(os.path.join(args.data_dir, "KorSTS", "sts-dev.tsv"), encoding="utf-8") as src, \
                open(self.tiny_dev, "w", encoding="utf-8") as dst:
            dst.writelines(itertools.islice(src, 31))

    def me(self, job, **kw):
        cmd = [os.path.abspath(__file__), "--_job", job]
        for k, v in kw.items():
            if v is not None:
                cmd += [f"--{k}", str(v)]
        return cmd

    def log(self, msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def build(self, name, hidden, layers):
        out = os.path.join(self.work, name)
        _, _, stdout = run_job([sys.executable, *self.me("build", tokenizer=self.args.tokenizer, out=out, hidden=hidden,
                                                         layers=layers, max_len=self.args.max_len)], self.env)
        return out, job_result(stdout)["params"]

    def train_cfg(self, objective, model, batch, steps, warmup):
        a = self.args
        return dict(objective=objective, model=model, batch_size=batch, steps=steps, warmup_steps=warmup,
                    max_len=a.max_len, seed=a.seed, data_dir=a.data_dir, bucket_tokens=a.bucket_tokens,
                    max_train_samples=a.unsup_samples if objective == "unsup" else None, **HPARAMS[objective])

    def ours_cmd(self, c, out):
        if c["objective"] in ("sup", "unsup"):
            cmd = [os.path.join(ROOT, "KoSimCSE", "train.py"), "--mode", c["objective"], "--train_file",
                   *(NLI_FILES if c["objective"] == "sup" else ["wiki/wiki_corpus.txt"])]
            if c["max_train_samples"]:
                cmd += ["--max_train_samples", str(c["max_train_samples"])]
        else:
            cmd = [os.path.join(ROOT, "KoSBERT", "train.py"), "--mode", c["objective"]]
            if c["objective"] == "nli":
                cmd += ["--train_file", *NLI_FILES]
        return [sys.executable, *cmd, "--model", c["model"], "--data_dir", c["data_dir"], "--dev_file", self.tiny_dev,
                "--output_dir", out, "--overwrite_output_dir", "--pooler", "mean", "--batch_size", str(c["batch_size"]),
                "--max_steps", str(c["steps"]), "--eval_steps", str(c["steps"]), "--logging_steps", "1",
                "--max_len", str(c["max_len"]), "--lr", str(c["lr"]), "--warmup_ratio", str(c["warmup_ratio"]),
                "--weight_decay", str(c["weight_decay"]), "--max_grad_norm", str(c["max_grad_norm"]),
                "--eval_batch_size", "64", "--seed", str(c["seed"]), "--bucket_tokens", str(c["bucket_tokens"]),
                "--device", "cpu"]

    def run_ours(self, c, out):
        wall, gb, _ = run_job(self.ours_cmd(c, out), self.env)
        with open(os.path.join(out, "train_log.jsonl")) as f:
            clock = {e["step"]: e["elapsed_s"] for e in map(json.loads, f) if "elapsed_s" in e}
        w, s = c["warmup_steps"], c["steps"]
        seconds = clock[s] - clock[w]
        return {"examples_per_s": (s - w) * c["batch_size"] / seconds, "seconds": seconds, "peak_gb": gb,
                "wall_s": wall, "model_dir": os.path.join(out, "best_model")}

    def run_st(self, c, out=None):
        cfg = {k: v for k, v in c.items()}
        wall, gb, stdout = run_job([sys.executable, *self.me("st_train", save=out, **cfg)], self.env)
        return {**job_result(stdout), "peak_gb": gb, "wall_s": wall, "model_dir": out}

    def record(self, **kw):
        kw.setdefault("foreign_cpu", LAST_FOREIGN[0])
        self.records.append(kw)
        extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in kw.items()
                 if k in ("examples_per_s", "sentences_per_s", "peak_gb", "wall_s", "seconds", "foreign_cpu")}
        self.log(f"{kw['kind']} {kw.get('objective', kw.get('corpus', ''))} {kw['model']} {kw['impl']}: {extra}")

    def throughput(self, model_name, model, objectives, batch, steps, warmup, repeats):
        for rep in range(repeats):
            for obj in objectives:
                c = self.train_cfg(obj, model, batch, steps, warmup)
                r = self.run_ours(c, os.path.join(self.work, f"ours-{model_name}-{obj}"))
                self.record(kind="train", objective=obj, model=model_name, impl="ours", rep=rep, **r)
                r = self.run_st(c)
                self.record(kind="train", objective=obj, model=model_name, impl="st", rep=rep, **r)

    def encoding(self, model_name, model, corpora, repeats):
        a = self.args
        for rep in range(repeats):
            for corpus in corpora:
                for impl in ("ours", "st"):
                    wall, gb, stdout = run_job([sys.executable, *self.me(
                        "encode", impl=impl, model=model, corpus=corpus, data_dir=a.data_dir, batch_size=a.encode_batch,
                        max_len=a.max_len, n_wiki=a.n_wiki)], self.env)
                    self.record(kind="encode", corpus=corpus, model=model_name, impl=impl, rep=rep,
                                peak_gb=gb, wall_s=wall, **job_result(stdout))

    def quality(self, objectives, batch, steps):
        for obj in objectives:
            c = self.train_cfg(obj, self.args.proxy_model, batch, steps, min(2, steps - 1))
            ours = self.run_ours(c, os.path.join(self.work, f"q-ours-{obj}"))
            ours["foreign_cpu"] = LAST_FOREIGN[0]
            st = self.run_st(c, os.path.join(self.work, f"q-st-{obj}"))
            st["foreign_cpu"] = LAST_FOREIGN[0]
            for impl, r in (("ours", ours), ("st", st)):
                out_json = os.path.join(self.work, f"q-{impl}-{obj}.json")
                run_job([sys.executable, os.path.join(ROOT, "KoSimCSE", "evaluation.py"), "--model_dir", r["model_dir"],
                         "--data_dir", self.args.data_dir, "--dataset", "korsts-test", "--batch_size", "128",
                         "--device", "cpu", "--output_json", out_json], self.env)
                with open(out_json) as f:
                    m = json.load(f)[0]["metrics"]
                self.record(kind="quality", objective=obj, model="proxy", impl=impl, avg=m["avg"],
                            cosine_spearman=m["cosine_spearman"], train_examples_per_s=r["examples_per_s"],
                            peak_gb=r["peak_gb"], wall_s=r["wall_s"], foreign_cpu=r["foreign_cpu"])

    def matmul_peak(self):
        _, _, stdout = run_job([sys.executable, *self.me("matmul", n=self.args.matmul_n, reps=5)], self.env)
        return job_result(stdout)


def median(records, key, **where):
    vals = [r[key] for r in records if all(r.get(k) == v for k, v in where.items())]
    return statistics.median(vals) if vals else None


def mfu(records, model_name, nonemb_params, layers, hidden, peak_gflops):
    """MFU % of ours and ST on the sup objective, padded and real-token FLOPs, medians over repeats."""
    out = {}
    st_runs = [r for r in records if r["kind"] == "train" and r["model"] == model_name and r["objective"] == "sup"
               and r["impl"] == "st"]
    if not st_runs:
        return out
    tokens = st_runs[0]["tokens"]  # deterministic: the same batches in every run, ours and ST
    for impl in ("ours", "st"):
        runs = [r for r in records if r["kind"] == "train" and r["model"] == model_name and r["objective"] == "sup"
                and r["impl"] == impl]
        seconds = statistics.median(r["seconds"] for r in runs)
        padded, l2 = tokens[f"{impl}_padded"], tokens[f"{impl}_seq_l2"]
        flops = 6 * nonemb_params * padded + 12 * layers * hidden * l2
        # real tokens: the same formula with every sequence at its own length
        flops_real = 6 * nonemb_params * tokens["real"] + 12 * layers * hidden * tokens["real"] * (l2 / padded)
        out[impl] = {"mfu_padded_pct": 100 * flops / seconds / 1e9 / peak_gflops,
                     "mfu_real_pct": 100 * flops_real / seconds / 1e9 / peak_gflops,
                     "gflops_per_s": flops / seconds / 1e9, "padded_tokens": padded, "real_tokens": tokens["real"],
                     "padding_fraction": 1 - tokens["real"] / padded}
    return out


def verdict(ok):
    return "PASS" if ok else "FALL SHORT"


def report(b, sizes, peak, mfus, elapsed):
    recs, lines = b.records, []
    lines.append(f"{'figure':44s} {'ours':>10s} {'ST':>10s} {'ours/ST':>8s}  target")
    for model_name in sizes:
        for obj in OBJECTIVES:
            o = median(recs, "examples_per_s", kind="train", model=model_name, objective=obj, impl="ours")
            s = median(recs, "examples_per_s", kind="train", model=model_name, objective=obj, impl="st")
            if o is None:
                continue
            s_ex = median(recs, "examples_per_s_excl_tokenize", kind="train", model=model_name, objective=obj, impl="st")
            lines.append(f"{'train ex/s ' + obj + ' [' + model_name + ']':44s} {o:10.1f} {s:10.1f} {o / s:8.2f}  "
                         f">= {TARGETS['train']}x: {verdict(o / s >= TARGETS['train'])}  "
                         f"(ST excl. in-loop tokenisation {s_ex:.1f}: {o / s_ex:.2f}x)")
            og = median(recs, "peak_gb", kind="train", model=model_name, objective=obj, impl="ours")
            sg = median(recs, "peak_gb", kind="train", model=model_name, objective=obj, impl="st")
            lines.append(f"{'  peak RSS GB train ' + obj + ' [' + model_name + ']':44s} {og:10.2f} {sg:10.2f} {og / sg:8.2f}")
    for model_name in sizes:
        for corpus in ("korsts-test", "wiki"):
            o = median(recs, "sentences_per_s", kind="encode", model=model_name, corpus=corpus, impl="ours")
            s = median(recs, "sentences_per_s", kind="encode", model=model_name, corpus=corpus, impl="st")
            if o is None:
                continue
            n = median(recs, "n", kind="encode", model=model_name, corpus=corpus, impl="ours")
            lines.append(f"{'encode sent/s ' + corpus + f' ({n:,})' + ' [' + model_name + ']':44s} {o:10.1f} {s:10.1f} {o / s:8.2f}  "
                         f">= {TARGETS['encode']}x: {verdict(o / s >= TARGETS['encode'])}")
            og = median(recs, "peak_gb", kind="encode", model=model_name, corpus=corpus, impl="ours")
            sg = median(recs, "peak_gb", kind="encode", model=model_name, corpus=corpus, impl="st")
            lines.append(f"{'  peak RSS GB encode ' + corpus + ' [' + model_name + ']':44s} {og:10.2f} {sg:10.2f} {og / sg:8.2f}")
    for obj in OBJECTIVES:
        o = median(recs, "avg", kind="quality", objective=obj, impl="ours")
        s = median(recs, "avg", kind="quality", objective=obj, impl="st")
        if o is None:
            continue
        oc = median(recs, "cosine_spearman", kind="quality", objective=obj, impl="ours")
        sc = median(recs, "cosine_spearman", kind="quality", objective=obj, impl="st")
        lines.append(f"{'KorSTS test AVG ' + obj + ' [proxy]':44s} {o:10.2f} {s:10.2f} {o - s:+8.2f}  "
                     f">= ST{TARGETS['quality']}: {verdict(o - s >= TARGETS['quality'])}")
        lines.append(f"{'KorSTS test cosine Spearman ' + obj + ' [proxy]':44s} {oc:10.2f} {sc:10.2f} {oc - sc:+8.2f}  "
                     f">= ST{TARGETS['quality']}: {verdict(oc - sc >= TARGETS['quality'])}")
    if mfus:
        o, s = mfus["ours"], mfus["st"]
        lines.append(f"fp32 matmul peak: {peak['gflops']:.1f} GFLOP/s ({peak['threads']} threads, n={peak['n']})")
        lines.append(f"{'MFU % sup [base], padded tokens':44s} {o['mfu_padded_pct']:10.1f} {s['mfu_padded_pct']:10.1f} "
                     f"{o['mfu_padded_pct'] / s['mfu_padded_pct']:8.2f}  >= {TARGETS['mfu']}%: "
                     f"{verdict(o['mfu_padded_pct'] >= TARGETS['mfu'])}")
        lines.append(f"{'MFU % sup [base], real tokens only':44s} {o['mfu_real_pct']:10.1f} {s['mfu_real_pct']:10.1f} "
                     f"{o['mfu_real_pct'] / s['mfu_real_pct']:8.2f}  >= {TARGETS['mfu']}%: "
                     f"{verdict(o['mfu_real_pct'] >= TARGETS['mfu'])}")
        lines.append(f"{'padding fraction sup [base] (of tokens run)':44s} {o['padding_fraction'] * 100:9.1f}% "
                     f"{s['padding_fraction'] * 100:9.1f}%")
    timed = [r for r in recs if r["kind"] in ("train", "encode")]
    busy = [r for r in timed if r["foreign_cpu"] > 0.05]
    if busy:
        lines.append(f"WARNING: {len(busy)} of {len(timed)} timed jobs ran while other processes used > 5% of the CPUs "
                     f"(worst {100 * max(r['foreign_cpu'] for r in busy):.0f}%): their figures are slowed by contention; "
                     f"medians over the A/B pairs soften this but do not remove it")
    lines.append(f"total runtime {elapsed:.0f} s")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--tokenizer", help="tokenizer folder of the random KLUE-shape models (klue-roberta-base)")
    p.add_argument("--proxy_model", help="pretrained model folder for the quality runs (e.g. multilingual-e5-small)")
    p.add_argument("--output_json", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 pair, few steps, sup-only quality")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every job (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="ours/ST pairs per throughput figure (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_len", type=int, default=64)
    p.add_argument("--small_hidden", type=int, default=256)
    p.add_argument("--small_layers", type=int, default=4)
    p.add_argument("--encode_batch", type=int, default=128)
    p.add_argument("--n_wiki", type=int, default=None, help="wiki lines to encode (default 20,000; quick 2,000)")
    p.add_argument("--unsup_samples", type=int, default=20_000)
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--bucket_tokens", type=int, default=512,
                   help="our trainers' --bucket_tokens (0: one pass over the whole padded batch, as before)")
    p.add_argument("--skip", nargs="*", default=[], choices=("small", "base", "encode", "quality"))
    # worker-only arguments
    p.add_argument("--_job", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    for name, typ in (("out", str), ("hidden", int), ("layers", int), ("n", int), ("reps", int), ("objective", str),
                      ("model", str), ("batch_size", int), ("steps", int), ("warmup_steps", int), ("lr", float),
                      ("warmup_ratio", float), ("weight_decay", float), ("max_grad_norm", float),
                      ("max_train_samples", int), ("save", str), ("impl", str), ("corpus", str)):
        p.add_argument(f"--{name}", type=typ, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._job:
        return WORKERS[args._job](args)
    if not args.tokenizer or not args.proxy_model:
        p.error("--tokenizer and --proxy_model are required")
    args.data_dir = os.path.abspath(args.data_dir)
    q = args.quick
    repeats = args.repeats or (1 if q else 3)
    args.n_wiki = args.n_wiki or (2_000 if q else 20_000)
    start = time.time()
    b = Bench(args)
    b.log(f"work folder {b.work}; OMP_NUM_THREADS={args.threads}")
    sizes, mfus, peak = {}, {}, None
    try:
        if "small" not in args.skip or "encode" not in args.skip:
            small, n_small = b.build("small", args.small_hidden, args.small_layers)
            b.log(f"small model {args.small_hidden}/{args.small_layers}: {n_small:,} params")
        if "small" not in args.skip:
            sizes["small"] = 1
            b.throughput("small", small, OBJECTIVES, batch=32, steps=6 if q else 16, warmup=2 if q else 4,
                         repeats=repeats)
        if "encode" not in args.skip:
            sizes["small"] = 1
            b.encoding("small", small, ("korsts-test", "wiki"), repeats)
        if "base" not in args.skip:
            base, n_base = b.build("base", 768, 12)
            peak = b.matmul_peak()
            b.log(f"fp32 matmul peak {peak['gflops']:.1f} GFLOP/s")
            sizes["base"] = 1
            b.throughput("base", base, ("sup",), batch=16, steps=3 if q else 4, warmup=1, repeats=repeats)
            nonemb = base_nonembedding_params(768, 12)
            mfus = mfu(b.records, "base", nonemb, 12, 768, peak["gflops"])
        if "quality" not in args.skip:
            b.quality(("sup",) if q else OBJECTIVES, batch=8 if q else 16, steps=3 if q else 8)
    finally:
        elapsed = time.time() - start
    text = report(b, sizes, peak, mfus, elapsed)
    print("\n" + text)
    if args.output_json:
        write_json(args.output_json,
                   {"args": {k: v for k, v in vars(args).items() if not k.startswith("_") and v is not None},
                    "records": b.records, "matmul_peak": peak, "mfu": mfus, "report": text, "runtime_s": elapsed},
                   indent=2, ensure_ascii=False)
    shutil.rmtree(b.work, ignore_errors=True)


def base_nonembedding_params(hidden, layers):
    """Encoder-layer parameters of a BERT layer stack (no embeddings, no pooler)."""
    return layers * (12 * hidden * hidden + 13 * hidden)  # QKVO 4h^2+4h, FFN 8h^2+5h, 2 LayerNorms 4h


if __name__ == "__main__":
    main()

"""Where the time of a supervised SimCSE step goes: our loop (KoSimCSE/train.py's pieces) vs sentence-transformers.

    OMP_NUM_THREADS=2 python bench/profile_sup.py --model MODEL_DIR --data_dir /work/shared/data --steps 12

MODEL_DIR: any HF BERT folder, e.g. the small random KLUE-shape model bench/bench_vs_st.py builds
(`python bench/bench_vs_st.py --_job build --tokenizer ... --out DIR --hidden 256 --layers 4 --max_len 64`).
Both loops see the same batches (BatchPlan, same seed), batch, max_len, lr and fused AdamW, mean pooling.
Per step, wall-clock split into: batch preparation (ours: ColumnCollator over pre-tokenised ids;
ST: tokenising the three columns), forward + loss, backward, optimizer; the padding fraction of the
tokens each forward runs; and torch.profiler's top operators over the timed steps. Ours is timed at
each --bucket_tokens value given (train.py's CPU default 512, and 0 = one forward over the 3B rows
padded to the longest of all, as before length buckets).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
NLI_FILES = ["KLUE-NLI/klue_nli_train.tsv"]  # a training split (XNLI and KLUE-NLI dev are MTEB's)


def timed_loop(name, steps, warmup, prepare, forward_loss, optimizer, profile):
    from torch.profiler import ProfilerActivity, profile as tprofile
    parts = {"prepare": [], "forward+loss": [], "backward": [], "optimizer": []}
    pad = {"real": 0, "run": 0}
    prof = None
    for step in range(steps):
        if step == warmup and profile:
            prof = tprofile(activities=[ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        t0 = time.perf_counter()
        batch = prepare(step)
        t1 = time.perf_counter()
        loss, real, run = forward_loss(batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        t4 = time.perf_counter()
        if step >= warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k].append(v)
            pad["real"] += real
            pad["run"] += run
    if prof is not None:
        prof.__exit__(None, None, None)
    total = sum(np.mean(v) for v in parts.values())
    print(f"\n== {name}: {total * 1000:.0f} ms/step over {steps - warmup} steps; padding {100 * (1 - pad['real'] / pad['run']):.1f}% "
          f"of {pad['run'] / (steps - warmup):.0f} tokens/step run ({pad['real'] / (steps - warmup):.0f} real)")
    for k, v in parts.items():
        print(f"   {k:14s} {np.mean(v) * 1000:8.1f} ms  ({100 * np.mean(v) / total:4.1f}%)")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    return {k: float(np.mean(v)) for k, v in parts.items()}, pad


def padding_over_epoch(model_dir, data_dir, batch_size, max_len, bucket_tokens):
    """Token counts over one whole epoch of sup batches under four padding rules: one pass (3B rows
    padded to the longest of all), ours (length buckets of at least ``bucket_tokens``), per column
    (each of the 3 columns padded to its own longest), and ST 6.x (anchor column alone,
    positive+negative merged and padded together); with the L^2 attention sum."""
    from common.data import BatchPlan
    from common.encoding import length_buckets
    from common.tokenizer import load_tokenizer
    from dataloader import build_contrastive_dataset
    dataset = build_contrastive_dataset("sup", [os.path.join(data_dir, f) for f in NLI_FILES],
                                        load_tokenizer(model_dir), max_len, log=lambda m: None)
    plan = BatchPlan(len(dataset), batch_size, 42)
    tot = {k: 0 for k in ("real", "one_pass", "ours", "per_column", "st", "one_pass_l2", "ours_l2", "per_column_l2",
                          "st_l2")}
    for idx in plan.batches(0):
        cols = [[len(dataset[i][c]) for i in idx] for c in range(3)]
        b, allmax = len(idx), max(max(c) for c in cols)
        tot["real"] += sum(map(sum, cols))
        tot["one_pass"] += 3 * b * allmax
        tot["one_pass_l2"] += 3 * b * allmax ** 2
        groups = [(len(rows), width) for rows, width in length_buckets(torch.tensor(sum(cols, [])), bucket_tokens)]
        tot["ours"] += sum(n * w for n, w in groups)
        tot["ours_l2"] += sum(n * w * w for n, w in groups)
        tot["per_column"] += sum(b * max(c) for c in cols)
        tot["per_column_l2"] += sum(b * max(c) ** 2 for c in cols)
        cand = max(max(cols[1]), max(cols[2]))
        tot["st"] += b * max(cols[0]) + 2 * b * cand
        tot["st_l2"] += b * max(cols[0]) ** 2 + 2 * b * cand ** 2
    print(f"\n== padding over one epoch ({len(plan)} batches of {batch_size} triplets, max_len {max_len}):")
    for k in ("one_pass", "ours", "per_column", "st"):
        print(f"   {k:11s} {tot[k]:>9,} tokens run, padding {100 * (1 - tot['real'] / tot[k]):4.1f}%, "
              f"{tot[k] / tot['ours']:.3f}x ours' tokens, attention L^2 sum {tot[k + '_l2'] / tot['ours_l2']:.3f}x ours'")
    return tot


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_profiler", action="store_true", help="timings only (the profiler adds overhead)")
    p.add_argument("--only", choices=("ours", "st", "padding"), default=None)
    p.add_argument("--bucket_tokens", type=int, nargs="+", default=[512, 0],
                   help="time ours at each value (train.py: 512 on CPU; 0 = one forward over the whole batch)")
    args = p.parse_args()
    if args.only in (None, "padding"):
        padding_over_epoch(args.model, args.data_dir, args.batch_size, args.max_len, args.bucket_tokens[0])
        if args.only:
            return
    from common.data import BatchPlan, ColumnCollator, resolve_path
    from common.encoding import length_buckets
    from common.stages import build_optimizer
    from common.tokenizer import load_tokenizer
    from dataloader import build_contrastive_dataset, load_triplets
    from model import SentenceEncoder, contrastive_loss

    torch.manual_seed(42)
    plan = BatchPlan(3500, args.batch_size, 42)  # re-made below with the real size
    results = {}
    if args.only in (None, "ours"):
        tokenizer = load_tokenizer(args.model)
        dataset = build_contrastive_dataset("sup", [os.path.join(args.data_dir, f) for f in NLI_FILES], tokenizer,
                                            args.max_len, log=lambda m: None)
        plan = BatchPlan(len(dataset), args.batch_size, 42)
        batches = list(plan.batches(0))
        collate = ColumnCollator(tokenizer.pad_token_id)
        model = SentenceEncoder.from_pretrained(args.model, pooler="mean").train()
        opt = build_optimizer(model, 5e-5, 0.1)

        for n, bucket_tokens in enumerate(args.bucket_tokens):
            model.bucket_tokens = bucket_tokens

            def fl(batch):
                m = batch["attention_mask"]
                run = sum(len(rows) * width for rows, width in length_buckets(m.sum(1), model.bucket_tokens))
                return contrastive_loss(model(**batch), 3, 0.05), int(m.sum()), run

            label = "one forward of 3B rows padded to the max of all" if bucket_tokens <= 0 else "length buckets"
            results[f"ours_bucket{bucket_tokens}"] = timed_loop(
                f"ours, --bucket_tokens {bucket_tokens} ({label})", args.steps, args.warmup,
                lambda s: collate([dataset[i] for i in batches[s]]), fl, opt, n == 0 and not args.no_profiler)
    if args.only in (None, "st"):
        from sentence_transformers import SentenceTransformer, losses
        from sentence_transformers.models import Pooling, Transformer
        triplets = load_triplets([resolve_path(f, args.data_dir) for f in NLI_FILES], log=lambda m: None)
        plan = BatchPlan(len(triplets), args.batch_size, 42)
        batches = list(plan.batches(0))
        transformer = Transformer(args.model, max_seq_length=args.max_len)
        st = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                 device="cpu")
        loss_model = losses.MultipleNegativesRankingLoss(st, scale=20.0).train()
        named = [(n, q) for n, q in loss_model.named_parameters() if q.requires_grad]
        opt = torch.optim.AdamW([{"params": [q for n, q in named if q.ndim >= 2 and "LayerNorm" not in n],
                                  "weight_decay": 0.1},
                                 {"params": [q for n, q in named if q.ndim < 2 or "LayerNorm" in n],
                                  "weight_decay": 0.0}], lr=5e-5, fused=True)
        shapes = []
        st[0].register_forward_pre_hook(lambda mod, a: shapes.append(tuple(a[0]["input_ids"].shape)))

        def prep(s):
            batch = [triplets[i] for i in batches[s]]
            return [st.preprocess([t[c] for t in batch]) for c in range(3)]

        def fl(features):
            del shapes[:]
            loss = loss_model(features, torch.zeros(len(features[0]["input_ids"])))
            return loss, sum(int(f["attention_mask"].sum()) for f in features), sum(r * w for r, w in shapes)

        results["st"] = timed_loop("sentence-transformers MNRL (anchor forward + merged positive/negative forward)",
                                   args.steps, args.warmup, prep, fl, opt, not args.no_profiler)


if __name__ == "__main__":
    main()

"""Gradient caching (--mini_batch_size): peak memory and step time of one supervised SimCSE step at batch 512
with gradient caching, against batch 512 and batch 32 without it.

    OMP_NUM_THREADS=2 python bench/grad_cache.py --tokenizer /path/to/klue-roberta-base [--hidden 256 --layers 4]

Each configuration runs in a fresh process (peak RSS = that process's ru_maxrss) on a random-init BERT
of the KLUE vocabulary's shape and random token batches of length --seq_len (3 sentences per triplet),
through KoSimCSE's own training_step + optimizer step: --steps timed steps after one warm-up step.
Reported: peak RSS, its growth over the process after model + optimizer setup (the activations and
gradients a step needs), the size of the batch's embedding matrix, and seconds per step.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(a):
    sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from model import SentenceEncoder
    from common.stages import build_optimizer
    import train

    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(a.tokenizer))
    backbone = BertModel(BertConfig(vocab_size=vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                    num_attention_heads=max(1, a.hidden // 64), intermediate_size=4 * a.hidden))
    model = SentenceEncoder(backbone, pooler="cls_before_pooler", bucket_tokens=0, mini_batch_size=a.mini).train()
    optimizer = build_optimizer(model, 1e-5, 0.0)
    args = argparse.Namespace(temperature=0.05)
    ids = torch.randint(5, vocab, (3 * a.batch, a.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    setup_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(a.steps + 1):
        start = time.perf_counter()
        loss, _ = train.training_step(model, "sup", batch, args, world=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"batch": a.batch, "mini": a.mini, "peak_gb": peak_kb / 2 ** 20,
                      "step_gb": (peak_kb - setup_kb) / 2 ** 20, "s_per_step": statistics.median(times),
                      "embeddings_mb": 3 * a.batch * a.hidden * 4 / 2 ** 20, "loss": loss.item()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. klue-roberta-base) for the vocabulary size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--configs", default="512:96,512:0,32:0",
                   help="batch:mini_batch_size pairs (mini counts sentences: 96 = 32 triplets)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mini", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        return worker(a)
    rows = []
    for config in a.configs.split(","):
        batch, mini = map(int, config.split(":"))
        cmd = [sys.executable, __file__, "--_worker", "--tokenizer", a.tokenizer, "--hidden", str(a.hidden),
               "--layers", str(a.layers), "--seq_len", str(a.seq_len), "--steps", str(a.steps),
               "--batch", str(batch), "--mini", str(mini)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\nrandom BERT {a.hidden}/{a.layers}, KLUE vocabulary, length {a.seq_len}, fp32, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| triplets per step | --mini_batch_size (sentences) | peak RSS | growth over setup | embeddings | s/step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['mini'] or 'off'} | {r['peak_gb']:.2f} GB | {r['step_gb']:.2f} GB | "
              f"{r['embeddings_mb']:.1f} MB | {r['s_per_step']:.2f} |")


if __name__ == "__main__":
    main()

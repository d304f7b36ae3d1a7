"""Peak memory of the large-corpus paths on the full 1,000,000-sentence wiki corpus.

    python bench/memory_scale.py --data_dir ../shared/data --tokenizer ../shared/tokenizers/klue-roberta-base

Runs, each in a fresh process so that peak RSS (ru_maxrss) belongs to that job alone:
  1. unsup KoSimCSE: training setup (read + tokenise all 1M sentences) + 100 steps, batch 64;
  2. semantic search of 3 queries over the whole corpus, streamed in chunks.
The encoder is a small random BERT with the real KLUE vocabulary (hidden 128, 2 layers): memory of
these paths is dominated by the corpus, not the model. Target: both under 4 GB.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(tokenizer_dir, out):
    from transformers import AutoTokenizer, BertConfig, BertModel
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)


# A fresh wrapper process per job, so that RUSAGE_CHILDREN's peak is that job's alone.
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run(cmd):
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    peak_kb = int(proc.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return time.time() - start, peak_kb / 1024 ** 2, proc.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder (e.g. the KLUE vocabulary)")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    work = tempfile.mkdtemp()
    model = os.path.join(work, "model")
    build_model(args.tokenizer, model)
    wiki = os.path.join(args.data_dir, "wiki", "wiki_corpus.txt")
    seconds, gb, _ = run([sys.executable, os.path.join(ROOT, "KoSimCSE", "train.py"), "--mode", "unsup", "--model", model,
                          "--data_dir", args.data_dir, "--output_dir", os.path.join(work, "unsup"), "--batch_size", "64",
                          "--max_steps", str(args.steps), "--eval_steps", str(args.steps), "--device", "cpu"])
    print(f"unsup training, 1M sentences tokenised + {args.steps} steps: peak RSS {gb:.2f} GB ({seconds:.0f} s)")
    seconds, gb2, out = run([sys.executable, os.path.join(ROOT, "KoSimCSE", "evaluation.py"), "--model_dir", model,
                             "--pooling", "mean", "--task", "search", "--corpus_file", wiki,
                             "--batch_size", "512", "--max_len", "64", "--device", "cpu"])
    print(f"search over {wiki}: peak RSS {gb2:.2f} GB ({seconds:.0f} s)")
    print(out[out.find("Query:"):][:400])


if __name__ == "__main__":
    main()

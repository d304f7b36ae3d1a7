"""Fingerprint what a tiny run of every method folder produces, to show a refactor changed no output.

Builds the test suite's tiny models and synthetic data (tests/conftest.py), trains each method folder for a
few steps through its own train.py, evaluates the best model with its evaluation.py (sts under both
protocols, streaming search, an index build and a search of it), and prints one JSON object: the sha256
of every saved weight file, the dev scores in train_log.jsonl, the STS rows and the search output.
Run it on two commits and compare:

    python bench/outputs_check.py > before.json   # at the old commit
    python bench/outputs_check.py > after.json    # at the new one
    diff before.json after.json                   # empty: the same models, scores and tables
"""
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import conftest  # noqa: E402

RUNS = {
    "KoSimCSE-sup": ("KoSimCSE", ["--mode", "sup", "--train_file", "KorNLI/nli.train.ko.tsv", "--pooler", "mean"]),
    "KoSimCSE-unsup": ("KoSimCSE", ["--mode", "unsup", "--max_train_samples", "200"]),
    "KoSimCSE-multitask": ("KoSimCSE", ["--mode", "multitask", "--train_file", "KorNLI/nli.train.ko.tsv",
                                        "--sts_file", "KorSTS/sts-train.tsv"]),
    "KoSBERT-nli_sts": ("KoSBERT", ["--mode", "nli_sts", "--nli_file", "KorNLI/nli.train.ko.tsv",
                                    "--sts_file", "KorSTS/sts-train.tsv", "--sts_epochs", "1"]),
    "KoSentenceT5-sup": ("KoSentenceT5", ["--mode", "sup", "--train_file", "KorNLI/nli.train.ko.tsv", "--arch", "t5"]),
    "KoDiffCSE": ("KoDiffCSE", ["--generator_name", "GENERATOR"]),
}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def run(cmd):
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"))
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def build_models(tmp):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, T5Config, T5Model
    bert = os.path.join(tmp, "bert")
    tok = conftest.train_tokenizer(bert, conftest.corpus_texts())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
              ).save_pretrained(bert)
    gen = os.path.join(tmp, "generator")
    AutoTokenizer.from_pretrained(bert).save_pretrained(gen)
    torch.manual_seed(1)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
                    ).save_pretrained(gen)
    t5 = os.path.join(tmp, "t5")
    t5_tok = conftest.seq2seq_tokenizer(t5, ["<pad>", "</s>", "<unk>"], "$A:0 </s>:0")
    torch.manual_seed(0)
    T5Model(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                     decoder_start_token_id=t5_tok.pad_token_id, pad_token_id=t5_tok.pad_token_id,
                     eos_token_id=t5_tok.eos_token_id)).save_pretrained(t5)
    return bert, gen, t5


def main():
    tmp = tempfile.mkdtemp(prefix="outputs-check-")
    data = conftest.write_synthetic_data(os.path.join(tmp, "data"))
    bert, gen, t5 = build_models(tmp)
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(conftest.corpus_texts()[:300]) + "\n")
    report = {}
    for name, (folder, flags) in RUNS.items():
        out = os.path.join(tmp, "runs", name)
        flags = [gen if f == "GENERATOR" else f for f in flags]
        run([f"{folder}/train.py", "--model", t5 if folder == "KoSentenceT5" else bert, "--data_dir", data,
             "--output_dir", out, "--batch_size", "16", "--max_len", "24", "--max_steps", "6", "--eval_steps", "3",
             "--logging_steps", "2", "--seed", "0", "--device", "cpu", *flags])
        best = os.path.join(out, "best_model")
        entry = {"weights": {os.path.relpath(p, best): sha(p) for p in sorted(glob.glob(f"{best}/**/*.safetensors",
                                                                                         recursive=True))}}
        with open(os.path.join(out, "train_log.jsonl")) as f:
            entry["dev"] = [json.loads(line).get("dev") for line in f if '"dev"' in line]
        rows = os.path.join(tmp, f"{name}.json")
        run([f"{folder}/evaluation.py", "--model_dir", best, "--data_dir", data, "--dataset", "korsts-test",
             "korsts-dev", "--protocol", "standard", "bmk", "--batch_size", "50", "--output_json", rows])
        with open(rows) as f:
            entry["sts"] = [(r["dataset"], r["protocol"], r["metrics"]) for r in json.load(f)]
        entry["search"] = run([f"{folder}/evaluation.py", "--model_dir", best, "--task", "search", "--top_k", "3",
                               "--corpus_file", corpus, "--queries", "사과 바나나", "기차 역 승객"])
        index_dir = os.path.join(tmp, f"{name}-index")
        run([f"{folder}/evaluation.py", "--model_dir", best, "--task", "index", "--corpus_file", corpus,
             "--index_dir", index_dir, "--chunk_size", "128"])
        entry["index"] = {f: sha(os.path.join(index_dir, f)) for f in ("embeddings.npy", "offsets.npy", "index.faiss")}
        entry["index_search"] = run([f"{folder}/evaluation.py", "--model_dir", best, "--task", "search", "--top_k",
                                     "3", "--index_dir", index_dir, "--queries", "사과 바나나", "기차 역 승객"])
        report[name] = entry
        print(name, "done", file=sys.stderr)
    print(json.dumps(report, ensure_ascii=False, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

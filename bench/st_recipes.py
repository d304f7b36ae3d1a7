"""The real-data table's recipes in sentence-transformers itself, for the side-by-side rows of utils/real_table.py.

    python bench/st_recipes.py --recipe sup --model M --data_dir D --seed 1 --output_dir OUT [--bf16]
    python bench/st_recipes.py --recipe sts --model M --data_dir D --seed 1 --output_dir OUT [--bf16]
    python bench/st_recipes.py --recipe pairs --train_file ICT.tsv --max_train_samples 4800 --scale 50 ...

sup: MultipleNegativesRankingLoss (scale 20 = 1 / SimCSE's temperature 0.05) on (premise, entailment,
contradiction) triplets of the NLI file, built by the same rule as KoSimCSE (its dataloader reads them);
sts: CosineSimilarityLoss on KorSTS train pairs, score / 5; pairs: MultipleNegativesRankingLoss on the
(anchor, positive) rows of an anchor/positive TSV (data/make_ict.py), the same seeded --max_train_samples subset
as KoSimCSE --mode pairs, with e5's prompts through the trainer's ``prompts`` argument ("query: " before anchors,
"passage: " before positives) and recorded in the saved model; one --max_len for both (sentence-transformers has
no separate passage limit). All: the backbone with mean pooling, the same
batch, learning rate, linear warmup, epochs, max_len and seed as our preset, no weight decay and no
clipping (ours), full batches only for sup (ours); the checkpoint is selected on KorSTS dev (cosine
Spearman, sentence-transformers' EmbeddingSimilarityEvaluator) every --eval_steps. The training data goes
through the same decontamination guard (--decontaminate drop) as our rows. The best model is saved to
OUTPUT_DIR/best_model and scored by KoSimCSE/evaluation.py like every other row; OUTPUT_DIR/st_run.json
records the wall time of training.
"""
import argparse
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ itself, also when imported by path
from benchio import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=("sup", "sts", "pairs"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--train_file", default=None, help="sup: the NLI file (default KLUE-NLI train); sts: the STS file")
    p.add_argument("--dev_file", default="korsts-dev")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max_len", type=int, default=64)
    p.add_argument("--eval_steps", type=int, default=50)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--max_steps", type=int, default=-1, help="a wiring check: stop after this many steps")
    p.add_argument("--max_train_samples", type=int, default=None, help="pairs: a seeded subset, as ours")
    p.add_argument("--scale", type=float, default=20.0, help="MNRL scale = 1 / temperature (sup, pairs)")
    a = p.parse_args(argv)

    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    from sentence_transformers.models import Pooling, Transformer

    from common.data import read_sts, resolve_path
    from common.decontaminate import guard
    from dataloader import load_pairs, load_triplets

    os.makedirs(a.output_dir, exist_ok=True)
    source = {"sup": "sup", "sts": "sts", "pairs": "pairs"}[a.recipe]
    flags = argparse.Namespace(train_file=[a.train_file or "KLUE-NLI/klue_nli_train.tsv"], nli_file=None,
                               sts_file=a.train_file or "korsts-train", data_dir=a.data_dir, decontaminate="drop",
                               output_dir=a.output_dir)
    guard(flags, [source])
    torch.manual_seed(a.seed)
    transformer = Transformer(a.model, max_seq_length=a.max_len)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_word_embedding_dimension(), "mean")],
                                device="cuda" if torch.cuda.is_available() else "cpu")
    if a.recipe == "sup":
        rows = load_triplets([flags.train_file[0]], log=print)
        train = Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows],
                                   "negative": [r[2] for r in rows]})
        loss = losses.MultipleNegativesRankingLoss(model, scale=a.scale)
    elif a.recipe == "pairs":
        import random
        rows = load_pairs([flags.train_file[0]], log=print)
        if a.max_train_samples is not None and a.max_train_samples < len(rows):
            rows = random.Random(a.seed).sample(rows, a.max_train_samples)  # KoSimCSE's subset of the same seed
        train = Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]})
        loss = losses.MultipleNegativesRankingLoss(model, scale=a.scale)
        model.prompts, model.default_prompt_name = {"query": "query: ", "passage": "passage: "}, None
    else:
        rows = read_sts(resolve_path(flags.sts_file, a.data_dir))
        train = Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                                   "score": [r[2] / 5.0 for r in rows]})
        loss = losses.CosineSimilarityLoss(model)
    dev = read_sts(resolve_path(a.dev_file, a.data_dir))
    evaluator = EmbeddingSimilarityEvaluator([d[0] for d in dev], [d[1] for d in dev], [d[2] / 5.0 for d in dev],
                                             name="dev", batch_size=128)
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(a.output_dir, "trainer"), num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch_size, learning_rate=a.lr, warmup_ratio=a.warmup_ratio,
        weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="linear", bf16=a.bf16, seed=a.seed, data_seed=a.seed,
        eval_strategy="steps", eval_steps=a.eval_steps, save_strategy="steps", save_steps=a.eval_steps,
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_dev_spearman_cosine",
        greater_is_better=True, logging_steps=a.eval_steps, report_to="none", max_steps=a.max_steps,
        dataloader_drop_last=a.recipe != "sts", use_cpu=not torch.cuda.is_available(),
        prompts={"anchor": "query: ", "positive": "passage: "} if a.recipe == "pairs" else None)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss, evaluator=evaluator)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    model.save(os.path.join(a.output_dir, "best_model"))
    info = {"recipe": a.recipe, "train_seconds": round(seconds, 1), "examples": len(train),
            "best_metric": trainer.state.best_metric, "global_step": trainer.state.global_step, "args": vars(a)}
    write_json(os.path.join(a.output_dir, "st_run.json"), info, indent=2)
    import shutil
    shutil.rmtree(os.path.join(a.output_dir, "trainer"), ignore_errors=True)  # checkpoints: the best is saved
    print(f"trained in {seconds:.0f} s; best dev cosine Spearman {trainer.state.best_metric}")


if __name__ == "__main__":
    main()

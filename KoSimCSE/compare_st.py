"""Peer check: supervised SimCSE with sentence-transformers' own MultipleNegativesRankingLoss.

Trains ``--model`` as SentenceTransformer(Transformer + Pooling) with
``losses.MultipleNegativesRankingLoss`` (scale 20 = 1/0.05) on (anchor, positive, hard negative)
triplets, in a plain loop that mirrors ``train.py --mode sup``: the same triplets and the same
batches (BatchPlan with the same seed), AdamW with the same weight decay except biases and LayerNorm
weights, the same linear warmup schedule and number of steps, no clipping. Score the saved model with
evaluation.py so that both runs are measured by the same code:

    python KoSimCSE/compare_st.py --model /tmp/me5-small --data_dir ../shared/data --output_dir output/st-mnrl \
        --train_file KorNLI/xnli.dev.ko.tsv KorNLI/xnli.test.ko.tsv KLUE-NLI/klue-nli-v1.1_dev.json \
        --pooler mean --batch_size 32 --max_len 32 --max_steps 40 --lr 3e-5 --warmup_ratio 0.1
    python KoSimCSE/evaluation.py --model_dir output/st-mnrl --data_dir ../shared/data --dataset korsts-test

(SentenceTransformerTrainer needs the ``datasets`` and ``accelerate`` packages; this loop does not.)
"""
import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from dataloader import BatchPlan, load_triplets, resolve_path
from evaluation import DEFAULT_DATA_DIR
from run_utils import build_optimizer, set_seed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--train_file", nargs="+", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--pooler", choices=("cls", "mean"), default="cls")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--max_len", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    from sentence_transformers import SentenceTransformer, losses
    from sentence_transformers.models import Pooling, Transformer

    set_seed(args.seed)
    transformer = Transformer(args.model, max_seq_length=args.max_len)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(),
                                                               pooling_mode=args.pooler)], device="cpu")
    loss_model = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    triplets = load_triplets([resolve_path(f, args.data_dir) for f in args.train_file])
    plan = BatchPlan(len(triplets), args.batch_size, args.seed)
    optimizer = build_optimizer(loss_model, args.lr, args.weight_decay)  # the same decay groups as train.py
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * args.max_steps), args.max_steps)
    loss_model.train()
    step, start = 0, time.time()
    with tqdm(total=args.max_steps, desc="sentence-transformers MultipleNegativesRankingLoss") as bar:
        while step < args.max_steps:
            for idx in plan.batches(step // len(plan), step % len(plan)):
                batch = [triplets[i] for i in idx]
                features = [model.tokenize([t[c] for t in batch]) for c in range(3)]
                loss = loss_model(features, torch.zeros(len(batch)))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if step >= args.max_steps:
                    break
    model.save(args.output_dir)
    print(f"{step} steps in {time.time() - start:.0f}s; saved {args.output_dir}")


if __name__ == "__main__":
    main()

"""Peer check: the same STS regression run with sentence-transformers' own CosineSimilarityLoss.

Trains ``--model`` with SentenceTransformer(Transformer + mean Pooling) and
``losses.CosineSimilarityLoss`` in a plain loop that mirrors train.py --mode sts exactly: the same
pairs (score / 5), the same seeded shuffle and batches (BatchPlan, batch 32, last batch kept),
AdamW with weight decay 0.01 except biases and LayerNorm weights, linear schedule with 10% warmup,
gradient clipping at 1.0, the same number of steps. The final model is saved to --output_dir; score
it with evaluation.py so that both runs are measured by the same code:

    python KoSBERT/compare_st.py --model /tmp/me5-small --output_dir output/st-sts --max_len 64
    python KoSBERT/evaluation.py --model_dir output/st-sts --dataset korsts-test

(SentenceTransformerTrainer needs the ``datasets`` and ``accelerate`` packages; this loop does not.)
"""
import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from dataloader import BatchPlan, load_sts_pairs, resolve_path
from evaluation import DEFAULT_DATA_DIR
from run_utils import build_optimizer, set_seed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--sts_file", default="korsts-train")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    from sentence_transformers import SentenceTransformer, losses
    from sentence_transformers.models import Pooling, Transformer

    set_seed(args.seed)
    transformer = Transformer(args.model, max_seq_length=args.max_len)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")],
                                device="cpu")
    loss_model = losses.CosineSimilarityLoss(model)
    pairs = load_sts_pairs(resolve_path(args.sts_file, args.data_dir))
    plan = BatchPlan(len(pairs), args.batch_size, args.seed, drop_last=False)
    total = args.max_steps if args.max_steps > 0 else args.epochs * len(plan)
    optimizer = build_optimizer(loss_model, args.lr, args.weight_decay)  # the same decay groups as train.py
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    loss_model.train()
    step, start = 0, time.time()
    with tqdm(total=total, desc="sentence-transformers CosineSimilarityLoss") as bar:
        while step < total:
            for idx in plan.batches(step // len(plan), step % len(plan)):
                batch = [pairs[i] for i in idx]
                features = [model.tokenize([b[0] for b in batch]), model.tokenize([b[1] for b in batch])]
                labels = torch.tensor([b[2] for b in batch], dtype=torch.float)
                loss = loss_model(features, labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(loss_model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if step >= total:
                    break
    model.save(args.output_dir)
    print(f"{step} steps in {time.time() - start:.0f}s; saved {args.output_dir}")


if __name__ == "__main__":
    main()

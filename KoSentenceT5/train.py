"""Train KoSentenceT5: Sentence-T5 style encoders (T5 encoder or BART, mean pooling) with SimCSE's
contrastive loss -- supervised on NLI triplets (in-batch + hard negatives) or unsupervised on wiki.

Defaults by mode (a flag given on the command line always wins):
  sup    BM-K's KoSentenceT5 run_example.sh: batch 64, 2 epochs, lr 1e-4, max_len 110, warmup 0.01,
         weight decay 0.1, eval every 125 steps, tau 0.05.
  unsup  SimCSE's unsupervised recipe: batch 64, 1 epoch, lr 3e-5, max_len 32, no warmup or decay.
The backbone default is KETI-AIR/ke-t5-base (BM-K's default; its ETRI-T5 is not public); for the
KoSentenceBART row use --arch bart --model gogamza/kobart-base-v2.

Outputs in --output_dir: best_model/ (the best KorSTS-dev checkpoint, a Hugging Face +
sentence-transformers folder), checkpoint/ (for --resume), train_log.jsonl, args.json.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from dataloader import (BatchPlan, ColumnCollator, DataError, TokenizedTexts, build_train_dataset, read_sts,
                        resolve_path)
from evaluation import DEFAULT_DATA_DIR, encode_tokenized, load_tokenizer, sts_metrics
from model import ARCHS, SentenceT5, contrastive_loss, gather_columns

MODE_DEFAULTS = {
    "sup": dict(train_file=["KorNLI/snli_1.0_train.ko.tsv", "KorNLI/multinli.train.ko.tsv"], batch_size=64,
                epochs=2, lr=1e-4, max_len=110, warmup_ratio=0.01, weight_decay=0.1, eval_steps=125),
    "unsup": dict(train_file=["wiki/wiki_corpus.txt"], batch_size=64, epochs=1, lr=3e-5, max_len=32,
                  warmup_ratio=0.0, weight_decay=0.0, eval_steps=125),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="KETI-AIR/ke-t5-base", help="Hugging Face model id or local folder (default: %(default)s)")
    p.add_argument("--arch", choices=ARCHS, default="t5",
                   help="t5: the encoder of a T5/mT5 checkpoint; bart: a BART checkpoint run as sentence-transformers runs it")
    p.add_argument("--st5_head", action="store_true",
                   help="Sentence-T5 projection after mean pooling: Dense d->d without bias, then L2 normalisation")
    p.add_argument("--mode", choices=("sup", "unsup"), default="sup")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="data folder (default: %(default)s)")
    p.add_argument("--train_file", nargs="+", default=None,
                   help="sup: NLI files (KorNLI TSV or KLUE-NLI JSON; default KorNLI snli+mnli train); "
                        "unsup: sentence-per-line files (default wiki/wiki_corpus.txt). Relative paths are "
                        "tried as given, then under --data_dir")
    p.add_argument("--dev_file", default="korsts-dev", help="STS set for checkpoint selection (default: %(default)s)")
    p.add_argument("--output_dir", default=None, help="default: output/kosentencet5-<mode>")
    p.add_argument("--overwrite_output_dir", action="store_true", help="allow writing over an earlier run")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max_len", type=int, default=None, help="max tokens per sentence, special tokens included")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--bucket_tokens", type=int, default=None,
                   help="encode each training batch in length buckets of at least N padded tokens, each padded "
                        "only to its own longest sentence (same result, far less padding); 0 = one pass over the "
                        "batch padded to its longest sentence (default: 512 on CPU, 8192 on GPU)")
    p.add_argument("--warmup_ratio", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=None, help="AdamW; biases and LayerNorm weights get none")
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="gradient clipping; 0 = off (as BM-K)")
    p.add_argument("--eval_steps", type=int, default=None, help="evaluate on --dev_file every N steps and at the end")
    p.add_argument("--save_steps", type=int, default=None,
                   help="write output_dir/checkpoint (for --resume) every N steps (default: --eval_steps)")
    p.add_argument("--resume", default=None, metavar="OUTPUT_DIR",
                   help="continue the interrupted run in OUTPUT_DIR from its last checkpoint, with the arguments "
                        "it was started with (only --device and --num_workers may change)")
    p.add_argument("--eval_batch_size", type=int, default=128)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--max_train_samples", type=int, default=None, help="seeded random subset of the training rows")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fp16", action="store_true", help="float16 autocast + gradient scaling (CUDA)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.bucket_tokens is None:
        args.bucket_tokens = 512 if args.device == "cpu" else 8192
    if args.resume:
        saved = os.path.join(args.resume, "args.json")
        if not os.path.isfile(os.path.join(args.resume, "checkpoint", "state.pt")) or not os.path.isfile(saved):
            p.error(f"--resume {args.resume}: no checkpoint/state.pt and args.json there to resume from")
        with open(saved) as f:
            for key, value in json.load(f).items():
                if key not in ("device", "num_workers"):
                    setattr(args, key, value)
        args.output_dir = args.resume
        return args
    for key, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output_dir = args.output_dir or os.path.join("output", f"kosentencet5-{args.mode}")
    args.save_steps = args.save_steps or args.eval_steps
    if args.fp16 and args.bf16:
        p.error("--fp16 and --bf16 are exclusive")
    if args.fp16 and not args.device.startswith("cuda"):
        p.error("--fp16 needs a CUDA device (use --bf16 on CPU)")
    return args


# Copied from KoSimCSE/train.py:set_seed
def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# Copied from KoSimCSE/train.py:check_output_dir
def check_output_dir(args):
    """Refuse to mix two runs in one folder unless --overwrite_output_dir (nothing is written here)."""
    best = os.path.join(args.output_dir, "best_model")
    if not os.path.isdir(best) and os.path.isdir(best + ".old"):
        os.replace(best + ".old", best)  # a kill between the two renames of save_atomically
    earlier = [f for f in ("args.json", "train_log.jsonl", "best_model", "checkpoint")
               if os.path.exists(os.path.join(args.output_dir, f))]
    if earlier and not args.overwrite_output_dir:
        resume = f", --resume {args.output_dir} to continue it," if hasattr(args, "resume") else ""
        raise SystemExit(f"error: {args.output_dir} already holds a run ({', '.join(earlier)}); pass "
                         f"--overwrite_output_dir to replace it{resume} or choose another --output_dir")


# Copied from KoSimCSE/train.py:prepare_output_dir
def prepare_output_dir(args):
    """Clear an earlier run (only once the new one's inputs have loaded) and record the arguments."""
    for stale in ("best_model", "checkpoint", "train_log.jsonl"):
        path = os.path.join(args.output_dir, stale)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k != "resume"}, f, indent=2, ensure_ascii=False)


# Copied from KoSimCSE/train.py:save_atomically
def save_atomically(save, final_dir):
    """save(tmp_dir), then swap it into place, so a kill never leaves a half-written final_dir."""
    tmp, old = final_dir + ".tmp", final_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    if os.path.isdir(final_dir):
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    shutil.rmtree(old, ignore_errors=True)


# Copied from KoSimCSE/train.py:build_optimizer
def build_optimizer(model, lr, weight_decay):
    """AdamW; no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    # fused: one kernel for all parameters; ~10x faster than the default on CPU for a large
    # embedding table (0.03 s vs 0.4 s a step for multilingual-e5-small's 96M-entry vocabulary).
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)


def load_model(args):
    try:
        tokenizer = load_tokenizer(args.model)
        model = SentenceT5.from_pretrained(args.model, arch=args.arch, st5_head=args.st5_head,
                                           bucket_tokens=args.bucket_tokens)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load model '{args.model}': {e}\n"
                         f"Pass --model with a Hugging Face model folder (config.json, weights and "
                         f"tokenizer files) or a hub id reachable from this machine.") from None
    if tokenizer.pad_token_id is None:
        raise SystemExit(f"error: the tokenizer of {args.model} has no padding token")
    return tokenizer, model


# Copied from KoSimCSE/train.py:DevEvaluator
class DevEvaluator:
    """KorSTS-dev (or --dev_file) metrics of the live model; the dev set is tokenised once."""

    def __init__(self, args, tokenizer, amp_dtype):
        self.pairs = read_sts(resolve_path(args.dev_file, args.data_dir))
        self.tokenized = TokenizedTexts(tokenizer, [p[0] for p in self.pairs] + [p[1] for p in self.pairs], args.max_len)
        self.gold = np.array([p[2] for p in self.pairs])
        self.pad_id, self.args, self.amp_dtype = tokenizer.pad_token_id, args, amp_dtype

    def __call__(self, model):
        model.eval()
        emb = encode_tokenized(model, self.tokenized, self.pad_id, self.args.eval_batch_size,
                               self.args.device, amp_dtype=self.amp_dtype)
        model.train()
        n = len(self.pairs)
        return sts_metrics(emb[:n], emb[n:], self.gold)


# Copied from KoSimCSE/train.py:setup_distributed
def setup_distributed(args):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs,
    gloo on CPU; each process drives one GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


# Copied from KoSimCSE/train.py:save_checkpoint
def save_checkpoint(path, model, optimizer, scheduler, scaler, step, best_score, **extra):
    """Everything --resume needs, written atomically: weights, optimizer, schedule, loss scale,
    the step (which fixes the data position through BatchPlan), the best dev score, RNG states,
    and any ``extra`` entries of the caller's."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "best_score": best_score,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, **extra}

    def write(folder):
        os.makedirs(folder)
        torch.save(state, os.path.join(folder, "state.pt"))
    save_atomically(write, path)


# Copied from KoSimCSE/train.py:load_checkpoint
def load_checkpoint(path, model, optimizer, scheduler, scaler):
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return state


# Copied from KoSimCSE/train.py:restore_rng
def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# Copied from KoSimCSE/train.py:truncate_log
def truncate_log(path, step):
    """Drop log lines written after the checkpoint a resumed run restarts from."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def train(args):
    rank, world = setup_distributed(args)
    main_process = rank == 0
    log = (lambda msg: tqdm.write(msg)) if main_process else (lambda msg: None)
    if not args.resume:
        check_output_dir(args)
    set_seed(args.seed + rank)  # per-rank dropout masks
    tokenizer, model = load_model(args)
    model.to(args.device)
    dataset = build_train_dataset(args, tokenizer, log=log)
    plan = BatchPlan(len(dataset), args.batch_size, args.seed, rank, world)
    collate = ColumnCollator(tokenizer.pad_token_id)
    num_columns = 3 if args.mode == "sup" else 2
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * len(plan)
    amp_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    device_type = torch.device(args.device).type
    scaler = torch.amp.GradScaler("cuda", enabled=args.fp16)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    evaluate = DevEvaluator(args, tokenizer, amp_dtype) if main_process else None
    best_dir = os.path.join(args.output_dir, "best_model")
    checkpoint_dir = os.path.join(args.output_dir, "checkpoint")
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    best_score, step = -math.inf, 0
    if args.resume:
        state = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, scaler)
        best_score, step = state["best_score"], state["step"]
        restore_rng(state["rng"]) if main_process else torch.manual_seed(args.seed + rank + step)
        if main_process:
            truncate_log(log_path, step)
        log(f"resuming {args.output_dir} at step {step:,} (best dev max-spearman {best_score:.2f})")
    elif main_process:
        prepare_output_dir(args)  # only now: bad inputs above must not cost the earlier run anything
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log(f"{len(dataset):,} training examples, batch {args.batch_size}"
        + (f" ({world} processes x {plan.local_batch})" if world > 1 else "")
        + f", {total_steps:,} steps ({len(plan):,} per epoch), eval every {args.eval_steps} on {args.dev_file}")

    start = time.time()
    with open(log_path, "a") if main_process else open(os.devnull, "w") as log_file, \
            tqdm(total=total_steps, initial=step, desc=f"KoSentenceT5 {args.mode}", unit="step",
                 disable=not main_process) as bar:
        def record(entry):
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

        model.train()
        while step < total_steps:
            epoch = step // len(plan)
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=list(plan.batches(epoch, step % len(plan))), collate_fn=collate,
                num_workers=args.num_workers, pin_memory=device_type == "cuda",
                generator=torch.Generator())  # own generator: the global RNG stays untouched
            for batch in loader:
                batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
                with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    embeddings = gather_columns(ddp(**batch), num_columns)
                    loss = contrastive_loss(embeddings, num_columns, args.temperature)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: the loss is {loss.item()} at step {step + 1}; stopping. The best model "
                                     f"so far is kept in {best_dir} and the last checkpoint in {checkpoint_dir}. "
                                     f"Try a lower --lr, or --bf16 instead of --fp16.")
                scaler.scale(loss * world).backward()
                if args.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", best=f"{best_score:.2f}")
                if step % args.logging_steps == 0:
                    record({"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                            "elapsed_s": round(time.time() - start, 3)})
                if step % args.eval_steps == 0 or step == total_steps:
                    if main_process:
                        metrics = evaluate(model)
                        record({"step": step, "epoch": epoch, "dev": metrics})
                        log(f"step {step}: dev avg {metrics['avg']:.2f}, cosine spearman "
                            f"{metrics['cosine_spearman']:.2f}, max spearman {metrics['max_spearman']:.2f}")
                        if metrics["max_spearman"] > best_score:
                            best_score = metrics["max_spearman"]
                            save_atomically(lambda d: model.save(d, tokenizer, args.max_len), best_dir)
                            log(f"\t## SAVE {best_dir} | valid_score: {best_score / 100:.4f} | epochs: {epoch} | steps: {step} ##")
                    if world > 1:
                        dist.barrier()
                if step % args.save_steps == 0 or step == total_steps:
                    if main_process:
                        save_checkpoint(checkpoint_dir, model, optimizer, scheduler, scaler, step, best_score)
                    if world > 1:
                        dist.barrier()
                if step >= total_steps:
                    break
    log(f"done in {time.time() - start:.0f}s: best dev max-spearman {best_score:.2f}, model in {best_dir}")
    if world > 1:
        dist.destroy_process_group()
    return best_score


# Copied from KoSimCSE/train.py:main
def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

"""Train KoSBERT: Sentence-BERT on Korean NLI (softmax classification) and/or KorSTS (cosine regression).

Tasks:
  nli        SBERT's softmax objective on NLI pairs: Linear(3d -> 3) over [u, v, |u - v|] with
             cross-entropy (labels contradiction 0, entailment 1, neutral 2, as BM-K). KorNLI
             snli_1.0_train.ko.tsv by default, --with_mnli adds multinli.train.ko.tsv; --train_file
             takes any KorNLI/XNLI TSV or KLUE-NLI JSON. The classifier is training-only.
  sts        MSE(cos(u, v), score / 5) on KorSTS train (or --train_file: any STS file).
  nli_sts    BM-K's KoSBERT: the nli stage (--nli_epochs), then the sts stage (--sts_epochs)
             continuing from the best NLI checkpoint (kept in <output_dir>/nli_model), with a fresh
             optimizer and warmup schedule, as BM-K's training_nli.py + con_training_sts.py.
  multitask  joint training: NLI and STS batches interleaved in one run with one optimizer. Mixing
             rule, proportional round-robin: an epoch visits every NLI batch and every STS batch once,
             and each step takes the next batch of the source that is furthest behind in its own pass
             (smallest (batches done + 1) / batches per epoch; NLI first on ties), so the STS batches
             are spread evenly through the NLI batches. --epochs such passes (default 1).

Defaults are BM-K's / sentence-transformers' fit(): batch 32, lr 2e-5, AdamW weight decay 0.01
(none on biases and LayerNorm), linear schedule with 10% warmup, gradient clipping at 1.0, NLI 1
epoch, STS 4 epochs, mean pooling, evaluation on KorSTS dev every 1000 steps and at the end of every
epoch; the best checkpoint (max of the 4 dev Spearman values) is kept.

Outputs in --output_dir: best_model/ (a Hugging Face + sentence-transformers folder: encoder and
pooling, no classifier), train_log.jsonl (step, stage, losses, lr, dev metrics), args.json,
checkpoint/ (for --resume), and for nli_sts also nli_model/ (the best checkpoint of the NLI stage).
Multi-GPU: torchrun --nproc_per_node N KoSBERT/train.py ... (--batch_size is the global batch).
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
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from dataloader import (BatchPlan, DataError, PairCollator, PairDataset, TokenizedTexts, load_nli_pairs,
                        load_sts_pairs, read_sts, resolve_path)
from evaluation import DEFAULT_DATA_DIR, encode_tokenized, load_tokenizer, sts_metrics
from model import POOLERS, SentenceEncoder, SoftmaxClassifier, cosine_regression_loss, softmax_loss

TASKS = ("nli", "sts", "nli_sts", "multitask")
SNLI, MNLI = "KorNLI/snli_1.0_train.ko.tsv", "KorNLI/multinli.train.ko.tsv"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="klue/bert-base", help="Hugging Face model id or local folder (default: %(default)s)")
    p.add_argument("--task", choices=TASKS, default="nli_sts", help="see above (default: %(default)s)")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="data folder (default: %(default)s)")
    p.add_argument("--nli_file", nargs="+", default=None,
                   help=f"NLI training files, KorNLI/XNLI TSV or KLUE-NLI JSON (default: {SNLI}, plus {MNLI} "
                        f"with --with_mnli). Relative paths are tried as given, then under --data_dir")
    p.add_argument("--with_mnli", action="store_true", help=f"add {MNLI} to the default NLI training data")
    p.add_argument("--sts_file", default="korsts-train",
                   help="STS training file: korsts-train, klue-sts-train or a path (default: %(default)s)")
    p.add_argument("--train_file", nargs="+", default=None,
                   help="the training file(s) of --task nli (same as --nli_file) or --task sts (one file, "
                        "same as --sts_file)")
    p.add_argument("--dev_file", default="korsts-dev", help="STS set for checkpoint selection (default: %(default)s)")
    p.add_argument("--output_dir", default=None, help="default: output/kosbert-<task>-<model name>")
    p.add_argument("--overwrite_output_dir", action="store_true", help="allow writing over an earlier run")
    p.add_argument("--pooler", choices=POOLERS, default="mean", help="sentence vector (default: %(default)s)")
    p.add_argument("--bucket_tokens", type=int, default=None,
                   help="encode each training batch in length buckets of at least N padded tokens, each padded "
                        "only to its own longest sentence (same result, far less padding); 0 = one pass over the "
                        "batch padded to its longest sentence (default: 512 on CPU, 8192 on GPU)")
    p.add_argument("--batch_size", type=int, default=32, help="pairs per batch, both objectives (default: %(default)s)")
    p.add_argument("--nli_epochs", type=int, default=1, help="epochs of --task nli and of the nli_sts NLI stage")
    p.add_argument("--sts_epochs", type=int, default=4, help="epochs of --task sts and of the nli_sts STS stage")
    p.add_argument("--epochs", type=int, default=1, help="--task multitask: passes over both data sources")
    p.add_argument("--max_steps", type=int, default=-1,
                   help="stop each stage after this many optimizer steps (overrides the epochs)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW; biases and LayerNorm weights get none")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="linear warmup over this fraction of each stage")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 = off")
    p.add_argument("--max_len", type=int, default=128,
                   help="max tokens per sentence, special tokens included; longer ones are truncated and counted")
    p.add_argument("--eval_steps", type=int, default=1000,
                   help="evaluate on --dev_file every N steps and at the end of every epoch")
    p.add_argument("--save_steps", type=int, default=None,
                   help="write output_dir/checkpoint (for --resume) every N steps and at the end of every "
                        "epoch and stage (default: --eval_steps)")
    p.add_argument("--resume", default=None, metavar="OUTPUT_DIR",
                   help="continue the interrupted run in OUTPUT_DIR from its last checkpoint, with the arguments "
                        "it was started with (only --device and --num_workers may change)")
    p.add_argument("--eval_batch_size", type=int, default=128)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--max_train_samples", type=int, default=None,
                   help="seeded random subset of each training source (NLI pairs, STS pairs)")
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
    args.save_steps = args.save_steps or args.eval_steps
    if args.train_file:
        if args.task == "nli":
            args.nli_file = args.train_file
        elif args.task == "sts" and len(args.train_file) == 1:
            args.sts_file = args.train_file[0]
        else:
            p.error("--train_file takes NLI files with --task nli or one STS file with --task sts; "
                    "use --nli_file / --sts_file for nli_sts and multitask")
    if args.nli_file is None:
        args.nli_file = [SNLI] + ([MNLI] if args.with_mnli else [])
    elif args.with_mnli:
        p.error("--with_mnli adds MNLI to the default NLI file; with --nli_file/--train_file list the files yourself")
    args.output_dir = args.output_dir or os.path.join(
        "output", f"kosbert-{args.task}-{os.path.basename(args.model.rstrip('/'))}")
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


def load_model(args, path=None):
    """Tokenizer and SentenceEncoder of --model (or of ``path``), with clear errors."""
    path = path or args.model
    try:
        tokenizer = load_tokenizer(path)
        model = SentenceEncoder.from_pretrained(path, pooler=args.pooler, bucket_tokens=args.bucket_tokens)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load model '{path}': {e}\n"
                         f"Pass --model with a Hugging Face model folder (config.json, weights and "
                         f"tokenizer files) or a hub id reachable from this machine.") from None
    if tokenizer.pad_token_id is None:
        raise SystemExit(f"error: the tokenizer of {path} has no padding token")
    return tokenizer, model


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


# Copied from KoSimCSE/train.py:restore_rng
def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class Source:
    """One training objective: its name, its tokenised pairs, its batch plan and collator."""

    def __init__(self, name, dataset, plan, collate):
        self.name, self.dataset, self.plan, self.collate = name, dataset, plan, collate


def build_source(name, args, tokenizer, rank=0, world=1, log=print):
    if name == "nli":
        pairs = load_nli_pairs([resolve_path(p, args.data_dir) for p in args.nli_file], log=log)
        label_dtype = torch.long
    else:
        pairs = load_sts_pairs(resolve_path(args.sts_file, args.data_dir), log=log)
        label_dtype = torch.float
    if args.max_train_samples is not None and args.max_train_samples < len(pairs):
        pairs = random.Random(args.seed).sample(pairs, args.max_train_samples)
        log(f"using {len(pairs):,} {name} pairs (--max_train_samples)")
    dataset = PairDataset(tokenizer, pairs, args.max_len, desc=f"tokenize {name} pairs")
    if dataset.tokenized.num_truncated:
        log(f"{dataset.tokenized.num_truncated:,} of {len(dataset.tokenized):,} {name} sentences were longer "
            f"than --max_len {args.max_len} tokens and were truncated")
    # A seeded shuffle per epoch (the last partial batch kept, as sentence-transformers' fit, in a single
    # process); any step can be the starting point, which makes --resume exact.
    plan = BatchPlan(len(dataset), args.batch_size, args.seed, rank, world, drop_last=False)
    return Source(name, dataset, plan, PairCollator(tokenizer.pad_token_id, label_dtype))


class PairObjective(nn.Module):
    """The encoder and the NLI classifier in one module, so that DistributedDataParallel sees every
    trainable parameter; forward returns the loss of one source's batch."""

    def __init__(self, encoder, classifier=None):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, source, labels, **batch):
        embeddings = self.encoder(**batch)
        if source == "nli":
            return softmax_loss(self.classifier, embeddings, labels)
        return cosine_regression_loss(embeddings, labels)


def interleave(sizes):
    """Proportional round-robin: the source index of every step of one epoch, given each source's
    batches per epoch. Each step takes the source with the smallest (done + 1) / size; ties go to the
    earlier source. With one source this is simply its batches in order."""
    done, order = [0] * len(sizes), []
    for _ in range(sum(sizes)):
        i = min((k for k in range(len(sizes)) if done[k] < sizes[k]), key=lambda k: ((done[k] + 1) / sizes[k], k))
        done[i] += 1
        order.append(i)
    return order


def truncate_stage_log(path, stages, stage, step):
    """Drop log lines written after the checkpoint (``stage``, ``step``) a resumed run restarts from."""
    if os.path.exists(path):
        position = (stages.index(stage), step)
        with open(path) as f:
            entries = [(line, json.loads(line)) for line in f]
        kept = [line for line, e in entries if (stages.index(e["stage"]), e["step"]) <= position]
        with open(path, "w") as f:
            f.writelines(kept)


def run_stage(args, stage, model, tokenizer, sources, epochs, classifier, evaluate, best_dir, record, log,
              rank=0, world=1, state=None):
    """Train ``model`` on ``sources`` (interleaved) for ``epochs`` or --max_steps; evaluate every
    --eval_steps and at the end of every epoch; keep the best dev checkpoint in ``best_dir``; write
    output_dir/checkpoint every --save_steps. ``state``: a checkpoint of this stage to resume from.
    Under torch.distributed every process takes its slice of each batch (the losses are means over
    pairs, so DDP's gradient average is the gradient of the global batch); rank 0 evaluates and saves."""
    main_process = rank == 0
    schedule = interleave([len(s.plan) for s in sources])
    total_steps = args.max_steps if args.max_steps > 0 else epochs * len(schedule)
    epochs = math.ceil(total_steps / len(schedule))
    objective = PairObjective(model, classifier)
    amp_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    device_type = torch.device(args.device).type
    scaler = torch.amp.GradScaler("cuda", enabled=args.fp16)
    optimizer = build_optimizer(objective, args.lr, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    checkpoint_dir = os.path.join(args.output_dir, "checkpoint")
    best_score, step = -math.inf, 0
    if state is not None:
        objective.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        best_score, step = state["best_score"], state["step"]
        restore_rng(state["rng"]) if main_process else torch.manual_seed(args.seed + rank + step)
        log(f"[{stage}] resuming {args.output_dir} at step {step:,} (best dev max-spearman {best_score:.2f})")
    # The classifier is idle on the STS batches of multitask: DDP must not wait for its gradients.
    ddp = torch.nn.parallel.DistributedDataParallel(
        objective, find_unused_parameters=classifier is not None and len(sources) > 1) if world > 1 else objective
    sizes = ", ".join(f"{s.name} {len(s.dataset):,} pairs / {len(s.plan):,} batches" for s in sources)
    log(f"[{stage}] {sizes}; batch {args.batch_size}" + (f" ({world} processes x {sources[0].plan.local_batch})"
                                                         if world > 1 else "")
        + f", {total_steps:,} steps ({epochs} epoch(s) of {len(schedule):,}), eval every {args.eval_steps} steps "
          f"and each epoch on {args.dev_file}")

    start = time.time()
    window = {s.name: [] for s in sources}  # losses since the last log line, per source

    def evaluate_and_save(epoch):
        nonlocal best_score
        metrics = evaluate(model)
        record({"stage": stage, "step": step, "epoch": epoch, "dev": metrics})
        log(f"[{stage}] step {step}: dev avg {metrics['avg']:.2f}, cosine spearman {metrics['cosine_spearman']:.2f}, "
            f"max spearman {metrics['max_spearman']:.2f}")
        if metrics["max_spearman"] > best_score:
            best_score = metrics["max_spearman"]
            save_atomically(lambda d: model.save(d, tokenizer, args.max_len), best_dir)
            log(f"\t## SAVE {best_dir} | valid_score: {best_score / 100:.4f} | epochs: {epoch} | steps: {step} ##")

    objective.train()
    with tqdm(total=total_steps, initial=step, desc=f"KoSBERT {stage}", unit="step", disable=not main_process) as bar:
        while step < total_steps:
            epoch, offset = divmod(step, len(schedule))
            # Where each source stands in this epoch: the batches the schedule has taken from it so far.
            taken = [schedule[:offset].count(i) for i in range(len(sources))]
            iterators = [iter(torch.utils.data.DataLoader(
                s.dataset, batch_sampler=list(s.plan.batches(epoch, taken[i])), collate_fn=s.collate,
                num_workers=args.num_workers, pin_memory=device_type == "cuda", generator=torch.Generator()))
                for i, s in enumerate(sources)]
            for index in schedule[offset:]:
                source = sources[index]
                batch = {k: v.to(args.device, non_blocking=True) for k, v in next(iterators[index]).items()}
                with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = ddp(source.name, **batch)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: the {source.name} loss is {loss.item()} at step {step + 1}; stopping. "
                                     f"The best model so far is kept in {best_dir} and the last checkpoint in "
                                     f"{checkpoint_dir}. Try a lower --lr, or --bf16 instead of --fp16.")
                scaler.scale(loss).backward()
                if args.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(objective.parameters(), args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                window[source.name].append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", best=f"{best_score:.2f}")
                if step % args.logging_steps == 0:
                    losses = [x for v in window.values() for x in v]
                    record({"stage": stage, "step": step, "epoch": epoch, "loss": float(np.mean(losses)),
                            **{f"loss_{k}": float(np.mean(v)) for k, v in window.items() if v},
                            "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 3)})
                    window = {k: [] for k in window}
                boundary = step % len(schedule) == 0 or step == total_steps  # end of an epoch or of the stage
                if step % args.eval_steps == 0 or boundary:
                    if main_process:
                        evaluate_and_save(epoch)
                    if world > 1:
                        dist.barrier()
                if step % args.save_steps == 0 or boundary:
                    if main_process:
                        save_checkpoint(checkpoint_dir, objective, optimizer, scheduler, scaler, step, best_score,
                                        stage=stage)
                    if world > 1:
                        dist.barrier()
                if step >= total_steps:
                    break
    if main_process and not os.path.isdir(best_dir):  # every dev score was NaN (e.g. constant embeddings)
        save_atomically(lambda d: model.save(d, tokenizer, args.max_len), best_dir)
        log(f"warning: no dev score was a number; saved the final model to {best_dir}")
    log(f"[{stage}] done in {time.time() - start:.0f}s: best dev max-spearman {best_score:.2f}, model in {best_dir}")
    return best_score


def train(args):
    """Everything that can fail on bad input (model, tokenizer, data) is loaded before the output
    folder is touched, so a failed start leaves no half-run behind to refuse the next attempt."""
    rank, world = setup_distributed(args)
    main_process = rank == 0
    log = (lambda msg: tqdm.write(msg)) if main_process else (lambda msg: None)
    if not args.resume:
        check_output_dir(args)
    set_seed(args.seed + rank)  # per-rank dropout masks
    tokenizer, model = load_model(args)
    model.to(args.device)
    amp_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    evaluate = DevEvaluator(args, tokenizer, amp_dtype) if main_process else None
    classifier = SoftmaxClassifier(model.dim, num_labels=3).to(args.device) if args.task != "sts" else None
    names = ("nli", "sts") if args.task in ("nli_sts", "multitask") else (args.task,)
    sources = {name: build_source(name, args, tokenizer, rank, world, log=log) for name in names}
    stages = ["nli", "sts"] if args.task == "nli_sts" else [args.task]
    best_dir, nli_dir = os.path.join(args.output_dir, "best_model"), os.path.join(args.output_dir, "nli_model")
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    state = None
    if args.resume:
        state = torch.load(os.path.join(args.output_dir, "checkpoint", "state.pt"), map_location="cpu",
                           weights_only=False)
        if main_process:
            truncate_stage_log(log_path, stages, state["stage"], state["step"])
    elif main_process:
        prepare_output_dir(args)  # only now: bad inputs above must not cost the earlier run anything
        shutil.rmtree(nli_dir, ignore_errors=True)  # a stale stage-1 model of an overwritten run
    if world > 1:
        dist.barrier()  # nobody starts before rank 0 has set up (or truncated) the output folder
    with open(log_path, "a") if main_process else open(os.devnull, "w") as log_file:
        def record(entry):
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

        def stage_state(stage):
            return state if state is not None and state["stage"] == stage else None

        common = dict(evaluate=evaluate, record=record, log=log, rank=rank, world=world)
        if args.task in ("nli", "sts"):
            epochs = args.nli_epochs if args.task == "nli" else args.sts_epochs
            best = run_stage(args, args.task, model, tokenizer, [sources[args.task]], epochs, classifier,
                             best_dir=best_dir, state=stage_state(args.task), **common)
        elif args.task == "multitask":
            best = run_stage(args, "multitask", model, tokenizer, [sources["nli"], sources["sts"]], args.epochs,
                             classifier, best_dir=best_dir, state=stage_state("multitask"), **common)
        else:
            # nli_sts: NLI, then STS continued from the best NLI checkpoint (BM-K's two scripts in one run).
            # A run resumed in its STS stage skips the finished NLI stage.
            if stage_state("sts") is None:
                run_stage(args, "nli", model, tokenizer, [sources["nli"]], args.nli_epochs, classifier,
                          best_dir=nli_dir, state=stage_state("nli"), **common)
            if world > 1:
                dist.barrier()  # rank 0 has written nli_model
            del model, classifier
            set_seed(args.seed + rank)
            _, model = load_model(args, nli_dir)
            model.to(args.device)
            log(f"[sts] continuing from {nli_dir}")
            best = run_stage(args, "sts", model, tokenizer, [sources["sts"]], args.sts_epochs, None,
                             best_dir=best_dir, state=stage_state("sts"), **common)
    if world > 1:
        dist.destroy_process_group()
    return best


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

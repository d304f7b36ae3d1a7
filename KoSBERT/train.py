"""Train KoSBERT: Sentence-BERT on Korean NLI (softmax classification) and/or KorSTS (cosine regression).

    python KoSBERT/train.py @KoSBERT/presets/bmk-kosbert-bert.args                     # BM-K's KoSBERT row
    torchrun --nproc_per_node 4 KoSBERT/train.py @KoSBERT/presets/bmk-kosbert-bert.args  # 4 GPUs, same global batch
    python KoSBERT/train.py --resume output/kosbert-nli_sts                            # continue a killed run
    python KoSBERT/train.py --mode sts --model klue/roberta-base --sts_epochs 8        # flags override defaults

Modes:
  nli        SBERT's softmax objective on NLI pairs: Linear(3d -> 3) over [u, v, |u - v|], cross-entropy
             (labels contradiction 0, entailment 1, neutral 2, as BM-K). The classifier is training-only.
  sts        MSE(cos(u, v), score / 5) on KorSTS train (or --sts_file: any STS file).
  nli_sts    BM-K's KoSBERT: the nli stage (--nli_epochs), then the sts stage (--sts_epochs) continuing from
             the best NLI checkpoint (kept in <output_dir>/nli_model), with a fresh optimizer and warmup, as
             BM-K's training_nli.py + con_training_sts.py.
  multitask  NLI and STS batches interleaved in one run with one optimizer, proportional round-robin (see
             run_utils.interleave): an epoch visits every batch of both once, the STS batches spread evenly
             through the NLI ones. --epochs such passes.
The defaults are BM-K's / sentence-transformers' fit(): batch 32, lr 2e-5, weight decay 0.01, 10% warmup,
clipping at 1.0, mean pooling, evaluation every 1000 steps and at every epoch end.

Where things are: the step is ``training_step`` below; the losses ``softmax_loss`` and
``cosine_regression_loss`` and their dispatch ``PairObjective`` are in model.py, pooling in
``SentenceEncoder.embed``; ``fit`` (the loop) and ``train`` (stages, resume) are the same in every method
folder; run_utils.py holds the plumbing.

Outputs in --output_dir: best_model/ (a Hugging Face + sentence-transformers folder: encoder and pooling, no
classifier), checkpoint/ (for --resume), train_log.jsonl, args.json, and for nli_sts nli_model/.
"""
import math
import os
import random
import time

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from dataloader import BatchPlan, DataError, PairCollator, PairDataset, load_nli_pairs, load_sts_pairs, resolve_path
from evaluation import load_tokenizer
from model import POOLERS, PairObjective, SentenceEncoder, SoftmaxClassifier
from run_utils import (DevEvaluator, LossWindow, METHOD, PresetParser, RunLock, RunLog, Source, Stage, add_run_args,
                       barrier, best_score_text, build_optimizer, check_output_dir, exit_on_data_error, finish_args,
                       interleave, load_checkpoint, load_or_exit, model_max_len, nonfinite_loss_exit,
                       prepare_output_dir, read_checkpoint, restore_rng, save_atomically, save_checkpoint, save_model,
                       set_seed, setup_distributed, stage_batches, truncate_log)

MODES = ("nli", "sts", "nli_sts", "multitask")
SNLI = "KorNLI/snli_1.0_train.ko.tsv"


# --- the method --------------------------------------------------------------------------------------

def training_step(model, source, batch, args, world):
    """One batch of ``source`` ("nli" or "sts") -> (loss to backpropagate, {name: value to log}).

    The batch holds B pairs as one (2B, L) tensor (first sentences, then second ones; see PairCollator)
    plus ``labels``; PairObjective encodes them in one call and applies that source's loss. The losses are
    means over the local pairs, so DDP's gradient average is already the global batch's gradient."""
    loss = model(source, **batch)
    return loss, {"loss": loss}


def stages(args):
    """The stages of a run (see run_utils.Stage); nli_sts has two, the second starting from nli_model."""
    if args.mode == "nli_sts":
        return [Stage("nli", ("nli",), args.nli_epochs, "nli_model", None),
                Stage("sts", ("sts",), args.sts_epochs, "best_model", "nli_model")]
    if args.mode == "multitask":
        return [Stage("multitask", ("nli", "sts"), args.epochs, "best_model", None)]
    return [Stage(args.mode, (args.mode,), args.nli_epochs if args.mode == "nli" else args.sts_epochs,
                  "best_model", None)]


def build_source(name, args, tokenizer, rank, world, log):
    """NLI pairs (premise, hypothesis, class id) or STS pairs (s1, s2, score / 5), tokenised once. The last
    partial batch is kept in a single process, as sentence-transformers' fit does."""
    if name == "nli":
        pairs = load_nli_pairs([resolve_path(p, args.data_dir) for p in args.nli_file], log=log)
    else:
        pairs = load_sts_pairs(resolve_path(args.sts_file, args.data_dir), log=log)
    if args.max_train_samples is not None and args.max_train_samples < len(pairs):
        pairs = random.Random(args.seed).sample(pairs, args.max_train_samples)
        log(f"using {len(pairs):,} {name} pairs (--max_train_samples)")
    dataset = PairDataset(tokenizer, pairs, args.max_len, desc=f"tokenize {name} pairs")
    if dataset.tokenized.num_truncated:
        log(f"{dataset.tokenized.num_truncated:,} of {len(dataset.tokenized):,} {name} sentences were longer "
            f"than --max_len {args.max_len} tokens and were truncated")
    plan = BatchPlan(len(dataset), args.batch_size, args.seed, rank, world, drop_last=False)
    return Source(name, dataset, plan, PairCollator(tokenizer.pad_token_id, torch.long if name == "nli" else torch.float),
                  args.nli_file if name == "nli" else [args.sts_file])


def load_model(args, path, stage):
    """(encoder to evaluate and save, module to train): the SentenceEncoder, and PairObjective holding it
    with a new NLI classifier in the stages that train on NLI."""
    encoder = load_or_exit(lambda p: SentenceEncoder.from_pretrained(
        p, pooler=args.pooler, bucket_tokens=args.bucket_tokens, mini_batch_size=args.mini_batch_size), path)
    classifier = SoftmaxClassifier(encoder.dim, num_labels=3) if stage != "sts" else None
    return encoder, PairObjective(encoder, classifier)


# --- the loop (the same code in every method folder) ---------------------------------------------------

# Copied from KoSimCSE/train.py:fit
def fit(args, stage, encoder, trainable, tokenizer, sources, evaluate, log, rank, world, state=None):
    """Train ``trainable`` on ``sources`` (interleaved, see interleave) for ``stage.epochs`` or --max_steps.
    Evaluate ``encoder`` every --eval_steps and at the end (and each epoch with --eval_each_epoch), keeping
    the best dev model (max of the 4 Spearman values) in output_dir/<stage.best_dir>; write
    output_dir/checkpoint every --save_steps and whenever it evaluates. ``state``: a checkpoint of this stage to resume from. Under
    torch.distributed every process takes its slice of each global batch; rank 0 evaluates and saves."""
    main_process = rank == 0
    schedule = interleave([len(s.plan) for s in sources])
    total_steps = args.max_steps if args.max_steps > 0 else stage.epochs * len(schedule)
    amp_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    device_type = torch.device(args.device).type
    scaler = torch.amp.GradScaler("cuda", enabled=args.fp16)
    optimizer = build_optimizer(trainable, stage.lr or args.lr, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    best_dir, checkpoint_dir = os.path.join(args.output_dir, stage.best_dir), os.path.join(args.output_dir, "checkpoint")
    best_score, step = -math.inf, 0
    if state is not None:
        step, best_score = load_checkpoint(state, trainable, optimizer, scheduler, scaler)
        if main_process:
            restore_rng(state["rng"])
        else:  # only rank 0's RNG state is saved; the others get fresh (seeded) dropout masks
            torch.manual_seed(args.seed + rank + step)
        log(f"[{stage.name}] resuming {args.output_dir} at step {step:,} (best dev {best_score_text(best_score)})")
    # With several sources, parameters idle on one source's batches (KoSBERT's classifier) must not be waited for.
    ddp = torch.nn.parallel.DistributedDataParallel(trainable, find_unused_parameters=len(sources) > 1) \
        if world > 1 else trainable
    sizes = ", ".join(f"{s.name} {len(s.dataset):,} examples / {len(s.plan):,} batches" for s in sources)
    log(f"[{stage.name}] {sizes}; batch {args.batch_size}"
        + (f" ({world} processes x {sources[0].plan.local_batch})" if world > 1 else "")
        + f", {total_steps:,} steps ({len(schedule):,} per epoch), eval every {args.eval_steps} on {args.dev_file}")

    files = [f for s in sources for f in s.files]  # for the model card
    window, start = LossWindow(), time.time()
    trainable.train()
    batches = stage_batches(sources, schedule, step, total_steps, args.num_workers, device_type == "cuda")
    with tqdm(total=total_steps, initial=step, desc=f"{METHOD} {stage.name}", unit="step",
              disable=not main_process) as bar:
        for epoch, source, batch in batches:
            batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, logged = training_step(ddp, source.name, batch, args, world)
            scaler.scale(loss).backward()
            if args.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable.parameters(), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            bar.update(1)
            window.add(logged if len(sources) == 1 else {**logged, **{f"{k}_{source.name}": v for k, v in logged.items()}})

            boundary = step == total_steps or (args.eval_each_epoch and step % len(schedule) == 0)
            evaluate_now = step % args.eval_steps == 0 or boundary
            save_now = step % args.save_steps == 0 or boundary
            if (step % args.logging_steps == 0 or evaluate_now or save_now) and not window.finite():
                raise nonfinite_loss_exit(step, args.output_dir)  # the only GPU sync outside logging steps
            if step % args.logging_steps == 0:
                means = window.pop()
                log.record({"stage": stage.name, "step": step, "epoch": epoch, **means,
                            "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 3)})
                bar.set_postfix(loss=f"{means['loss']:.4f}", best=best_score_text(best_score))
            if evaluate_now:
                if main_process:
                    best_score = evaluate_and_save(args, stage, encoder, tokenizer, evaluate, log, step, epoch,
                                                   best_score, best_dir, files)
                barrier(world)
            if save_now:
                if main_process:
                    save_checkpoint(checkpoint_dir, trainable, optimizer, scheduler, scaler, step, best_score,
                                    stage=stage.name)
                barrier(world)
    if main_process and not os.path.isdir(best_dir):  # every dev score was NaN (e.g. constant embeddings)
        save_atomically(lambda d: save_model(encoder, d, tokenizer, args, stage.name, step, None, files), best_dir)
        log(f"warning: no dev score was a number; saved the final model to {best_dir}")
    log(f"[{stage.name}] done in {time.time() - start:.0f}s: best dev max-spearman {best_score_text(best_score)}, "
        f"model in {best_dir}")
    return best_score


# Copied from KoSimCSE/train.py:evaluate_and_save
def evaluate_and_save(args, stage, encoder, tokenizer, evaluate, log, step, epoch, best_score, best_dir, files):
    """Dev metrics of ``encoder``, logged; the model is saved when its max Spearman beats ``best_score``."""
    metrics = evaluate(encoder)
    log.record({"stage": stage.name, "step": step, "epoch": epoch, "dev": metrics})
    log(f"[{stage.name}] step {step}: dev avg {metrics['avg']:.2f}, cosine spearman {metrics['cosine_spearman']:.2f}, "
        f"max spearman {metrics['max_spearman']:.2f}")
    if metrics["max_spearman"] > best_score:
        best_score = metrics["max_spearman"]
        save_atomically(lambda d: save_model(encoder, d, tokenizer, args, stage.name, step, metrics, files), best_dir)
        log(f"\t## SAVE {best_dir} | valid_score: {best_score / 100:.4f} | epochs: {epoch} | steps: {step} ##")
    return best_score


# Copied from KoSimCSE/train.py:train
def train(args):
    """Run every stage of ``stages(args)`` (see run_stages) holding the output folder's lock."""
    rank, world = setup_distributed(args)
    lock = RunLock(args.output_dir) if rank == 0 else None  # one live run per output folder
    try:
        return run_stages(args, rank, world)
    finally:
        if lock is not None:
            lock.release()


# Copied from KoSimCSE/train.py:run_stages
def run_stages(args, rank, world):
    """Load, then train stage after stage; a resumed run restarts in the stage and at the step of its
    checkpoint. Everything that can fail on bad input (model, tokenizer, data) is loaded before the output
    folder is touched, so a failed start costs an earlier run nothing."""
    plan = stages(args)
    state = read_checkpoint(args.output_dir) if args.resume else None
    if state is None:
        check_output_dir(args)
    set_seed(args.seed + rank)  # per-rank dropout masks
    tokenizer = load_or_exit(load_tokenizer, args.model)
    if tokenizer.pad_token_id is None:
        raise SystemExit(f"error: the tokenizer of {args.model} has no padding token")
    encoder, trainable = load_model(args, args.model, plan[0].name)
    trainable.to(args.device)
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    log = RunLog(log_path, rank)  # the file is opened at the first record, after the folder is prepared
    sources = {name: build_source(name, args, tokenizer, rank, world, log)
               for name in dict.fromkeys(n for s in plan for n in s.sources)}
    amp_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    args.eval_max_len = model_max_len(tokenizer, encoder)  # dev sentences and saved models: never cut short
    evaluate = DevEvaluator(args.dev_file, args.data_dir, tokenizer, args.eval_max_len, args.eval_batch_size,
                            args.device, amp_dtype, args.dev_protocol, args.batch_size, args.seed, log) \
        if rank == 0 else None
    if rank == 0 and state is not None:
        truncate_log(log_path, [s.name for s in plan], state["stage"], state["step"])
    elif rank == 0:
        prepare_output_dir(args, extra=[s.best_dir for s in plan])  # only now: the inputs above all loaded
    barrier(world)  # nobody starts before rank 0 has set up (or truncated) the output folder
    resume_at = [s.name for s in plan].index(state["stage"]) if state is not None else 0
    try:
        for i, stage in enumerate(plan[resume_at:], resume_at):
            if stage.start_from is not None:  # continue from the best model of an earlier stage
                del encoder, trainable
                set_seed(args.seed + rank)
                encoder, trainable = load_model(args, os.path.join(args.output_dir, stage.start_from), stage.name)
                trainable.to(args.device)
                log(f"[{stage.name}] continuing from {stage.start_from}")
            best = fit(args, stage, encoder, trainable, tokenizer, [sources[n] for n in stage.sources], evaluate,
                       log, rank, world, state if i == resume_at else None)
            barrier(world)  # rank 0 has written this stage's best model
    finally:
        log.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return best


# --- flags ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = PresetParser(description=__doc__)
    p.add_argument("--model", default="klue/bert-base", help="Hugging Face model id or local folder")
    p.add_argument("--mode", choices=MODES, default="nli_sts", help="see above")
    p.add_argument("--nli_file", nargs="+", default=[SNLI],
                   help="NLI training files, KorNLI/XNLI TSV or KLUE-NLI JSON (rows labelled '-' are skipped). "
                        "Relative paths are tried as given, then under --data_dir")
    p.add_argument("--sts_file", default="korsts-train", help="STS training file: korsts-train, klue-sts-train or a path")
    p.add_argument("--train_file", nargs="+", default=None,
                   help="the training file(s) of --mode nli (as --nli_file) or --mode sts (one file, as --sts_file)")
    p.add_argument("--pooler", choices=POOLERS, default="mean", help="sentence vector")
    p.add_argument("--mini_batch_size", type=int, default=0,
                   help="gradient caching: encode each batch in chunks of N sentences whose activations are recomputed "
                        "in backward (same loss and gradients; activation memory of N sentences); 0 = off")
    p.add_argument("--nli_epochs", type=int, default=1, help="epochs of --mode nli and of the nli_sts NLI stage")
    p.add_argument("--sts_epochs", type=int, default=4, help="epochs of --mode sts and of the nli_sts STS stage")
    add_run_args(p, batch_size=32, lr=2e-5, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0, max_len=128,
                 eval_steps=1000, eval_each_epoch=True)
    p.set_defaults(epochs=1)
    args = p.parse_args(argv)
    if args.train_file and not args.resume:
        if args.mode == "nli":
            args.nli_file = args.train_file
        elif args.mode == "sts" and len(args.train_file) == 1:
            args.sts_file = args.train_file[0]
        else:
            p.error("--train_file takes NLI files with --mode nli or one STS file with --mode sts; "
                    "use --nli_file / --sts_file for nli_sts and multitask")
    return finish_args(p, args, f"kosbert-{args.mode}")


# Copied from KoSimCSE/train.py:main
def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

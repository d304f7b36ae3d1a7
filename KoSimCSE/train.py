"""Train KoSimCSE: SimCSE on Korean, supervised (NLI triplets with hard negatives), unsupervised (wiki
sentences, dropout as the only augmentation), or multitask (supervised SimCSE + KorSTS cosine regression,
joint or one after the other).

    python KoSimCSE/train.py @KoSimCSE/presets/sup.args --model klue/bert-base       # one process
    torchrun --nproc_per_node 4 KoSimCSE/train.py @KoSimCSE/presets/sup.args         # 4 GPUs, same global batch
    python KoSimCSE/train.py --resume output/kosimcse-sup                            # continue a killed run
    python KoSimCSE/train.py --mode unsup --model klue/bert-base --lr 1e-5           # flags override a preset

--mode M starts from the preset presets/M.args (sup: BM-K's KoSimCSE command; unsup: SimCSE's unsupervised
recipe; multitask, sup_sts: see those files); flags after it win. Presets are plain files of flags, one
published setting each: see presets/.

Where things are: the step is ``training_step`` below; the loss ``contrastive_loss`` and the poolers
(``SentenceEncoder.embed``) are in model.py; the data is read in dataloader.py; ``fit`` (the loop) and
``train`` (stages, resume) are the same in every method folder; run_utils.py holds the plumbing.

Outputs in --output_dir: best_model/ (the best dev checkpoint, a Hugging Face + sentence-transformers
folder), checkpoint/ (for --resume), train_log.jsonl (losses, lr, dev metrics), args.json.
"""
import argparse
import math
import os
import time

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from dataloader import (BatchPlan, ColumnCollator, DataError, PairCollator, PairDataset, build_contrastive_dataset,
                        load_sts_pairs, resolve_path)
from evaluation import load_tokenizer
from model import POOLERS, SentenceEncoder, contrastive_loss, cosine_regression_loss, gather_columns
from run_utils import (DevEvaluator, LossWindow, METHOD, PresetParser, RunLock, RunLog, Source, Stage, add_run_args,
                       barrier, best_score_text, build_optimizer, check_output_dir, exit_on_data_error, finish_args,
                       interleave, load_checkpoint, load_or_exit, model_max_len, nonfinite_loss_exit,
                       parse_with_mode_preset, prepare_output_dir, read_checkpoint, restore_rng, save_atomically,
                       save_checkpoint, save_model, set_seed, setup_distributed, stage_batches, truncate_log)

HERE = os.path.dirname(os.path.abspath(__file__))
MODE_PRESETS = {"sup": "sup.args", "unsup": "unsup.args", "multitask": "multitask.args", "sup_sts": "sup_sts.args"}
COLUMNS = {"sup": 3, "unsup": 2}  # sentences per example: (anchor, positive, hard negative) / (s, s)


# --- the method --------------------------------------------------------------------------------------

def training_step(model, source, batch, args, world):
    """One batch of ``source`` -> (loss to backpropagate, {name: value to log}).

    sup / unsup: the batch holds every column of B examples in one (k*B, L) tensor, column after column
    (see ColumnCollator): sup k = 3 (anchor, entailment, contradiction), unsup k = 2 (the same sentence
    twice; the two dropout masks make the two views). All k*B sentences go through the encoder in one call.
    sts (multitask, sup_sts): B KorSTS pairs as a (2B, L) tensor plus ``labels`` = score / 5 (PairCollator),
    for SBERT's cosine regression."""
    if source == "sts":
        loss = cosine_regression_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        return loss, {"loss": loss}  # a mean over the local pairs: DDP's average is the global gradient
    k = COLUMNS[source]
    embeddings = gather_columns(model(**batch), k)  # under DDP: the global batch, only local rows differentiable
    loss = contrastive_loss(embeddings, k, args.temperature)
    return loss * world, {"loss": loss}  # x world: DDP averages gradients, the loss already spans all ranks


def stages(args):
    """The stages of a run (see run_utils.Stage). multitask: one stage that interleaves NLI triplet batches
    (contrastive) and KorSTS pair batches (cosine regression) by proportional round-robin, so that each
    epoch uses every batch of both once and the STS batches are spread evenly through the NLI ones, under
    one optimizer and schedule. sup_sts: supervised SimCSE, then STS regression from its best checkpoint."""
    if args.mode == "multitask":
        return [Stage("multitask", ("sup", "sts"), args.epochs, "best_model", None)]
    if args.mode == "sup_sts":
        return [Stage("sup", ("sup",), args.epochs, "sup_model", None),
                Stage("sts", ("sts",), args.sts_epochs, "best_model", "sup_model", lr=args.sts_lr)]
    return [Stage(args.mode, (args.mode,), args.epochs, "best_model", None)]


def build_source(name, args, tokenizer, rank, world, log):
    """sup: NLI triplets; unsup: wiki sentences, twice each (see build_contrastive_dataset) -- full batches
    only, as every anchor needs its B - 1 in-batch negatives. sts: KorSTS pairs (--sts_file) in batches of
    --sts_batch_size, the last partial one kept in a single process."""
    if name == "sts":
        pairs = load_sts_pairs(resolve_path(args.sts_file, args.data_dir), log=log)
        dataset = PairDataset(tokenizer, pairs, args.max_len, desc="tokenize sts pairs")
        plan = BatchPlan(len(dataset), args.sts_batch_size, args.seed, rank, world, drop_last=False)
        return Source(name, dataset, plan, PairCollator(tokenizer.pad_token_id, torch.float), [args.sts_file])
    dataset = build_contrastive_dataset(name, [resolve_path(p, args.data_dir) for p in args.train_file], tokenizer,
                                        args.max_len, args.max_train_samples, args.seed, log=log)
    return Source(name, dataset, BatchPlan(len(dataset), args.batch_size, args.seed, rank, world),
                  ColumnCollator(tokenizer.pad_token_id), args.train_file)


def load_model(args, path, stage):
    """(encoder to evaluate and save, module to train): here both are the SentenceEncoder."""
    encoder = load_or_exit(lambda p: SentenceEncoder.from_pretrained(
        p, pooler=args.pooler, mlp_only_train=args.mlp_only_train, bucket_tokens=args.bucket_tokens,
        mini_batch_size=args.mini_batch_size), path)
    return encoder, encoder


# --- the loop (the same code in every method folder) ---------------------------------------------------

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


def train(args):
    """Run every stage of ``stages(args)`` (see run_stages) holding the output folder's lock."""
    rank, world = setup_distributed(args)
    lock = RunLock(args.output_dir) if rank == 0 else None  # one live run per output folder
    try:
        return run_stages(args, rank, world)
    finally:
        if lock is not None:
            lock.release()


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
    p.add_argument("--mode", choices=tuple(MODE_PRESETS), default="sup",
                   help="sup / unsup SimCSE, multitask (sup + STS regression, joint) or sup_sts (sup, then STS "
                        "regression); the run starts from the flags of presets/<mode>.args")
    p.add_argument("--train_file", nargs="+", default=None,
                   help="sup: NLI files (KorNLI TSV or KLUE-NLI JSON); unsup: sentence-per-line files. Relative "
                        "paths are tried as given, then under --data_dir")
    p.add_argument("--pooler", choices=POOLERS, default="cls_before_pooler",
                   help="sentence vector: cls_before_pooler (raw [CLS]), cls ([CLS] + MLP), mean, pooler")
    p.add_argument("--mlp_only_train", action=argparse.BooleanOptionalAction, default=False,
                   help="with --pooler cls: the MLP in training only, raw [CLS] at evaluation and when saved")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature tau")
    p.add_argument("--mini_batch_size", type=int, default=0,
                   help="gradient caching: encode each batch in chunks of N sentences whose activations are recomputed "
                        "in backward (same loss and gradients; activation memory of N sentences); 0 = off")
    p.add_argument("--sts_file", default="korsts-train", help="multitask, sup_sts: the STS regression data")
    p.add_argument("--sts_batch_size", type=int, default=8, help="multitask, sup_sts: STS pairs per batch")
    p.add_argument("--sts_epochs", type=int, default=4, help="sup_sts: epochs of the STS stage")
    p.add_argument("--sts_lr", type=float, default=2e-5, help="sup_sts: learning rate of the STS stage")
    add_run_args(p)
    args = parse_with_mode_preset(p, argv, os.path.join(HERE, "presets"), MODE_PRESETS)
    return finish_args(p, args, f"kosimcse-{args.mode}")


def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

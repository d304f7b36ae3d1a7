"""Train KoSentenceT5: Sentence-T5 style encoders (the encoder of a T5 checkpoint, or a BART checkpoint;
mean pooling) with SimCSE's contrastive loss, supervised on NLI triplets (in-batch + hard negatives) or
unsupervised on wiki sentences.

    python KoSentenceT5/train.py @KoSentenceT5/presets/sup.args                        # KoSentenceT5 row
    python KoSentenceT5/train.py @KoSentenceT5/presets/sup.args --arch bart --model gogamza/kobart-base-v2
    torchrun --nproc_per_node 4 KoSentenceT5/train.py @KoSentenceT5/presets/sup.args   # 4 GPUs, same global batch
    python KoSentenceT5/train.py --resume output/kosentencet5-sup                      # continue a killed run

--mode M starts from the preset presets/M.args (sup: BM-K's KoSentenceT5 run_example.sh; unsup: SimCSE's
unsupervised recipe); flags after it win. The backbone default is KETI-AIR/ke-t5-base (BM-K's ETRI-T5 is
not public).

T5-specific: ``load_model`` below and model.py (mean pooling, optional Sentence-T5 head); the step and loss are
SimCSE's; ``fit`` and ``train`` are the same in every method folder; common/ is the plumbing.
Outputs: best_model/ (a Hugging Face + sentence-transformers folder), checkpoint/, train_log.jsonl, args.json.
"""
import os
import time

import torch
from tqdm.auto import tqdm

from common.checkpoint import save_checkpoint
from common.data import BatchPlan, ColumnCollator, DataError, PairCollator, PairDataset, load_sts_pairs, resolve_path
from common.dev import best_score_text, BestModel, METHOD
from common.encoding import gather_columns
from common.flags import add_run_args, finish_args, parse_with_mode_preset, PresetParser, refuse_idle_flags
from common.objectives import add_objective_args, check_objective_args, infonce_options, objective_option
from common.run import exit_on_data_error, load_or_exit, LossWindow, nonfinite_loss_exit, run_stages
from common.stages import (autocast_dtype, barrier, describe_stage, interleave, Source, Stage, stage_batches,
                           start_stage, wrap_ddp)
from dataloader import build_contrastive_dataset
from model import (ARCHS, BATCH_STS_LOSSES, HARDNESS_MODES, INFONCE_DIRECTIONS, STS_LOSSES, SentenceT5,
                   contrastive_loss, matryoshka_loss, sts_objective)

HERE = os.path.dirname(os.path.abspath(__file__))
STS_MODES = ("multitask", "sup_sts")
IDLE_FLAGS = {"sts_file": STS_MODES, "sts_batch_size": STS_MODES, "sts_loss": STS_MODES,  # flag: the modes reading it
              "multitask_schedule": ("multitask",), "sts_epochs": ("sup_sts",), "sts_lr": ("sup_sts",)}
MODE_PRESETS = {"sup": "sup.args", "unsup": "unsup.args", "multitask": "multitask.args", "sup_sts": "sup_sts.args"}
# Copied from KoSimCSE/train.py:COLUMNS
COLUMNS = {"sup": 3, "unsup": 2, "pairs": 2, "pairs+negative": 3}


# --- the method: SimCSE's step on a T5 / BART encoder ----------------------------------------------------

# Copied from KoSimCSE/train.py:training_step
def training_step(model, source, batch, args, world):
    """One batch of ``source`` -> (loss to backpropagate, {name: value to log}).

    sup / unsup / pairs: the batch holds every column of B examples in one (k*B, L) tensor, column after column
    (see ColumnCollator): sup k = 3 (anchor, entailment, contradiction), unsup k = 2 (the same sentence
    twice; the two dropout masks make the two views), pairs k = 2 (query, passage) or 3 ("pairs+negative").
    All k*B sentences go through the encoder in one call.
    sts (multitask, sup_sts): B KorSTS pairs as (2B, L) plus ``labels`` = score / 5, for --sts_loss (see
    sts_objective). --matryoshka_dims sums either loss over the truncated dimensions (matryoshka_loss)."""
    dims, weights = objective_option(args, "matryoshka_dims"), objective_option(args, "matryoshka_weights")
    if source == "sts":
        kind = objective_option(args, "sts_loss")
        loss = sts_objective(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], kind, dims, weights)
        # cosine: a mean over the local pairs, DDP's average is the global gradient; cosent / angle: gathered
        return loss * world if kind in BATCH_STS_LOSSES else loss, {"loss": loss}
    k = COLUMNS[source]
    embeddings = gather_columns(model(**batch), k)  # under DDP: the global batch, only local rows differentiable
    loss = matryoshka_loss(lambda e: contrastive_loss(e, k, args.temperature, **infonce_options(args)), embeddings,
                           dims, weights)
    return loss * world, {"loss": loss}  # x world: DDP averages gradients, the loss already spans all ranks


# Copied from KoSimCSE/train.py:stages
def stages(args):
    """The stages of a run (see stages.Stage). multitask: one stage of NLI triplet and KorSTS pair batches,
    interleaved by --multitask_schedule (stages.interleave); pairs_sts: the same with (query, passage) pair
    batches in place of the triplets. sup_sts: supervised SimCSE, then STS regression
    from its best checkpoint."""
    if args.mode in ("multitask", "pairs_sts"):  # pairs_sts: (query, passage) pairs instead of NLI triplets
        return [Stage(name=args.mode, sources=("sup" if args.mode == "multitask" else "pairs", "sts"),
                      epochs=args.epochs, schedule=args.multitask_schedule)]
    if args.mode == "sup_sts":
        return [Stage(name="sup", sources=("sup",), epochs=args.epochs, best_dir="sup_model"),
                Stage(name="sts", sources=("sts",), epochs=args.sts_epochs, start_from="sup_model", lr=args.sts_lr)]
    return [Stage(name=args.mode, sources=(args.mode,), epochs=args.epochs)]


# Copied from KoSimCSE/train.py:build_source
def build_source(name, args, tokenizer, rank, world, log):
    """sup: NLI triplets; unsup: wiki sentences, twice each; pairs: (query, passage[, negative]) rows, named
    "pairs+negative" when they have a negative (see build_contrastive_dataset) -- full batches only, as every
    anchor needs its B - 1 in-batch negatives. sts: KorSTS pairs (--sts_file) in batches of --sts_batch_size,
    the last partial one kept in a single process."""
    if name == "sts":
        pairs = load_sts_pairs(resolve_path(args.sts_file, args.data_dir), log=log)
        dataset = PairDataset(tokenizer, pairs, args.max_len, desc="tokenize sts pairs", prefix=args.query_prefix)
        plan = BatchPlan(len(dataset), args.sts_batch_size, args.seed, rank, world, drop_last=False)
        return Source(name, dataset, plan, PairCollator(tokenizer.pad_token_id, torch.float), [args.sts_file])
    dataset = build_contrastive_dataset(name, [resolve_path(p, args.data_dir) for p in args.train_file], tokenizer,
                                        args.max_len, args.max_train_samples, args.seed, log=log,
                                        prefix=args.query_prefix, passage_prefix=args.passage_prefix,
                                        passage_max_len=getattr(args, "passage_max_len", None))
    if name == "pairs" and dataset.num_columns == 3:
        name = "pairs+negative"
    return Source(name, dataset, BatchPlan(len(dataset), args.batch_size, args.seed, rank, world),
                  ColumnCollator(tokenizer.pad_token_id), args.train_file)


def load_model(args, path, stage):
    """(encoder to evaluate and save, module to train): here both are the SentenceT5."""
    encoder = load_or_exit(lambda p: SentenceT5.from_pretrained(p, arch=args.arch, st5_head=args.st5_head,
                                                                bucket_tokens=args.bucket_tokens,
                                                                mini_batch_size=args.mini_batch_size,
                                                                matryoshka_dims=objective_option(args, "matryoshka_dims")),
                           path)
    return encoder, encoder


# --- the loop (the same code in every method folder) ---------------------------------------------------

# Copied from KoSimCSE/train.py:fit
def fit(args, stage, encoder, trainable, tokenizer, sources, evaluate, run, state=None):
    """Train ``trainable`` on ``sources`` (interleaved, see interleave) for ``stage.epochs`` or --max_steps.
    Evaluate ``encoder`` every --eval_steps and at the end (and each epoch with --eval_each_epoch), keeping
    the best dev model (max of the 4 Spearman values) in output_dir/<stage.best_dir>; write
    output_dir/checkpoint every --save_steps and whenever it evaluates, but not at the run's end. ``run``: the
    run.Run; ``state``: a checkpoint of this stage to resume from. Under torch.distributed every process
    takes its slice of each global batch; rank 0 evaluates and saves."""
    log, rank, world = run.log, run.rank, run.world
    schedule = interleave([len(s.plan) for s in sources], stage.schedule)
    total_steps = args.max_steps if args.max_steps > 0 else stage.epochs * len(schedule)
    optimizers, schedulers, scaler, step, best_score = start_stage(args, stage, trainable, schedule, total_steps,
                                                                   state, rank, log)
    model = wrap_ddp(trainable, world, several_sources=len(sources) > 1)
    best = BestModel(args, stage, encoder, tokenizer, evaluate, log, best_score, sources, rank,
                     stale=state.get("stale_evals", 0) if state else 0)
    log(describe_stage(args, stage, sources, world, total_steps, len(schedule)))
    device_type, amp_dtype = torch.device(args.device).type, autocast_dtype(args)
    window, start = LossWindow(), time.time()
    trainable.train()
    batches = stage_batches(sources, schedule, step, total_steps, args.num_workers, device_type == "cuda")
    with tqdm(total=total_steps, initial=step, desc=f"{METHOD} {stage.name}", unit="step", disable=rank != 0) as bar:
        for epoch, source, batch in batches:
            batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
            optimizer, scheduler = optimizers.of(sources.index(source)), schedulers.of(sources.index(source))
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, logged = training_step(model, source.name, batch, args, world)
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
            run_ends = step == total_steps and stage == run.plan[-1] and not args.keep_checkpoint  # Run.__exit__
            save_now = (step % args.save_steps == 0 or boundary) and not run_ends
            if (step % args.logging_steps == 0 or evaluate_now or save_now) and not window.finite():
                raise nonfinite_loss_exit(step, args.output_dir, stage.best_dir)  # the only GPU sync outside logging steps
            if step % args.logging_steps == 0:
                means = window.pop()
                log.record({"stage": stage.name, "step": step, "epoch": epoch, **means,
                            "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 3)})
                bar.set_postfix(loss=f"{means['loss']:.4f}", best=best_score_text(best.score))
            if evaluate_now:
                best.evaluate(step, epoch)  # rank 0: dev metrics, best_model saved when they improve
                barrier(world)
            if save_now:
                if rank == 0:
                    save_checkpoint(os.path.join(args.output_dir, "checkpoint"), trainable, optimizers, schedulers,
                                    scaler, step, best.score, stage=stage.name, stale_evals=best.stale)
                barrier(world)
            if evaluate_now and best.stop_early():
                log(f"[{stage.name}] early stop at step {step}: {best.stale} evaluations without a better dev score")
                break
    best.finish(step)
    log(f"[{stage.name}] done in {time.time() - start:.0f}s: best dev max-spearman {best_score_text(best.score)}, "
        f"model in {best.dir}")
    return best.score


# Copied from KoSimCSE/train.py:train
def train(args):
    """Load everything, then train stage after stage (``stages(args)``) with ``fit`` (run.run_stages: a
    resumed run restarts in the stage and at the step of its checkpoint; the output folder is touched only
    once the model, tokenizer and data have loaded)."""
    return run_stages(args, stages(args), load_model, build_source, fit)


# --- flags ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = PresetParser(description=__doc__)
    p.add_argument("--model", default="KETI-AIR/ke-t5-base", help="Hugging Face model id or local folder")
    p.add_argument("--arch", choices=ARCHS, default="t5",
                   help="t5: the encoder of a T5/mT5 checkpoint; bart: a BART checkpoint run as sentence-transformers "
                        "runs it")
    p.add_argument("--st5_head", action="store_true",
                   help="Sentence-T5 projection after mean pooling: Dense d->d without bias, then L2 normalisation")
    p.add_argument("--mode", choices=tuple(MODE_PRESETS), default="sup",
                   help="sup / unsup SimCSE, multitask (sup + STS regression, joint) or sup_sts (sup, then STS "
                        "regression); the run starts from the flags of presets/<mode>.args")
    p.add_argument("--train_file", nargs="+", default=None,
                   help="sup: NLI files (KorNLI TSV or KLUE-NLI JSON); unsup: sentence-per-line files. Relative "
                        "paths are tried as given, then under --data_dir")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature tau")
    p.add_argument("--mini_batch_size", type=int, default=0,
                   help="gradient caching: encode each batch in chunks of N sentences whose activations are recomputed "
                        "in backward (same loss and gradients; activation memory of N sentences); 0 = off")
    p.add_argument("--sts_file", default="korsts-train", help="multitask, sup_sts: the STS regression data")
    p.add_argument("--sts_batch_size", type=int, default=8, help="multitask, sup_sts: STS pairs per batch")
    p.add_argument("--multitask_schedule", choices=("proportional", "paired"), default="proportional",
                   help="multitask: proportional (round-robin, one pass over both sets an epoch, one optimizer) or "
                        "paired (jhgan's: one NLI then one STS batch, each its own optimizer, min(len) rounds an epoch)")
    p.add_argument("--sts_epochs", type=int, default=4, help="sup_sts: epochs of the STS stage")
    p.add_argument("--sts_lr", type=float, default=2e-5, help="sup_sts: learning rate of the STS stage")
    add_objective_args(p, STS_LOSSES, HARDNESS_MODES, INFONCE_DIRECTIONS)
    add_run_args(p)
    args = parse_with_mode_preset(p, argv, os.path.join(HERE, "presets"), MODE_PRESETS)
    check_objective_args(p, args)
    refuse_idle_flags(p, args, IDLE_FLAGS)
    return finish_args(p, args, f"kosentencet5-{args.mode}")


# Copied from KoSimCSE/train.py:main
def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

"""Train KoSimCSE: SimCSE on Korean, supervised (NLI triplets with hard negatives), unsupervised (wiki
sentences, dropout as the only augmentation), multitask (supervised SimCSE + KorSTS cosine regression,
joint or one after the other), or pairs ((query, passage) rows with in-batch negatives, for search).

    python KoSimCSE/train.py @KoSimCSE/presets/sup.args --model klue/bert-base       # one process
    torchrun --nproc_per_node 4 KoSimCSE/train.py @KoSimCSE/presets/sup.args         # 4 GPUs, same global batch
    python KoSimCSE/train.py --resume output/kosimcse-sup                            # continue a killed run
    python KoSimCSE/train.py --mode unsup --model klue/bert-base --lr 1e-5           # flags override a preset
    python KoSimCSE/train.py --mode pairs --train_file data/ict/train.tsv --model intfloat/multilingual-e5-small

--mode M starts from the preset presets/M.args (sup: BM-K's KoSimCSE command; unsup: SimCSE's unsupervised
recipe; multitask, sup_sts, pairs: see those files); flags after it win. Presets are plain files of flags, one
published setting each: see presets/.

pairs: --train_file holds anchor<TAB>positive[<TAB>negative] TSVs (data/make_ict.py writes one; evaluation.py
--task mine adds mined negatives) or BEIR folders (queries.jsonl, corpus.jsonl, qrels/train.tsv). Queries take
--query_prefix and --max_len, passages (positives and negatives) --passage_prefix and --passage_max_len. The loss
is sup's InfoNCE (every other passage of the global batch is a negative; --infonce_directions query_to_doc
doc_to_query makes it symmetric); --mini_batch_size and torchrun work as in sup.

Where things are: the step is ``training_step`` below; the loss ``contrastive_loss`` and the poolers
(``SentenceEncoder.embed``) are in model.py; the data is read in dataloader.py; ``fit`` (the loop) and
``train`` (stages, resume) are the same in every method folder; common/ holds the plumbing.

Outputs in --output_dir: best_model/ (the best dev checkpoint, a Hugging Face + sentence-transformers folder),
checkpoint/ (for --resume, until the run ends), train_log.jsonl (losses, lr, dev metrics), args.json.
"""
import argparse
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
from model import (BATCH_STS_LOSSES, HARDNESS_MODES, INFONCE_DIRECTIONS, POOLERS, STS_LOSSES, SentenceEncoder,
                   contrastive_loss, matryoshka_loss, sts_objective)

HERE = os.path.dirname(os.path.abspath(__file__))
MODE_PRESETS = {"sup": "sup.args", "unsup": "unsup.args", "multitask": "multitask.args", "sup_sts": "sup_sts.args",
                "pairs": "pairs.args", "pairs_sts": "pairs_sts.args"}
STS_MODES = ("multitask", "sup_sts", "pairs_sts")
IDLE_FLAGS = {"sts_file": STS_MODES, "sts_batch_size": STS_MODES, "sts_loss": STS_MODES,  # flag: the modes reading it
              "multitask_schedule": ("multitask", "pairs_sts"), "sts_epochs": ("sup_sts",), "sts_lr": ("sup_sts",),
              "passage_max_len": ("pairs", "pairs_sts")}
# sentences per example: (anchor, positive, hard negative) / (s, s) / (query, passage[, negative passage])
COLUMNS = {"sup": 3, "unsup": 2, "pairs": 2, "pairs+negative": 3}


# --- the method --------------------------------------------------------------------------------------

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
    """(encoder to evaluate and save, module to train): here both are the SentenceEncoder."""
    encoder = load_or_exit(lambda p: SentenceEncoder.from_pretrained(
        p, pooler=args.pooler, mlp_only_train=args.mlp_only_train, bucket_tokens=args.bucket_tokens,
        mini_batch_size=args.mini_batch_size, matryoshka_dims=objective_option(args, "matryoshka_dims")), path)
    return encoder, encoder


# --- the loop (the same code in every method folder) ---------------------------------------------------

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


def train(args):
    """Load everything, then train stage after stage (``stages(args)``) with ``fit`` (run.run_stages: a
    resumed run restarts in the stage and at the step of its checkpoint; the output folder is touched only
    once the model, tokenizer and data have loaded)."""
    return run_stages(args, stages(args), load_model, build_source, fit)


# --- flags ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = PresetParser(description=__doc__)
    p.add_argument("--model", default="klue/bert-base", help="Hugging Face model id or local folder")
    p.add_argument("--mode", choices=tuple(MODE_PRESETS), default="sup",
                   help="sup / unsup SimCSE, multitask (sup + STS regression, joint), sup_sts (sup, then STS "
                        "regression), pairs ((query, passage) rows) or pairs_sts (pairs + STS, joint); the run starts "
                        "from the flags of presets/<mode>.args")
    p.add_argument("--train_file", nargs="+", default=None,
                   help="sup: NLI files (KorNLI TSV or KLUE-NLI JSON); unsup: sentence-per-line files; pairs: "
                        "anchor/positive[/negative] TSVs or BEIR folders. Relative paths are tried as given, then "
                        "under --data_dir")
    p.add_argument("--passage_max_len", type=int, default=256,
                   help="pairs: max tokens per passage (positives and negatives; --max_len limits the queries)")
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
    if args.matryoshka_dims and args.mlp_only_train and args.pooler == "cls":
        p.error("--matryoshka_dims trains truncations of the MLP output, but --mlp_only_train saves the raw [CLS] "
                "vector: use --no-mlp_only_train (or another pooler) with --matryoshka_dims")
    return finish_args(p, args, f"kosimcse-{args.mode}")


def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

"""Train KoSBERT: Sentence-BERT on Korean NLI (softmax classification) and/or KorSTS (cosine regression).

    python KoSBERT/train.py @KoSBERT/presets/bmk-kosbert-bert.args                     # BM-K's KoSBERT row
    torchrun --nproc_per_node 4 KoSBERT/train.py @KoSBERT/presets/bmk-kosbert-bert.args  # 4 GPUs, same global batch
    python KoSBERT/train.py --resume output/kosbert-nli_sts                            # continue a killed run
    python KoSBERT/train.py --mode sts --model klue/roberta-base --sts_epochs 8        # flags override defaults

Modes:
  nli        SBERT's softmax objective: Linear(3d -> 3) over [u, v, |u - v|], cross-entropy (BM-K's labels:
             contradiction 0, entailment 1, neutral 2); the classifier is training-only.
  sts        MSE(cos(u, v), score / 5) on KorSTS train (or --sts_file); --sts_loss cosent / angle rank instead.
  nli_sts    BM-K's KoSBERT: the nli stage, then the sts stage from the best NLI model (<output_dir>/nli_model),
             with a fresh optimizer and warmup (his training_nli.py + con_training_sts.py).
  multitask  NLI and STS batches interleaved under one optimizer (common/stages.py:interleave); --epochs.
Any mode: --anchor_file F --anchor_weight W adds W x (1 - cos) between the model's and the frozen starting
model's embeddings of one text of F per training pair (model.anchor_loss): STS tuning that keeps search text put.
Defaults: BM-K's / sentence-transformers' fit(): batch 32, lr 2e-5, decay 0.01, 10% warmup, clipping 1.0, mean
pooling, evaluation every 1000 steps and at each epoch end.

The step is ``training_step`` below; losses (``softmax_loss``, ``sts_objective``, ``PairObjective``) and pooling:
model.py; ``fit``, ``train``: as every folder; plumbing: common/. Outputs: best_model/ (no classifier), checkpoint/.
"""
import os
import random
import time

import torch
from tqdm.auto import tqdm

from common.checkpoint import save_checkpoint
from common.data import BatchPlan, DataError, PairCollator, PairDataset, TokenizedTexts, load_sts_pairs, resolve_path
from common.dev import best_score_text, BestModel, METHOD
from common.flags import add_run_args, explicit_flags, finish_args, PresetParser, refuse_idle_flags
from common.objectives import add_objective_args, check_objective_args, objective_option
from common.run import exit_on_data_error, load_or_exit, LossWindow, nonfinite_loss_exit, run_stages
from common.stages import (autocast_dtype, barrier, describe_stage, interleave, Source, Stage, stage_batches,
                           start_stage, wrap_ddp)
from dataloader import AnchorCollator, AnchoredPairs, load_anchor_texts, load_nli_pairs
from model import BATCH_STS_LOSSES, POOLERS, PairObjective, STS_LOSSES, SentenceEncoder, SoftmaxClassifier

MODES = ("nli", "sts", "nli_sts", "multitask")
IDLE_FLAGS = {"nli_file": ("nli", "nli_sts", "multitask"), "nli_epochs": ("nli", "nli_sts"),  # flag: modes reading it
              "sts_file": ("sts", "nli_sts", "multitask"), "sts_epochs": ("sts", "nli_sts"),
              "sts_loss": ("sts", "nli_sts", "multitask"), "epochs": ("multitask",)}
SNLI = "KorNLI/snli_1.0_train.ko.tsv"


# --- the method --------------------------------------------------------------------------------------

def training_step(model, source, batch, args, world):
    """One batch of ``source`` ("nli" or "sts") -> (loss to backpropagate, {name: value to log}).

    The batch holds B pairs as one (2B, L) tensor (first sentences, then second ones; see PairCollator)
    plus ``labels``; PairObjective encodes them in one call and applies that source's loss. softmax and cosine
    regression are means over the local pairs, so DDP's gradient average is already the global batch's
    gradient; --sts_loss cosent / angle are over the gathered global batch, so they are multiplied by the
    world size (as SimCSE's InfoNCE is). With --anchor_file the batch also holds one anchor text a pair, whose
    cosine distance to the frozen starting model's embedding is added, times --anchor_weight."""
    loss, distance = model(source, **batch)
    spans_ranks = source == "sts" and getattr(model, "module", model).sts_loss in BATCH_STS_LOSSES
    total = loss * world if spans_ranks else loss
    if distance is None:
        return total, {"loss": loss}
    return total + args.anchor_weight * distance, {"loss": loss, "anchor_distance": distance}


def stages(args):
    """The stages of a run (see stages.Stage); nli_sts has two, the second starting from nli_model."""
    if args.mode == "nli_sts":
        return [Stage(name="nli", sources=("nli",), epochs=args.nli_epochs, best_dir="nli_model"),
                Stage(name="sts", sources=("sts",), epochs=args.sts_epochs, start_from="nli_model")]
    if args.mode == "multitask":
        return [Stage(name="multitask", sources=("nli", "sts"), epochs=args.epochs)]
    return [Stage(name=args.mode, sources=(args.mode,),
                  epochs=args.nli_epochs if args.mode == "nli" else args.sts_epochs)]


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
    dataset = PairDataset(tokenizer, pairs, args.max_len, desc=f"tokenize {name} pairs", prefix=args.query_prefix)
    if dataset.tokenized.num_truncated:
        log(f"{dataset.tokenized.num_truncated:,} of {len(dataset.tokenized):,} {name} sentences were longer "
            f"than --max_len {args.max_len} tokens and were truncated")
    collator = PairCollator(tokenizer.pad_token_id, torch.long if name == "nli" else torch.float)
    if args.anchor_file:  # one anchor text a pair: half as many (query, passage) pairs of the file as pairs here
        queries, passages = load_anchor_texts(resolve_path(args.anchor_file, args.data_dir), -(-len(dataset) // 2),
                                              args.seed, log)
        queries = TokenizedTexts(tokenizer, queries, args.max_len, desc=None, prefix=args.query_prefix)
        passages = TokenizedTexts(tokenizer, passages, args.anchor_max_len, desc=None, prefix=args.passage_prefix)
        dataset = AnchoredPairs(dataset, queries, passages, args.seed)
        collator = AnchorCollator(collator, tokenizer.pad_token_id)
    plan = BatchPlan(len(dataset), args.batch_size, args.seed, rank, world, drop_last=False)
    return Source(name, dataset, plan, collator, args.nli_file if name == "nli" else [args.sts_file])


def load_model(args, path, stage):
    """(encoder to evaluate and save, module to train): the SentenceEncoder, and PairObjective holding it
    with a new NLI classifier in the stages that train on NLI."""
    dims = objective_option(args, "matryoshka_dims")
    encoder = load_or_exit(lambda p: SentenceEncoder.from_pretrained(
        p, pooler=args.pooler, bucket_tokens=args.bucket_tokens, mini_batch_size=args.mini_batch_size,
        matryoshka_dims=dims), path)
    classifier = SoftmaxClassifier(encoder.dim, num_labels=3) if stage != "sts" else None
    reference = None  # --anchor_file: the starting model (--model, in every stage), frozen
    if args.anchor_file:
        reference = load_or_exit(lambda p: SentenceEncoder.from_pretrained(p, pooler=args.pooler,
                                                                           bucket_tokens=args.bucket_tokens), args.model)
    return encoder, PairObjective(encoder, classifier, objective_option(args, "sts_loss"), dims,
                                  objective_option(args, "matryoshka_weights"), reference=reference)


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
    p.add_argument("--anchor_file", default=None,
                   help="(query, passage) pairs (a pairs TSV or BEIR folder, as KoSimCSE --mode pairs reads) whose "
                        "texts keep the starting model's embeddings: one text a training pair, queries with "
                        "--query_prefix, passages with --passage_prefix (model.anchor_loss)")
    p.add_argument("--anchor_weight", type=float, default=1.0, help="weight of the anchor loss (--anchor_file)")
    p.add_argument("--anchor_max_len", type=int, default=128, help="token limit of the anchor passages")
    add_objective_args(p, sts_losses=STS_LOSSES)
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
    check_objective_args(p, args)
    refuse_idle_flags(p, args, IDLE_FLAGS)
    if not args.anchor_file and not args.resume:
        argv = list(p.argv)
        given = explicit_flags(p, argv)  # it parses again, which resets p.argv
        p.argv = argv
        idle = [f for f in ("anchor_weight", "anchor_max_len") if f in given]
        if idle:
            p.error(f"--{idle[0]} acts on --anchor_file, which is not given")
    if not args.anchor_weight > 0:
        p.error(f"--anchor_weight {args.anchor_weight}: give a weight above 0 (leave out --anchor_file for none)")
    if args.matryoshka_dims and args.mode == "nli":
        p.error("--matryoshka_dims wraps the STS objective; the NLI softmax classifier reads [u, v, |u - v|] at the "
                "full dimension (use --mode sts, nli_sts or multitask)")
    return finish_args(p, args, f"kosbert-{args.mode}")


# Copied from KoSimCSE/train.py:main
def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

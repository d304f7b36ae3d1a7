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
classifier), checkpoint/ (for --resume, until the run ends), train_log.jsonl, args.json, nli_model/ (nli_sts).
"""
import os
import random
import time

import torch
from tqdm.auto import tqdm

from dataloader import BatchPlan, DataError, PairCollator, PairDataset, load_nli_pairs, load_sts_pairs, resolve_path
from model import BATCH_STS_LOSSES, POOLERS, STS_LOSSES, PairObjective, SentenceEncoder, SoftmaxClassifier
from run_utils import (METHOD, BestModel, LossWindow, PresetParser, Run, Source, Stage, add_run_args, autocast_dtype,
                       barrier, best_score_text, describe_stage, exit_on_data_error, finish_args, interleave,
                       load_or_exit, load_training_tokenizer, nonfinite_loss_exit, save_checkpoint, set_seed,
                       stage_batches, start_stage, wrap_ddp)

MODES = ("nli", "sts", "nli_sts", "multitask")
SNLI = "KorNLI/snli_1.0_train.ko.tsv"


# --- the method --------------------------------------------------------------------------------------

def training_step(model, source, batch, args, world):
    """One batch of ``source`` ("nli" or "sts") -> (loss to backpropagate, {name: value to log}).

    The batch holds B pairs as one (2B, L) tensor (first sentences, then second ones; see PairCollator)
    plus ``labels``; PairObjective encodes them in one call and applies that source's loss. softmax and cosine
    regression are means over the local pairs, so DDP's gradient average is already the global batch's
    gradient; --sts_loss cosent / angle are over the gathered global batch, so they are multiplied by the
    world size (as SimCSE's InfoNCE is)."""
    loss = model(source, **batch)
    spans_ranks = source == "sts" and getattr(model, "module", model).sts_loss in BATCH_STS_LOSSES
    return loss * world if spans_ranks else loss, {"loss": loss}


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
    dims = objective_option(args, "matryoshka_dims")
    encoder = load_or_exit(lambda p: SentenceEncoder.from_pretrained(
        p, pooler=args.pooler, bucket_tokens=args.bucket_tokens, mini_batch_size=args.mini_batch_size,
        matryoshka_dims=dims), path)
    classifier = SoftmaxClassifier(encoder.dim, num_labels=3) if stage != "sts" else None
    return encoder, PairObjective(encoder, classifier, objective_option(args, "sts_loss"), dims,
                                  objective_option(args, "matryoshka_weights"))


# --- the loop (the same code in every method folder) ---------------------------------------------------

# Copied from KoSimCSE/train.py:fit
def fit(args, stage, encoder, trainable, tokenizer, sources, evaluate, run, state=None):
    """Train ``trainable`` on ``sources`` (interleaved, see interleave) for ``stage.epochs`` or --max_steps.
    Evaluate ``encoder`` every --eval_steps and at the end (and each epoch with --eval_each_epoch), keeping
    the best dev model (max of the 4 Spearman values) in output_dir/<stage.best_dir>; write
    output_dir/checkpoint every --save_steps and whenever it evaluates, but not at the run's end. ``run``: the
    run_utils.Run; ``state``: a checkpoint of this stage to resume from. Under torch.distributed every process
    takes its slice of each global batch; rank 0 evaluates and saves."""
    log, rank, world = run.log, run.rank, run.world
    schedule = interleave([len(s.plan) for s in sources])
    total_steps = args.max_steps if args.max_steps > 0 else stage.epochs * len(schedule)
    optimizer, scheduler, scaler, step, best_score = start_stage(args, stage, trainable, total_steps, state, rank, log)
    model = wrap_ddp(trainable, world, several_sources=len(sources) > 1)
    best = BestModel(args, stage, encoder, tokenizer, evaluate, log, best_score, sources, rank)
    log(describe_stage(args, stage, sources, world, total_steps, len(schedule)))
    device_type, amp_dtype = torch.device(args.device).type, autocast_dtype(args)
    window, start = LossWindow(), time.time()
    trainable.train()
    batches = stage_batches(sources, schedule, step, total_steps, args.num_workers, device_type == "cuda")
    with tqdm(total=total_steps, initial=step, desc=f"{METHOD} {stage.name}", unit="step", disable=rank != 0) as bar:
        for epoch, source, batch in batches:
            batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
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
                raise nonfinite_loss_exit(step, args.output_dir)  # the only GPU sync outside logging steps
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
                    save_checkpoint(os.path.join(args.output_dir, "checkpoint"), trainable, optimizer, scheduler,
                                    scaler, step, best.score, stage=stage.name)
                barrier(world)
    best.finish(step)
    log(f"[{stage.name}] done in {time.time() - start:.0f}s: best dev max-spearman {best_score_text(best.score)}, "
        f"model in {best.dir}")
    return best.score


# Copied from KoSimCSE/train.py:train
def train(args):
    """Load everything, then train stage after stage (``stages(args)``); a resumed run restarts in the stage
    and at the step of its checkpoint. The output folder is touched only once the model, tokenizer and data
    have loaded (see run_utils.Run)."""
    plan = stages(args)
    with Run(args, plan) as run:
        tokenizer = load_training_tokenizer(args.model)
        encoder, trainable = load_model(args, args.model, plan[0].name)
        sources = {name: build_source(name, args, tokenizer, run.rank, run.world, run.log)
                   for name in dict.fromkeys(n for s in plan for n in s.sources)}
        evaluate = run.start(tokenizer, encoder)
        for stage, state in run.remaining_stages():
            if stage.start_from is not None:  # continue from the best model of an earlier stage
                del encoder, trainable
                set_seed(args.seed + run.rank)
                encoder, trainable = load_model(args, os.path.join(args.output_dir, stage.start_from), stage.name)
                run.log(f"[{stage.name}] continuing from {stage.start_from}")
            trainable.to(args.device)
            score = fit(args, stage, encoder, trainable, tokenizer, [sources[n] for n in stage.sources], evaluate,
                        run, state)
            barrier(run.world)  # rank 0 has written this stage's best model
    return score


# --- flags ----------------------------------------------------------------------------------------------

# Copied from KoSimCSE/train.py:OBJECTIVE_DEFAULTS
OBJECTIVE_DEFAULTS = {"sts_loss": "cosine", "hardness_mode": None, "hardness_strength": 0.0,
                      "infonce_directions": ["query_to_doc"], "infonce_partition": "joint", "matryoshka_dims": [],
                      "matryoshka_weights": None}


# Copied from KoSimCSE/train.py:objective_option
def objective_option(args, name):
    return getattr(args, name, OBJECTIVE_DEFAULTS[name])


# Copied from KoSimCSE/train.py:add_objective_args
def add_objective_args(p, sts=True, infonce=True, matryoshka=True):
    """The flags of the newer objectives (sentence-transformers' semantics; the defaults keep every preset as
    published): --sts_loss where an STS regression objective exists, the InfoNCE options where InfoNCE is
    used, --matryoshka_dims / --matryoshka_weights where the loss is on the saved embedding."""
    d = OBJECTIVE_DEFAULTS
    if sts:
        p.add_argument("--sts_loss", choices=tuple(STS_LOSSES), default=d["sts_loss"],
                       help="STS objective: cosine (SBERT's MSE of cos vs score/5), cosent (CoSENTLoss) or angle "
                            "(AnglELoss), both ranking every pair of the batch against every other, scale 20")
    if infonce:
        p.add_argument("--hardness_mode", choices=HARDNESS_MODES, default=d["hardness_mode"],
                       help="InfoNCE hardness weighting (MultipleNegativesRankingLoss): add hardness_strength * "
                            "cos (no gradient) to the logits of in_batch_negatives, hard_negatives or all_negatives")
        p.add_argument("--hardness_strength", type=float, default=d["hardness_strength"],
                       help="alpha of --hardness_mode (Lan et al. use 9 for in-batch, EmbeddingGemma 5 for hard)")
        p.add_argument("--infonce_directions", nargs="+", choices=INFONCE_DIRECTIONS, default=d["infonce_directions"],
                       help="InfoNCE terms: query_to_doc (always) plus doc_to_query (bidirectional), query_to_query, "
                            "doc_to_doc (all four, joint: GTE's)")
        p.add_argument("--infonce_partition", choices=("joint", "per_direction"), default=d["infonce_partition"],
                       help="one softmax over all --infonce_directions (joint) or one per direction, averaged")
    if matryoshka:
        p.add_argument("--matryoshka_dims", nargs="*", type=int, default=d["matryoshka_dims"],
                       help="Matryoshka: the loss summed over these truncated, re-normalised dimensions (e.g. "
                            "768 512 256 128 64; include the full one); recorded in the saved folder; empty = off")
        p.add_argument("--matryoshka_weights", nargs="+", type=float, default=d["matryoshka_weights"],
                       help="one weight per --matryoshka_dims (default 1 each)")


# Copied from KoSimCSE/train.py:check_objective_args
def check_objective_args(p, args):
    """The combinations the objective flags refuse (sentence-transformers refuses the same)."""
    directions = objective_option(args, "infonce_directions")
    if "query_to_doc" not in directions:
        p.error("--infonce_directions must include query_to_doc (it holds the positive pair)")
    if objective_option(args, "infonce_partition") == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        p.error("--infonce_partition per_direction cannot take query_to_query or doc_to_doc (their softmax has no "
                "positive); use joint")
    if objective_option(args, "hardness_strength") < 0:
        p.error("--hardness_strength must be non-negative")
    dims, weights = objective_option(args, "matryoshka_dims"), objective_option(args, "matryoshka_weights")
    if any(dim <= 0 for dim in dims):
        p.error("--matryoshka_dims must be positive")
    if weights is not None and len(weights) != len(dims):
        p.error(f"--matryoshka_weights takes one weight per --matryoshka_dims ({len(dims)})")


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
    add_objective_args(p, infonce=False)
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
    if args.matryoshka_dims and args.mode == "nli":
        p.error("--matryoshka_dims wraps the STS objective; the NLI softmax classifier reads [u, v, |u - v|] at the "
                "full dimension (use --mode sts, nli_sts or multitask)")
    return finish_args(p, args, f"kosbert-{args.mode}")


# Copied from KoSimCSE/train.py:main
def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

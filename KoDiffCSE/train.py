"""Train KoDiffCSE: DiffCSE on Korean wiki sentences -- unsupervised SimCSE plus a replaced-token
discriminator conditioned on the sentence vector, fed by a frozen masked-LM generator.

    python KoDiffCSE/train.py                                                  # BM-K's KoDiffCSE-RoBERTa (the defaults)
    python KoDiffCSE/train.py @KoDiffCSE/presets/diffcse-bert.args             # DiffCSE's own recipe, klue/bert-base
    torchrun --nproc_per_node 4 KoDiffCSE/train.py @KoDiffCSE/presets/bmk-roberta.args  # 4 GPUs, same global batch
    python KoDiffCSE/train.py --resume output/kodiffcse                        # continue a killed run
    python KoDiffCSE/train.py @KoDiffCSE/presets/quick.args --model M --generator_name G --lr 3e-5  # flags override

The defaults are BM-K's KoDiffCSE: its run_diff.sh values and its code's projection (the checkpoint's
pooler), masking (static, [SEP]) and generator mode (train, dropout on); presets/bmk-roberta.args spells
them out with their sources, presets/diffcse-bert.args is DiffCSE's own recipe. Presets are plain files
of flags; flags after one win. The generator must share the encoder's vocabulary (checked before any
weights are loaded).

Where things are: the step is ``training_step`` below (masking -> DiffCSE.forward -> losses); the losses
(``contrastive_loss``, ``replaced_token_loss``, ``diffcse_loss``), the projections and the conditioning
(``DiffCSE.discriminate``) are in model.py; the masking and the data in dataloader.py; ``fit`` (the loop)
and ``train`` (stages, resume) are the same in every method folder; run_utils.py holds the plumbing.

Outputs in --output_dir: best_model/ (the encoder alone, best dev score, raw [CLS]; a Hugging Face +
sentence-transformers folder), checkpoint/ (the whole model, for --resume, until the run ends),
train_log.jsonl (loss, contrastive_loss, rtd_loss, rtd_accuracy, lr, dev metrics), args.json.
"""
import os
import time

import torch
from tqdm.auto import tqdm

from dataloader import (BatchPlan, ColumnCollator, DataError, build_diffcse_dataset, mask_tokens, masking_vocabulary,
                        resolve_path)
from model import (HARDNESS_MODES, INFONCE_DIRECTIONS, PROJECTIONS, DiffCSE, check_generator, contrastive_loss,
                   diffcse_loss, gather_columns, replaced_token_accuracy, replaced_token_loss)
from run_utils import (METHOD, BestModel, LossWindow, PresetParser, Run, Source, Stage, add_run_args, autocast_dtype,
                       barrier, best_score_text, describe_stage, exit_on_data_error, finish_args, interleave,
                       load_training_tokenizer, nonfinite_loss_exit, save_checkpoint, set_seed, stage_batches,
                       start_stage, wrap_ddp)

MASKINGS = ("static_sep", "dynamic")


# --- the method ---------------------------------------------------------------------------------------

def training_step(model, source, batch, args, world):
    """One batch of wiki sentences -> (loss to backpropagate, {name: value to log}).

    The batch holds B sentences twice, (2B, L): view 1 of every sentence, then view 2 (ColumnCollator;
    dropout makes the views differ). With --masking static_sep it also holds their masked views, made
    at load time: (4B, L), the views first. With --masking dynamic the masked views are drawn here."""
    diffcse = getattr(model, "module", model)  # under DDP the DiffCSE module is model.module
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if args.masking == "static_sep":
        input_ids, mlm_input_ids = input_ids.chunk(2)
        attention_mask = attention_mask.chunk(2)[0]  # a masked view keeps its sentence's length
    else:
        mlm_input_ids, _ = mask_tokens(input_ids, attention_mask, diffcse.vocabulary, args.masking_ratio)
    out = model(input_ids, attention_mask, mlm_input_ids)
    # Under DDP gather_columns gives the global batch, only this process's rows differentiable.
    contrastive = contrastive_loss(gather_columns(out.embeddings, 2), 2, args.temperature, **infonce_options(args))
    rtd = replaced_token_loss(out.rtd_logits, out.replaced, attention_mask)
    to_backpropagate, loss = diffcse_loss(contrastive, rtd, args.lambda_weight, world)
    return to_backpropagate, {"loss": loss.detach(), "contrastive_loss": contrastive.detach(), "rtd_loss": rtd.detach(),
                              "rtd_accuracy": replaced_token_accuracy(out.rtd_logits, out.replaced, attention_mask)}


def stages(args):
    """The stages of a run (see run_utils.Stage): one here."""
    return [Stage("unsup", ("wiki",), args.epochs, "best_model", None)]


def build_source(name, args, tokenizer, rank, world, log):
    """The wiki sentences, twice each, with their two fixed masked views under --masking static_sep (see
    build_diffcse_dataset). Full batches only: every anchor needs its B - 1 in-batch negatives."""
    static_sep_ratio = args.masking_ratio if args.masking == "static_sep" else None
    dataset = build_diffcse_dataset([resolve_path(p, args.data_dir) for p in args.train_file], tokenizer, args.max_len,
                                    args.max_train_samples, args.seed, static_sep_ratio, log=log)
    return Source(name, dataset, BatchPlan(len(dataset), args.batch_size, args.seed, rank, world),
                  ColumnCollator(tokenizer.pad_token_id), args.train_file)


def load_model(args, path, stage):
    """(encoder to evaluate and save, module to train): the whole DiffCSE module trains; its encoder
    alone (raw [CLS]) is evaluated and saved."""
    tokenizer = check_generator(path, args.generator_name, args.masking)
    try:
        model = DiffCSE.from_pretrained(path, args.generator_name, masking_vocabulary(tokenizer),
                                        projection=args.projection, generator_eval=args.generator_eval,
                                        bucket_tokens=args.bucket_tokens)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the encoder '{path}' with the generator '{args.generator_name}': "
                         f"{e}") from None
    return model.encoder, model


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


# Copied from KoSimCSE/train.py:infonce_options
def infonce_options(args):
    """contrastive_loss's keyword options from the flags (their defaults: plain InfoNCE)."""
    return {"hardness_mode": objective_option(args, "hardness_mode"),
            "hardness_strength": objective_option(args, "hardness_strength"),
            "directions": tuple(objective_option(args, "infonce_directions")),
            "partition": objective_option(args, "infonce_partition")}


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
    p.add_argument("--model", default="klue/roberta-base",
                   help="encoder, where the discriminator starts too: a Hugging Face model id or local folder")
    p.add_argument("--generator_name", default="klue/roberta-small",
                   help="frozen masked-LM generator with the encoder's vocabulary")
    p.add_argument("--train_file", nargs="+", default=["wiki/wiki_corpus.txt"],
                   help="sentence-per-line files; relative paths are tried as given, then under --data_dir")
    p.add_argument("--masking", choices=MASKINGS, default="static_sep",
                   help="static_sep: BM-K's KoDiffCSE, fixed at load time, exactly max(1, int(n * ratio)) of a "
                        "sentence's n tokens between [CLS] and [SEP] replaced by the [SEP] id; dynamic: DiffCSE's, "
                        "drawn per batch, each non-special token chosen with probability ratio, then 80/10/10 "
                        "[MASK]/random/kept. Default static_sep, as the defaults are BM-K's")
    p.add_argument("--masking_ratio", type=float, default=0.15, help="share of tokens masked (BM-K 0.15, DiffCSE 0.30)")
    p.add_argument("--lambda_weight", type=float, default=0.005,
                   help="weight of the replaced-token loss, a cross-entropy over real tokens (the originals also "
                        "count padded positions, labelled original)")
    p.add_argument("--projection", choices=PROJECTIONS, default="pooler",
                   help="training-only head over [CLS] that gives the sentence vectors (evaluation and the saved "
                        "model use raw [CLS]): pooler = the checkpoint's pooler, dense + tanh (BM-K's KoDiffCSE); "
                        "bn_mlp = DiffCSE's BatchNorm MLP (its --batchnorm); mlp = a new Linear + Tanh. Default "
                        "pooler, as the defaults are BM-K's; a checkpoint without pooler weights starts it from "
                        "transformers' initialisation, as BM-K's code did (with a warning)")
    p.add_argument("--generator_eval", action="store_true",
                   help="run the generator in eval mode, no dropout (default: train mode, dropout on, as DiffCSE "
                        "and BM-K run it)")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature tau")
    add_objective_args(p, sts=False, matryoshka=False)  # the sentence vectors are a training-only projection's
    add_run_args(p, batch_size=256, epochs=1, lr=5e-5, max_len=64, warmup_ratio=0.05)
    args = p.parse_args(argv)
    check_objective_args(p, args)
    args = finish_args(p, args, "kodiffcse")
    if not 0.0 <= args.masking_ratio <= 1.0:
        p.error(f"--masking_ratio {args.masking_ratio} is not a share between 0 and 1")
    return args


# Copied from KoSimCSE/train.py:main
def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

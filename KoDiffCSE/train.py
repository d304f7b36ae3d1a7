"""Train KoDiffCSE: DiffCSE on Korean wiki sentences -- unsupervised SimCSE plus a replaced-token
discriminator conditioned on the sentence vector, fed by a frozen masked-LM generator.

    python KoDiffCSE/train.py @KoDiffCSE/presets/bmk-roberta.args              # BM-K's KoDiffCSE-RoBERTa, as he ran it
    python KoDiffCSE/train.py @KoDiffCSE/presets/diffcse-bert.args             # DiffCSE's own recipe, klue/bert-base
    torchrun --nproc_per_node 4 KoDiffCSE/train.py @KoDiffCSE/presets/bmk-roberta.args  # 4 GPUs, same global batch
    python KoDiffCSE/train.py --resume output/kodiffcse                        # continue a killed run
    python KoDiffCSE/train.py @KoDiffCSE/presets/quick.args --model M --generator_name G --lr 3e-5  # flags override

The defaults are BM-K's KoDiffCSE (run_diff.sh; pooler projection, static [SEP] masking, generator in train
mode) but for four switches that presets/bmk-roberta.args turns on, with their sources: --rtd_average bmk,
--unk_to_sep, --dev_protocol bmk with --early_stop_evals 30, and fp16 (CUDA only). presets/diffcse-bert.args
is DiffCSE's recipe. The generator must share the encoder's vocabulary (checked before weights load).

The step is ``training_step`` below; the losses and the model are in model.py, masking in dataloader.py.
Outputs: best_model/ (the encoder alone, raw [CLS]; HF + sentence-transformers), checkpoint/, train_log.jsonl.
"""
import argparse
import os
import time

import torch
from tqdm.auto import tqdm

from common.checkpoint import save_checkpoint
from common.data import BatchPlan, ColumnCollator, DataError, resolve_path
from common.dev import best_score_text, BestModel, METHOD
from common.encoding import gather_columns
from common.flags import add_run_args, finish_args, PresetParser
from common.objectives import add_objective_args, check_objective_args, infonce_options
from common.run import exit_on_data_error, LossWindow, nonfinite_loss_exit, run_stages
from common.stages import (autocast_dtype, barrier, describe_stage, interleave, Source, Stage, stage_batches,
                           start_stage, wrap_ddp)
from dataloader import build_diffcse_dataset, check_generator, mask_tokens, masking_vocabulary
from model import (DiffCSE, HARDNESS_MODES, INFONCE_DIRECTIONS, PROJECTIONS, RTD_AVERAGES, contrastive_loss,
                   diffcse_loss, replaced_token_accuracy, replaced_token_loss)

MASKINGS = ("static_sep", "dynamic")


# --- the method ---------------------------------------------------------------------------------------

def training_step(model, source, batch, args, world):
    """One batch of wiki sentences -> (loss to backpropagate, {name: value to log}).

    The batch holds B sentences twice, (2B, L): view 1 of every sentence, then view 2 (dropout makes them
    differ); with --masking static_sep also their masked views made at load time, (4B, L); with dynamic the
    masked views are drawn here. --rtd_average bmk pads the batch to --max_len first, as BM-K's loader."""
    diffcse = getattr(model, "module", model)  # under DDP the DiffCSE module is model.module
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if args.masking == "static_sep":
        input_ids, mlm_input_ids = input_ids.chunk(2)
        attention_mask = attention_mask.chunk(2)[0]  # a masked view keeps its sentence's length
    else:
        mlm_input_ids, _ = mask_tokens(input_ids, attention_mask, diffcse.vocabulary, args.masking_ratio)
    average = getattr(args, "rtd_average", "tokens")
    if average == "bmk" and input_ids.shape[1] < args.max_len:
        extra, pad_id = args.max_len - input_ids.shape[1], diffcse.discriminator.config.pad_token_id
        input_ids, mlm_input_ids = (torch.nn.functional.pad(t, (0, extra), value=pad_id) for t in (input_ids, mlm_input_ids))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
    out = model(input_ids, attention_mask, mlm_input_ids)
    # Under DDP gather_columns gives the global batch, only this process's rows differentiable.
    contrastive = contrastive_loss(gather_columns(out.embeddings, 2), 2, args.temperature, **infonce_options(args))
    rtd = replaced_token_loss(out.rtd_logits, out.replaced, attention_mask, average)
    to_backpropagate, loss = diffcse_loss(contrastive, rtd, args.lambda_weight, world)
    return to_backpropagate, {"loss": loss.detach(), "contrastive_loss": contrastive.detach(), "rtd_loss": rtd.detach(),
                              "rtd_accuracy": replaced_token_accuracy(out.rtd_logits, out.replaced, attention_mask)}


def stages(args):
    """The stages of a run (see stages.Stage): one here."""
    return [Stage(name="unsup", sources=("wiki",), epochs=args.epochs)]


def build_source(name, args, tokenizer, rank, world, log):
    """The wiki sentences, twice each, with their two fixed masked views under --masking static_sep (see
    build_diffcse_dataset). Full batches only: every anchor needs its B - 1 in-batch negatives."""
    static_sep_ratio = args.masking_ratio if args.masking == "static_sep" else None
    dataset = build_diffcse_dataset([resolve_path(p, args.data_dir) for p in args.train_file], tokenizer, args.max_len,
                                    args.max_train_samples, args.seed, static_sep_ratio, log=log,
                                    unk_to_sep=args.unk_to_sep, prefix=args.query_prefix)
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
    p.add_argument("--model", default="klue/roberta-base",
                   help="encoder, where the discriminator starts too: a Hugging Face model id or local folder")
    p.add_argument("--generator_name", default="klue/roberta-small",
                   help="frozen masked-LM generator with the encoder's vocabulary")
    p.add_argument("--train_file", nargs="+", default=["wiki/wiki_corpus.txt"],
                   help="sentence-per-line files; relative paths are tried as given, then under --data_dir")
    p.add_argument("--masking", choices=MASKINGS, default="static_sep",
                   help="static_sep: BM-K's, fixed at load time, max(1, int(n * ratio)) tokens -> [SEP]; dynamic: "
                        "DiffCSE's, per batch, 80/10/10 [MASK]/random/kept (see dataloader.py)")
    p.add_argument("--unk_to_sep", action=argparse.BooleanOptionalAction, default=False,
                   help="static_sep: BM-K's [UNK] handling (every special token inside a sentence -> [SEP], the "
                        "masked positions drawn among the others); off: [UNK] is masked only when drawn")
    p.add_argument("--masking_ratio", type=float, default=0.15, help="share of tokens masked (BM-K 0.15, DiffCSE 0.30)")
    p.add_argument("--lambda_weight", type=float, default=0.005, help="weight of the replaced-token loss")
    p.add_argument("--rtd_average", choices=RTD_AVERAGES, default="tokens",
                   help="replaced-token loss averaged over the real tokens (tokens), as BM-K (bmk: two views' means "
                        "over all --max_len positions) or as DiffCSE (diffcse: one mean over the padded batch)")
    p.add_argument("--projection", choices=PROJECTIONS, default="pooler",
                   help="training-only head over [CLS] (the saved model is raw [CLS]): pooler = the checkpoint's "
                        "(BM-K), bn_mlp = DiffCSE's BatchNorm MLP, mlp = a new Linear + Tanh (see model.py)")
    p.add_argument("--generator_eval", action="store_true",
                   help="generator in eval mode (default: train mode, dropout on, as DiffCSE and BM-K)")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature tau")
    add_objective_args(p, hardness_modes=HARDNESS_MODES, directions=INFONCE_DIRECTIONS, matryoshka=False)
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

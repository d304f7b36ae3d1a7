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
sentence-transformers folder), checkpoint/ (the whole model, for --resume), train_log.jsonl (loss,
contrastive_loss, rtd_loss, rtd_accuracy, lr, dev metrics), args.json.
"""
import math
import os
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, get_linear_schedule_with_warmup

from dataloader import (BatchPlan, ColumnCollator, DataError, build_diffcse_dataset, mask_tokens, masking_vocabulary,
                        resolve_path)
from evaluation import load_tokenizer
from model import (PROJECTIONS, DiffCSE, contrastive_loss, diffcse_loss, gather_columns, replaced_token_accuracy,
                   replaced_token_loss)
from run_utils import (DevEvaluator, LossWindow, METHOD, PresetParser, RunLock, RunLog, Source, Stage, add_run_args,
                       barrier, best_score_text, build_optimizer, check_output_dir, exit_on_data_error, finish_args,
                       interleave, load_checkpoint, load_or_exit, model_max_len, nonfinite_loss_exit,
                       prepare_output_dir, read_checkpoint, restore_rng, save_atomically, save_checkpoint, save_model,
                       set_seed, setup_distributed, stage_batches, truncate_log)

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
    contrastive = contrastive_loss(gather_columns(out.embeddings, 2), 2, args.temperature)
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
    tokenizer = check_generator(args, path)
    try:
        model = DiffCSE.from_pretrained(path, args.generator_name, masking_vocabulary(tokenizer),
                                        projection=args.projection, generator_eval=args.generator_eval,
                                        bucket_tokens=args.bucket_tokens)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the encoder '{path}' with the generator '{args.generator_name}': "
                         f"{e}") from None
    return model.encoder, model


def check_generator(args, path):
    """The generator's token ids go to the discriminator as they are, so the generator must use the
    encoder's tokenizer and may not predict ids outside the encoder's embedding table. Checked from the
    tokenizers and configs alone, before any weights are loaded; returns the encoder's tokenizer."""
    def load(what, name, loader):
        try:
            return loader(name)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot load the {what} '{name}': {e}\nPass a Hugging Face model folder "
                             f"(config.json, weights and tokenizer files) or a hub id reachable from this "
                             f"machine.") from None
    tokenizer = load("encoder (--model)", path, load_tokenizer)
    generator_tokenizer = load("generator (--generator_name)", args.generator_name, load_tokenizer)
    encoder_size = load("encoder (--model)", path, AutoConfig.from_pretrained).vocab_size
    generator_size = load("generator (--generator_name)", args.generator_name, AutoConfig.from_pretrained).vocab_size
    if generator_tokenizer.get_vocab() != tokenizer.get_vocab() or generator_size > encoder_size:
        raise SystemExit(
            f"error: the generator {args.generator_name} (tokenizer {len(generator_tokenizer):,} tokens, vocab_size "
            f"{generator_size:,}) does not share the vocabulary of the encoder {path} (tokenizer "
            f"{len(tokenizer):,} tokens, vocab_size {encoder_size:,}); pick a masked-LM generator trained with the "
            f"same tokenizer (e.g. klue/roberta-small for klue/roberta-base)")
    needed = {"dynamic": ("mask_token", "[MASK]"), "static_sep": ("sep_token", "[SEP]")}[args.masking]
    if getattr(tokenizer, needed[0] + "_id") is None:
        raise SystemExit(f"error: --masking {args.masking} needs a {needed[1]} token; the tokenizer of {path} has none")
    return tokenizer


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
    p.add_argument("--model", default="klue/roberta-base",
                   help="encoder checkpoint (the discriminator starts from it too): Hugging Face model id or local "
                        "folder")
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
    add_run_args(p, batch_size=256, epochs=1, lr=5e-5, max_len=64, warmup_ratio=0.05)
    args = finish_args(p, p.parse_args(argv), "kodiffcse")
    if not 0.0 <= args.masking_ratio <= 1.0:
        p.error(f"--masking_ratio {args.masking_ratio} is not a share between 0 and 1")
    return args


# Copied from KoSimCSE/train.py:main
def main(argv=None):
    return exit_on_data_error(lambda: train(parse_args(argv)), DataError)


if __name__ == "__main__":
    main()

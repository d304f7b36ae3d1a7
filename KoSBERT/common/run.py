# Copied from KoSimCSE/common/run.py (whole file; delete this line to own it)
"""One training run from start to end: ``run_stages`` loads everything, then trains the plan's stages with
the method's ``fit`` inside ``Run`` (process group, output-folder lock, resume state, decontamination,
seeds); the run's log and loss window; its one-line exits."""
import json
import os
import shutil

import torch
import torch.distributed as dist

from .checkpoint import (RunLock, check_data_fingerprints, check_output_dir, prepare_output_dir, read_checkpoint,
                         set_seed, truncate_log, write_failed_message)
from .decontaminate import guard
from .dev import DevEvaluator, model_max_len
from .files import one_line_errors
from .stages import autocast_dtype, barrier, setup_distributed, together
from .tokenizer import load_tokenizer


class RunLog:
    """Messages (tqdm-safe, rank 0 only) and the JSON-lines training log (rank 0 only)."""

    def __init__(self, path, rank):
        self.path, self.main, self.file = path, rank == 0, None

    def __call__(self, message):
        if self.main:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def record(self, entry):
        if self.main:
            try:
                if self.file is None:  # opened on first use: the output folder is prepared by then
                    self.file = open(self.path, "a")
                self.file.write(json.dumps(entry) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: the torn line this may leave is dropped by --resume (read_log)
                raise SystemExit(write_failed_message(self.path, e)) from None


    def close(self):
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()
            except OSError:  # its last write already failed (and said so)
                pass


class LossWindow:
    """Sums of the logged values since the last log line, kept on the device (no GPU sync per step)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, values):
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def finite(self):
        """False if any value added since the last pop was NaN or infinite (one sync)."""
        return not self.sums or bool(torch.isfinite(torch.stack(list(self.sums.values()))).all())

    def pop(self):
        means = {k: self.sums[k].item() / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


def load_or_exit(load, path, what="model", flag="--model"):
    """``load(path)``, with a bad model folder or unreachable hub id turned into one clear line naming
    ``what`` was being loaded and the ``flag`` that gave it."""
    try:
        return load(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load {what} '{path}': {' '.join(str(e).split())}; pass {flag} with a "
                         f"Hugging Face model folder (config.json, weights and tokenizer files) or a hub id "
                         f"reachable from this machine") from None


def load_training_tokenizer(model):
    """The tokenizer of --model (evaluation.load_tokenizer), which must have a padding token."""
    tokenizer = load_or_exit(load_tokenizer, model)
    if tokenizer.pad_token_id is None:
        raise SystemExit(f"error: the tokenizer of {model} has no padding token")
    return tokenizer


def nonfinite_loss_exit(step, output_dir, best_dir="best_model"):
    """The one-line stop of a NaN or infinite loss; it names the best model (output_dir/``best_dir``, the
    stage's) and the checkpoint only where they exist."""
    best, checkpoint = os.path.join(output_dir, best_dir), os.path.join(output_dir, "checkpoint")
    kept = ([f"the best model so far is kept in {best}"] if os.path.isdir(best) else []) + (
        [f"the last checkpoint in {checkpoint}"] if os.path.isfile(os.path.join(checkpoint, "state.pt")) else [])
    kept = " and ".join(kept) if kept else "nothing was saved before it (no evaluation or checkpoint yet)"
    return SystemExit(f"error: the loss was not finite (NaN or inf) in the steps up to {step}; stopping, "
                      f"{kept}. Try a lower --lr, or --bf16 instead of --fp16.")


def exit_on_data_error(run, error_type):
    """Call ``run()``; a bad input file (``error_type``) ends the program with its one-line message, any
    other exception with one line and its traceback in a file (files.one_line_errors)."""
    return one_line_errors(run, error_type)


class Run:
    """A training run's process-wide state, as a context manager (``with Run(args, plan) as run``): joins
    torch.distributed (``rank``, ``world``), takes the output folder's lock (rank 0), reads the checkpoint
    of --resume (``state``) or checks that --output_dir may be used -- before anything is loaded, so a bad
    folder fails at once --, seeds the RNGs per rank and opens the log (``log``). ``start`` prepares the
    output folder once every input has loaded, so a failed start costs an earlier run nothing; leaving
    the block closes the log and releases the lock."""

    def __init__(self, args, plan):
        self.args, self.plan = args, plan

    def __enter__(self):
        args = self.args
        self.rank, self.world = setup_distributed(args)
        self.lock = None

        def open_run():
            if self.rank == 0:
                self.lock = RunLock(args.output_dir)  # one live run per output folder
            stage_dirs = [s.best_dir for s in self.plan]
            self.state = read_checkpoint(args.output_dir, stage_dirs) if args.resume else None
            if self.state is None:
                check_output_dir(args, stage_dirs)
            # training data that is evaluation data: reported, then kept, dropped or refused (--decontaminate)
            guard(args, self.training_sources(), self.rank, print)

        try:
            # a stop on one rank (a held lock, drop leaving nothing: rank 0 only) stops every rank; with drop,
            # rank 0 has written the filtered copies when this returns
            together(self.world, open_run)
            # the data a resumed run trains on must be the data it started with (every rank: all stop alike)
            check_data_fingerprints(args, self.training_sources(), self.state is not None)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        set_seed(args.seed + self.rank)  # per-rank dropout masks
        self.log = RunLog(os.path.join(args.output_dir, "train_log.jsonl"), self.rank)  # opened at its first record
        return self

    def training_sources(self):
        """The names of every training file the run reads (decontaminate.SOURCE_FLAGS): the stages' sources, and
        "anchor" where a KoSBERT run keeps its embeddings of --anchor_file near the starting model's."""
        return [n for s in self.plan for n in s.sources] + (["anchor"] if getattr(self.args, "anchor_file", None) else [])

    def start(self, tokenizer, encoder):
        """Every input has loaded: build the dev evaluator (rank 0; None elsewhere), then prepare the output
        folder (a new run) or cut its log back to the checkpoint (a resumed one)."""
        args = self.args
        args.eval_max_len = model_max_len(tokenizer, encoder)  # dev sentences and saved models: never cut short
        pairs = str(getattr(args, "mode", "")).startswith("pairs")  # the modes that read --passage_max_len
        flags = ["max_len"] + ["passage_max_len"] * pairs + ["anchor_max_len"] * bool(getattr(args, "anchor_file", None))
        for flag in flags:  # beyond the model's position table: a crash at the first long text
            if getattr(args, flag) > args.eval_max_len:
                raise SystemExit(f"error: --{flag} {getattr(args, flag)}: {args.model} takes at most "
                                 f"{args.eval_max_len} tokens; give at most that")
        return together(self.world, lambda: self._start_rank0(tokenizer))  # nobody starts before rank 0's set-up

    def _start_rank0(self, tokenizer):
        """Rank 0's share of ``start`` (the dev evaluator, the output folder); None on the other ranks."""
        args, evaluate = self.args, None
        if self.rank == 0:
            evaluate = DevEvaluator(args.dev_file, args.data_dir, tokenizer, args.eval_max_len, args.eval_batch_size,
                                    args.device, autocast_dtype(args), args.dev_protocol, args.batch_size, args.seed,
                                    self.log, prefix=args.query_prefix)
            if self.state is not None:
                truncate_log(self.log.path, [s.name for s in self.plan], self.state["stage"], self.state["step"])
            else:
                prepare_output_dir(args, extra=[s.best_dir for s in self.plan])
        return evaluate

    def remaining_stages(self):
        """(stage, the checkpoint state to resume it from or None) for every stage left to run: a resumed
        run restarts in the stage and at the step of its checkpoint."""
        first = [s.name for s in self.plan].index(self.state["stage"]) if self.state is not None else 0
        for i, stage in enumerate(self.plan[first:]):
            yield stage, self.state if i == 0 else None

    def __exit__(self, error_type, error, traceback):
        checkpoint = os.path.join(self.args.output_dir, "checkpoint")
        if error_type is None and self.rank == 0 and not self.args.keep_checkpoint and os.path.isdir(checkpoint):
            shutil.rmtree(checkpoint)  # the run is finished: its work is in best_model/, --resume has nothing left
            self.log(f"removed {checkpoint} (the run has finished; --keep_checkpoint keeps it)")
        self.log.close()
        if self.world > 1 and error_type is None:
            dist.destroy_process_group()
        if self.lock is not None:
            self.lock.release()
        return False


def run_stages(args, plan, load_model, build_source, fit):
    """Load everything, then train the stages of ``plan`` one after the other with the method's ``fit``; a
    resumed run restarts in the stage and at the step of its checkpoint. The output folder is touched only
    once the model, tokenizer and data have loaded (see Run). ``load_model(args, path, stage name)`` ->
    (encoder, trainable); ``build_source(name, args, tokenizer, rank, world, log)`` -> Source. Returns the
    last stage's best dev score."""
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

# Copied from KoSimCSE/common/run_utils.py (whole file; delete this line to own it)
"""Run plumbing of a training script: flags and presets, the output folder, atomic saves, checkpoints
and --resume, RNG state, torch.distributed setup, the optimizer, the training log and the dev evaluator.

Nothing here is specific to one method.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from transformers import get_linear_schedule_with_warmup

from .data import DEFAULT_DATA_DIR, TokenizedTexts, read_sts, resolve_path
from .decontaminate import MODES as DECONTAMINATE_MODES, SOURCE_FLAGS, guard
from .encoding import encode_tokenized, update_st_config
from .files import FolderLock, check_device, one_line_errors, save_atomic, save_json_atomic
from .model_card import write_model_card
from .sts import bmk_metrics, sts_metrics
from .tokenizer import load_tokenizer

RESUME_MAY_CHANGE = ("device", "num_workers", "keep_checkpoint")  # flags --resume lets differ from args.json
RUN_FILES = ("args.json", "train_log.jsonl", "best_model", "checkpoint")
METHOD = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the method folder's name

@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of a run, built with keywords: ``Stage(name="sts", sources=("sts",), epochs=4,
    start_from="nli_model")``."""
    name: str  # logged with every record; a resumed run restarts in the stage of its checkpoint
    sources: tuple  # the names of its training sources (see the folder's build_source)
    epochs: int
    best_dir: str = "best_model"  # the folder under --output_dir its best model goes to
    start_from: str = None  # the best_dir of an earlier stage it starts from (None: --model)
    lr: float = None  # its learning rate (None: --lr)
    schedule: str = "proportional"  # how its sources share the steps (``interleave``'s rule): "proportional",
    #                                 one optimizer; "paired", one optimizer and schedule per source


# --- flags and presets ------------------------------------------------------------------------------

class PresetParser(argparse.ArgumentParser):
    """argparse with preset files: ``train.py @presets/NAME.args --lr 1e-5`` reads the file's flags as if
    typed in its place (later flags win). A preset holds any number of flags per line, split as a shell
    would (quote a value with spaces: --query_prefix "query: "); ``#`` starts a comment. Every flag's default
    is shown in --help."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars="@", formatter_class=HelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self.argv = list(sys.argv[1:] if args is None else args)  # the last one parsed: see explicit_flags
        return super().parse_known_args(args, namespace)

    def convert_arg_line_to_args(self, line):
        try:
            return shlex.split(line, comments=True)
        except ValueError as e:  # an unclosed quote
            self.error(f"a preset line cannot be read ({e}): {line.strip()}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring verbatim, and "(default: ...)" after every flag whose help does not say it."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


def parse_with_mode_preset(p, argv, presets_dir, mode_presets):
    """Parse ``argv`` with the defaults of its --mode's preset file (``mode_presets[mode]`` in
    ``presets_dir``), so that --help shows the values a run of that mode really starts from."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = PresetParser(add_help=False)
    pre.add_argument("--mode", default=p.get_default("mode"))
    mode = pre.parse_known_args(argv)[0].mode
    if mode in mode_presets:
        p.set_defaults(**vars(p.parse_args(["@" + os.path.join(presets_dir, mode_presets[mode])])))
    return p.parse_args(argv)


def add_run_args(p, **defaults):
    """The flags every method's train.py takes; ``defaults`` sets the method's own defaults."""
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="data folder")
    p.add_argument("--dev_file", default="korsts-dev", help="STS set for checkpoint selection")
    p.add_argument("--decontaminate", choices=DECONTAMINATE_MODES, default="warn",
                   help="training sentences found in an evaluation set under --data_dir (see common/decontaminate.py): "
                        "warn = report and train as given (published recipes), drop = train without those rows, "
                        "fail = stop")
    p.add_argument("--output_dir", default=None,
                   help="where the run is written (default: a folder under output/ named after the method and mode)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="allow writing over an earlier run")
    p.add_argument("--resume", default=None, metavar="OUTPUT_DIR",
                   help="continue the interrupted run in OUTPUT_DIR from its last checkpoint, with the arguments "
                        "and training data it was started with: other flags given with it must equal the recorded "
                        "ones, except %s, which may change; a training file changed since the start is refused"
                        % ", ".join("--" + f for f in RESUME_MAY_CHANGE))
    p.add_argument("--query_prefix", default="",
                   help='prompt before every training and dev sentence of the symmetric tasks (NLI, STS, wiki '
                        'sentences; e5: "query: "), recorded as the saved folder\'s "query" prompt, which '
                        'evaluation.py and SentenceTransformer.encode(prompt_name="query") then apply')
    p.add_argument("--passage_prefix", default="",
                   help='recorded as the saved folder\'s "passage" prompt (e5: "passage: "), which evaluation.py '
                        'puts before corpus texts (retrieval, search, index)')
    p.add_argument("--batch_size", type=int, default=64, help="global batch (all processes together)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (AdamW, linear decay)")
    p.add_argument("--warmup_ratio", type=float, default=0.0, help="linear warmup over this fraction of the steps")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW; biases and LayerNorm weights get none")
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="gradient clipping; 0 = off")
    p.add_argument("--max_len", type=int, default=64,
                   help="max tokens per training sentence, special tokens included; longer ones are truncated "
                        "and counted")
    p.add_argument("--bucket_tokens", type=int, default=None,
                   help="encode each training batch in length buckets of at least N padded tokens, each padded "
                        "only to its own longest sentence (same result, far less padding); 0 = one pass over the "
                        "batch padded to its longest sentence (default: 512 on CPU, 8192 on GPU)")
    p.add_argument("--eval_steps", type=int, default=125, help="evaluate on --dev_file every N steps and at the end")
    p.add_argument("--eval_each_epoch", action=argparse.BooleanOptionalAction, default=False,
                   help="also evaluate (and checkpoint) at the end of every epoch, as sentence-transformers' fit")
    p.add_argument("--save_steps", type=int, default=None,
                   help="write output_dir/checkpoint (for --resume) every N steps and whenever it evaluates "
                        "(default: --eval_steps)")
    p.add_argument("--keep_checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="keep output_dir/checkpoint (weights + optimizer state, about 3x the model) once the run "
                        "has finished; by default it is removed then, as only --resume of an unfinished run reads it")
    p.add_argument("--dev_protocol", choices=("standard", "bmk"), default="standard",
                   help="checkpoint selection by the max of the 4 dev Spearman values over the whole set "
                        "(standard), or its mean over shuffled dev batches of --batch_size pairs (bmk, as BM-K)")
    p.add_argument("--early_stop_evals", type=int, default=0,
                   help="end a stage once N evaluations in a row have not beaten its best dev score (BM-K's "
                        "patience); 0 = never")
    p.add_argument("--eval_batch_size", type=int, default=128, help="sentences per batch at evaluation")
    p.add_argument("--logging_steps", type=int, default=10, help="log the mean losses of every N steps")
    p.add_argument("--max_train_samples", type=int, default=None, help="seeded random subset of each training set")
    p.add_argument("--seed", type=int, default=42, help="seeds the model head init, dropout and the data order")
    p.add_argument("--fp16", action="store_true", help="float16 autocast + gradient scaling (CUDA)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(**defaults)


def explicit_flags(p, argv):
    """The destinations of the flags ``argv`` gives (a preset file's count as given), with their values."""
    defaults, parser_defaults = {a: a.default for a in p._actions}, p._defaults
    try:
        for a in p._actions:
            a.default = argparse.SUPPRESS
        p._defaults = {}
        return vars(p.parse_known_args(argv)[0])
    finally:
        for a, default in defaults.items():
            a.default = default
        p._defaults = parser_defaults


def finish_args(p, args, default_output_dir):
    """Checks and derived values after parsing; with --resume, the arguments the run was started with
    (flags given with it must equal them, except RESUME_MAY_CHANGE)."""
    if args.resume:
        saved = os.path.join(args.resume, "args.json")
        if not os.path.isfile(saved):
            p.error(f"--resume {args.resume}: no args.json there, so no run to resume")
        try:
            with open(saved, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--resume {args.resume}: cannot read {saved} ({e})")
        given = explicit_flags(p, p.argv)
        changed = [k for k, v in given.items() if k not in ("resume", *RESUME_MAY_CHANGE)
                   and json.loads(json.dumps(v)) != recorded.get(k)]
        if "output_dir" in changed and os.path.realpath(given["output_dir"]) == os.path.realpath(args.resume):
            changed.remove("output_dir")
        if changed:
            p.error(f"--resume {args.resume}: " + ", ".join(f"--{k} {given[k]!r} (was {recorded[k]!r})"
                                                            if k in recorded else f"--{k}" for k in changed)
                    + " differ from the run's recorded flags; only " + ", ".join("--" + f for f in RESUME_MAY_CHANGE)
                    + " may change on --resume (start a new run to change the others)")
        for key, value in recorded.items():
            if key not in ("device", "num_workers", "resume") and not (key in given and key in RESUME_MAY_CHANGE):
                setattr(args, key, value)
        args.output_dir = args.resume
        check_device(p, args.device)
        return args
    if args.bucket_tokens is None:
        args.bucket_tokens = 512 if args.device == "cpu" else 8192
    args.output_dir = args.output_dir or os.path.join("output", default_output_dir)
    if args.save_steps is None:
        args.save_steps = args.eval_steps
    if args.fp16 and args.bf16:
        p.error("--fp16 and --bf16 are exclusive")
    if args.fp16 and not args.device.startswith("cuda"):
        p.error("--fp16 needs a CUDA device (use --bf16 on CPU)")
    for name in ("eval_steps", "save_steps", "logging_steps", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    check_run_args(p, args)
    return args


def check_run_args(p, args):
    """The flag values no run can use, refused with parser.error (one line, exit 2) before anything loads.
    Shared by every train.py (through finish_args); flags a folder lacks are passed over."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output_dir {args.output_dir}: is a file, not a folder")
    for name in ("lr", "sts_lr", "temperature"):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name} {value}: must be a positive number")
    least = {"max_len": 2, "eval_batch_size": 1, "sts_batch_size": 1, "max_train_samples": 1}
    for name, bound in least.items():
        value = getattr(args, name, None)
        if value is not None and value < bound:
            p.error(f"--{name} {value}: must be at least {bound}")
    for name in ("weight_decay", "max_grad_norm", "num_workers", "mini_batch_size", "bucket_tokens"):
        value = getattr(args, name, None)
        if value is not None and not value >= 0:
            p.error(f"--{name} {value}: must not be negative")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        p.error(f"--warmup_ratio {args.warmup_ratio}: must be between 0 and 1")
    if args.max_steps <= 0:
        for name in ("epochs", "nli_epochs", "sts_epochs"):
            value = getattr(args, name, None)
            if value is not None and value <= 0:
                p.error(f"--{name} {value} with no --max_steps: nothing would be trained (give a positive "
                        f"--{name} or --max_steps)")
    if hasattr(args, "temperature") and args.batch_size < 2:  # contrastive (InfoNCE) training
        p.error(f"--batch_size {args.batch_size}: contrastive training needs at least 2 examples per batch (with "
                f"one, the InfoNCE loss is exactly 0 and nothing trains)")
    check_device(p, args.device)


# --- the training data a run started with -------------------------------------------------------------

def file_fingerprint(path):
    """{"size", "sha256"} of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def check_data_fingerprints(args, source_names, resumed):
    """Fingerprint the training files of ``source_names`` (the files the run reads: with --decontaminate drop,
    its filtered copies). A new run records them as ``args.data_fingerprints`` (args.json); a resumed one
    refuses, in one line, a file that is missing or differs from its recorded fingerprint (a run started
    before fingerprints were recorded is not checked)."""
    prints = {}
    for flag in dict.fromkeys(SOURCE_FLAGS[n] for n in source_names if n in SOURCE_FLAGS):
        value = getattr(args, flag, None)
        for name in ([value] if isinstance(value, str) else value or []):
            path = resolve_path(name, args.data_dir)
            prints[path] = file_fingerprint(path) if os.path.isfile(path) else None
    if not resumed:
        args.data_fingerprints = prints
        return
    for path, recorded in (getattr(args, "data_fingerprints", None) or {}).items():
        now = prints.get(path)
        if now != recorded:
            what = ("is missing" if now is None else f"has changed since the run started ({recorded['size']:,} -> "
                    f"{now['size']:,} bytes)" if now["size"] != recorded["size"] else
                    "has changed since the run started (same size, different content)")
            raise SystemExit(f"error: --resume {args.output_dir}: the training file {path} {what}; restore it, or "
                             f"start a new run to train on the new data")


# --- the output folder ------------------------------------------------------------------------------

def recover_interrupted_save(output_dir, stage_dirs=()):
    """Undo what a kill in the middle of save_atomically left in best_model/, checkpoint/ and the run's
    ``stage_dirs`` (its stages' best-model folders): NAME.old and no NAME (killed between its two
    renames) -> NAME again; a leftover NAME.tmp (killed while writing) or NAME.old (killed before the
    clean-up) beside a complete NAME -> removed."""
    for name in dict.fromkeys(("best_model", "checkpoint", *stage_dirs)):
        path = os.path.join(output_dir, name)
        if not os.path.isdir(path) and os.path.isdir(path + ".old"):
            os.replace(path + ".old", path)
        for leftover in (path + ".tmp", path + ".old"):
            if os.path.isdir(path) and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


class RunLock(FolderLock):
    """An exclusive lock on an output folder (output_dir/.lock, see files.FolderLock): a second run on a
    folder that a live run holds is refused."""

    def __init__(self, output_dir):
        super().__init__(output_dir, lambda holder: f"error: {output_dir} is in use by a running training (pid "
                                                    f"{holder}); wait for it to finish or choose another --output_dir")


def check_output_dir(args, stage_dirs=()):
    """Refuse to mix two runs in one folder unless --overwrite_output_dir."""
    recover_interrupted_save(args.output_dir, stage_dirs)
    earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(args.output_dir, f))]
    if earlier and not args.overwrite_output_dir:
        raise SystemExit(f"error: {args.output_dir} already holds a run ({', '.join(earlier)}); pass "
                         f"--overwrite_output_dir to replace it, --resume {args.output_dir} to continue it, "
                         f"or choose another --output_dir")


def prepare_output_dir(args, extra=()):
    """Clear an earlier run (only once the new one's inputs have loaded) and record the arguments."""
    for stale in ("best_model", "checkpoint", "train_log.jsonl", *extra):
        path = os.path.join(args.output_dir, stale)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k not in ("resume", "decontamination")}, f, indent=2,
                  ensure_ascii=False)


def write_error(error):
    """The OSError (or safetensors' SafetensorError) behind ``error``, or None. On a full disk torch.save
    raises the OSError of its file object's write, then replaces it with a RuntimeError of its zip writer
    while closing; the OSError is that RuntimeError's __context__."""
    while error is not None:
        if isinstance(error, (OSError, SafetensorError)):
            return error
        error = error.__cause__ or error.__context__
    return None


def write_failed_message(path, failed, kept="nothing was lost"):
    """The one line of a failed write of ``path`` (a file or folder in an output folder): what, why, and how
    to continue (--resume when the folder has a checkpoint, else run again)."""
    reason = failed.strerror if isinstance(failed, OSError) and failed.strerror else str(failed)
    out = os.path.dirname(path) or "."
    then = (f"continue with --resume {out}" if os.path.isfile(os.path.join(out, "checkpoint", "state.pt"))
            else "run it again")
    return f"error: could not write {path}: {reason}; {kept}. Free some space, then {then}"


def save_atomically(save, final_dir):
    """save(tmp_dir), then swap it into place, so a kill never leaves a half-written final_dir (see
    recover_interrupted_save). A save that fails (a full disk, say) leaves final_dir as it was and stops
    the run with one line."""
    tmp, old = final_dir + ".tmp", final_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
    except Exception as e:
        failed = write_error(e)
        if failed is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {os.path.basename(final_dir)} is intact" if os.path.isdir(final_dir) else "nothing was lost"
        raise SystemExit(write_failed_message(final_dir, failed, kept)) from None
    if os.path.isdir(final_dir):
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    shutil.rmtree(old, ignore_errors=True)


# --- checkpoints and RNG ----------------------------------------------------------------------------

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def save_checkpoint(path, model, optimizer, scheduler, scaler, step, best_score, **extra):
    """Everything --resume needs, written atomically: weights, optimizer, schedule, loss scale,
    the step (which fixes the data position through BatchPlan), the best dev score, RNG states,
    and any ``extra`` entries of the caller's."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "best_score": best_score,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, **extra}

    def write(folder):
        os.makedirs(folder)
        with open(os.path.join(folder, "state.pt"), "wb") as f:  # a file object: a full disk raises an OSError
            torch.save(state, f)                                  # (given a path, only torch's RuntimeError)
    save_atomically(write, path)


def read_checkpoint(output_dir, stage_dirs=()):
    """The state dict of output_dir/checkpoint/state.pt (see save_checkpoint)."""
    recover_interrupted_save(output_dir, stage_dirs)
    path = os.path.join(output_dir, "checkpoint", "state.pt")
    if not os.path.isfile(path):
        finished = (" (a run removes its checkpoint once it has finished, unless --keep_checkpoint; its model is "
                    "in best_model/)" if os.path.isdir(os.path.join(output_dir, "best_model")) else "")
        raise SystemExit(f"error: --resume {output_dir}: no checkpoint/state.pt there to resume from{finished}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "step", "best_score", "rng") if k not in state]
    except Exception as e:  # a truncated or overwritten file fails in many ways (zip, pickle, EOF)
        raise SystemExit(f"error: {path} is truncated or corrupt ({type(e).__name__}: {e}); it cannot be resumed "
                         f"from. Restore the file, or start again with --overwrite_output_dir") from None
    if missing:
        raise SystemExit(f"error: {path} is not a checkpoint of this toolkit (no {', '.join(missing)})")
    return state


def load_checkpoint(state, model, optimizer, scheduler, scaler):
    """Put a read_checkpoint state back into the live objects; returns (step, best dev score)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return state["step"], state["best_score"]


class PerSource(list):
    """The optimizers (or schedules) of a stage: one shared by every source, or one per source (a "paired"
    stage); ``of(i)`` is source i's. Saved and restored as one: a single one as its own state dict."""

    def of(self, i):
        return self[i if len(self) > 1 else 0]

    def state_dict(self):
        return self[0].state_dict() if len(self) == 1 else [x.state_dict() for x in self]

    def load_state_dict(self, state):
        for x, s in zip(self, [state] if len(self) == 1 else state):
            x.load_state_dict(s)


def start_stage(args, stage, trainable, schedule, total_steps, state, rank, log):
    """The optimizers (build_optimizer), linear warmup-then-decay schedules and the fp16 loss scaler of one
    stage, put back to ``state`` (a checkpoint of this stage, or None) with rank 0's RNG state. A "paired"
    stage gives every source its own optimizer and schedule over that source's own steps, as
    sentence-transformers' fit does for each objective. Returns (optimizers, schedulers (PerSource), scaler,
    step, best dev score)."""
    scaler = torch.amp.GradScaler("cuda", enabled=args.fp16)
    full, rest = divmod(total_steps, len(schedule))
    steps = ([full * schedule.count(i) + schedule[:rest].count(i) for i in range(len(stage.sources))]
             if stage.schedule == "paired" else [total_steps])
    optimizer = PerSource(build_optimizer(trainable, stage.lr or args.lr, args.weight_decay) for _ in steps)
    scheduler = PerSource(get_linear_schedule_with_warmup(o, int(args.warmup_ratio * n), n)
                          for o, n in zip(optimizer, steps))
    if state is None:
        return optimizer, scheduler, scaler, 0, -math.inf
    step, best_score = load_checkpoint(state, trainable, optimizer, scheduler, scaler)
    if rank == 0:
        restore_rng(state["rng"])
    else:  # only rank 0's RNG state is saved; the others get fresh (seeded) dropout masks
        torch.manual_seed(args.seed + rank + step)
    log(f"[{stage.name}] resuming {args.output_dir} at step {step:,} (best dev {best_score_text(best_score)})")
    return optimizer, scheduler, scaler, step, best_score


def restore_rng(rng):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def read_log(path):
    """The entries of a train_log.jsonl. Its last line is dropped when torn (no newline, or not JSON): a
    kill, a power loss or a full disk in the middle of an append leaves one. A bad line before the last is
    an error naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    entries, last = [], len(lines) - 1  # after the final newline: b"" for a whole log, a torn tail otherwise
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if number >= last:  # the last line, or the only one after it: a torn append
                break
            raise SystemExit(f"error: {path}:{number}: not a log entry (the file was edited or damaged); "
                             f"restore it or delete the line, then --resume again") from None
        if number > last:  # a whole entry without its newline: still torn (the write may have stopped there)
            break
        entries.append((line.decode("utf-8") + "\n", entry))
    return entries


def truncate_log(path, stages, stage, step):
    """Drop the log lines written after the checkpoint (``stage``, ``step``) a resumed run restarts from,
    and a torn last line (read_log); rewritten atomically."""
    if os.path.exists(path):
        position = (stages.index(stage), step)
        kept = [line for line, e in read_log(path) if (stages.index(e["stage"]), e["step"]) <= position]
        try:
            save_atomic(path, lambda f: f.write("".join(kept).encode("utf-8")))
        except OSError as e:
            raise SystemExit(write_failed_message(path, e, "the log is as it was")) from None


# --- distributed, optimizer, logging ----------------------------------------------------------------

def setup_distributed(args):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs,
    gloo on CPU; each process drives one GPU (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


class Source:
    """One training set of a stage: its name (what training_step is told), dataset, BatchPlan, collator,
    and the data files it was read from (for the model card)."""

    def __init__(self, name, dataset, plan, collate, files=()):
        self.name, self.dataset, self.plan, self.collate, self.files = name, dataset, plan, collate, list(files)

    def loader(self, epoch, start_batch, num_workers=0, pin_memory=False):
        """The batches of ``epoch`` from ``start_batch`` on, in BatchPlan's order."""
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=list(self.plan.batches(epoch, start_batch)), collate_fn=self.collate,
            num_workers=num_workers, pin_memory=pin_memory,
            generator=torch.Generator())  # its own generator: the global RNG stays untouched


def interleave(sizes, rule="proportional"):
    """The source index of every step of one epoch, given each source's batches per pass.
    proportional: round-robin where each step takes the source with the smallest (done + 1) / size; ties go
    to the earlier source, so a smaller source is spread evenly through a larger one, and an epoch is one
    pass over every source. With one source this is simply its batches in order.
    paired: sentence-transformers' fit with several objectives (jhgan's multitask recipe): min(sizes)
    rounds of one batch of each source in order, so an epoch is one pass over the smallest source; the
    others carry on where they stopped in the next epoch (see stage_batches)."""
    if rule == "paired":
        return [i for _ in range(min(sizes)) for i in range(len(sizes))]
    done, order = [0] * len(sizes), []
    for _ in range(sum(sizes)):
        i = min((k for k in range(len(sizes)) if done[k] < sizes[k]), key=lambda k: ((done[k] + 1) / sizes[k], k))
        done[i] += 1
        order.append(i)
    return order


def stage_batches(sources, schedule, step, total_steps, num_workers=0, pin_memory=False):
    """(epoch, source, batch) for every step from ``step`` to ``total_steps``: epoch after epoch, each
    taking the sources' batches in the order of ``schedule`` (see interleave). A source reads its batches
    pass after pass (its pass k is BatchPlan epoch k), across the stage's epochs: a proportional epoch is
    one pass of every source; in a paired one the longer sources carry on where they stopped, as
    sentence-transformers' fit keeps their iterators. Where each source stands follows from ``step``."""
    epoch, offset = divmod(step, len(schedule))
    taken = [epoch * schedule.count(i) + schedule[:offset].count(i) for i in range(len(sources))]
    loaders = [None] * len(sources)
    while step < total_steps:
        for index in schedule[offset:]:
            if step >= total_steps:
                return
            turn, position = divmod(taken[index], len(sources[index].plan))
            if loaders[index] is None or position == 0:
                loaders[index] = iter(sources[index].loader(turn, position, num_workers, pin_memory))
            yield epoch, sources[index], next(loaders[index])
            taken[index] += 1
            step += 1
        epoch, offset = epoch + 1, 0


def barrier(world):
    if world > 1:
        dist.barrier()


def wrap_ddp(trainable, world, several_sources):
    """``trainable`` in DistributedDataParallel under torchrun (itself in one process). With several sources,
    parameters idle on one source's batches (KoSBERT's classifier) must not be waited for."""
    if world == 1:
        return trainable
    return torch.nn.parallel.DistributedDataParallel(trainable, find_unused_parameters=several_sources)


def autocast_dtype(args):
    """The mixed-precision dtype of --fp16 / --bf16, or None (full precision)."""
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None


def describe_stage(args, stage, sources, world, total_steps, steps_per_epoch):
    sizes = ", ".join(f"{s.name} {len(s.dataset):,} examples / {len(s.plan):,} batches" for s in sources)
    return (f"[{stage.name}] {sizes}; batch {args.batch_size}"
            + (f" ({world} processes x {sources[0].plan.local_batch})" if world > 1 else "")
            + f", {total_steps:,} steps ({steps_per_epoch:,} per epoch), eval every {args.eval_steps} on {args.dev_file}")


def build_optimizer(model, lr, weight_decay):
    """AdamW; no weight decay on biases and LayerNorm weights. Fused (one kernel for all parameters):
    much faster than the default on CPU for a large embedding table."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)


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


def model_max_len(tokenizer, model):
    """The longest input ``model`` takes (its position table, its tokenizer's limit, else 512): evaluation
    and saved models use it, so that no benchmark sentence is cut because training used a short --max_len."""
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    limits = [tokenizer.model_max_length] if 0 < tokenizer.model_max_length < 100_000 else []
    positions = getattr(config, "max_position_embeddings", None)
    if positions:  # RoBERTa-style position ids start after the padding index
        offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(positions - offset)
    return min(limits) if limits else 512


class DevEvaluator:
    """The 8 metrics of the live model on one STS set (--dev_file), tokenised once and never truncated
    below the model's own limit; ``protocol`` "bmk" averages them over shuffled batches of ``bmk_batch``
    pairs (BM-K's selection score), "standard" computes them over the whole set."""

    def __init__(self, dev_file, data_dir, tokenizer, max_len, batch_size, device, amp_dtype, protocol="standard",
                 bmk_batch=256, seed=42, log=print, prefix=""):
        path = resolve_path(dev_file, data_dir)
        self.pairs = read_sts(path)
        self.tokenized = TokenizedTexts(tokenizer, [p[0] for p in self.pairs] + [p[1] for p in self.pairs], max_len,
                                        prefix=prefix)
        log(f"{path}: {len(self.pairs):,} dev pairs, {self.tokenized.num_truncated} of {len(self.tokenized):,} "
            f"sentences truncated at {max_len} tokens")
        self.gold = np.array([p[2] for p in self.pairs])
        self.pad_id, self.batch_size, self.device, self.amp_dtype = tokenizer.pad_token_id, batch_size, device, amp_dtype
        self.protocol, self.bmk_batch, self.seed = protocol, bmk_batch, seed

    def __call__(self, model):
        model.eval()
        emb = encode_tokenized(model, self.tokenized, self.pad_id, self.batch_size, self.device,
                               amp_dtype=self.amp_dtype)
        model.train()
        n = len(self.pairs)
        if self.protocol == "bmk":
            return bmk_metrics(emb[:n], emb[n:], self.gold, self.bmk_batch, self.seed)
        return sts_metrics(emb[:n], emb[n:], self.gold)


def load_or_exit(load, path, what="model", flag="--model"):
    """``load(path)``, with a bad model folder or unreachable hub id turned into one clear line naming
    ``what`` was being loaded and the ``flag`` that gave it."""
    try:
        return load(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load {what} '{path}': {' '.join(str(e).split())}; pass {flag} with a "
                         f"Hugging Face model folder (config.json, weights and tokenizer files) or a hub id "
                         f"reachable from this machine") from None


def training_command(args):
    """The command line that reproduces a run (every flag of args.json, defaults included)."""
    skip = ("resume", "data_fingerprints", "eval_max_len", "output_dir", "overwrite_output_dir", "device", "num_workers", "decontamination")
    parts = [f"python {METHOD}/train.py"]
    for key, value in vars(args).items():
        if key in skip or value is None or value is False or value == "":
            continue
        flag = f"--{key}"
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} " + " ".join(shlex.quote(str(v)) for v in value))
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " \\\n    ".join(parts)


def write_training_info(folder, args, stage, step, dev_metrics, files):
    """best_model/training.json: what the model card says about training (method, base model, data files,
    command, the dev score it was selected by)."""
    info = {"method": METHOD, "mode": getattr(args, "mode", None), "stage": stage, "step": step,
            "base_model": args.model, "train_files": files, "dev_file": args.dev_file,
            "dev_protocol": args.dev_protocol, "dev_metrics": dev_metrics, "command": training_command(args),
            "decontamination": getattr(args, "decontamination", None)}
    with open(os.path.join(folder, "training.json"), "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)


def cap_saved_tokenizer(folder, max_len):
    """Set the saved tokenizer's model_max_length to the model's ``max_len`` (its max_seq_length): the source's
    may say 4096 or 1e30, and then ``tokenizer(text, truncation=True)`` in plain transformers (the model
    card's usage code) would not stop where the position table ends."""
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["model_max_length"] = int(max_len)
        save_json_atomic(path, config)


def save_model(encoder, folder, tokenizer, args, stage, step, dev_metrics, files=()):
    """The encoder as a Hugging Face + sentence-transformers folder (max_seq_length: the model's own limit),
    with training.json and a model card (evaluation.write_model_card) that carries the dev row it was
    selected by; ``files``: the training data files, for the card."""
    encoder.save(folder, tokenizer, args.eval_max_len)
    cap_saved_tokenizer(folder, args.eval_max_len)
    prompts = {name: prefix for name, prefix in (("query", args.query_prefix), ("passage", args.passage_prefix))
               if prefix}
    if prompts:  # trained with them: evaluation.py and SentenceTransformer.encode(prompt_name=...) apply them
        update_st_config(folder, prompts=prompts, default_prompt_name=None)
    write_training_info(folder, args, stage, step, dev_metrics, list(files))
    dev_row = {"dataset": args.dev_file, "protocol": args.dev_protocol, "metrics": dev_metrics} if dev_metrics else None
    write_model_card(folder, [dev_row] if dev_row else [])


def nonfinite_loss_exit(step, output_dir, best_dir="best_model"):
    """The one-line stop of a NaN or infinite loss; it names the best model (output_dir/``best_dir``, the
    stage's) and the checkpoint only where they exist."""
    best, checkpoint = os.path.join(output_dir, best_dir), os.path.join(output_dir, "checkpoint")
    kept = ([f"the best model so far is kept in {best}"] if os.path.isdir(best) else []) + (
        [f"the last checkpoint in {checkpoint}"] if os.path.isfile(os.path.join(checkpoint, "state.pt")) else [])
    kept = " and ".join(kept) if kept else "nothing was saved before it (no evaluation or checkpoint yet)"
    return SystemExit(f"error: the loss was not finite (NaN or inf) in the steps up to {step}; stopping, "
                      f"{kept}. Try a lower --lr, or --bf16 instead of --fp16.")


def best_score_text(score):
    return "none yet" if score == -math.inf else f"{score:.2f}"


def exit_on_data_error(run, error_type):
    """Call ``run()``; a bad input file (``error_type``) ends the program with its one-line message, any
    other exception with one line and its traceback in a file (files.one_line_errors)."""
    return one_line_errors(run, error_type)


# --- one run: its process state, the best model of a stage ---------------------------------------------

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
        self.lock = RunLock(args.output_dir) if self.rank == 0 else None  # one live run per output folder
        try:
            stage_dirs = [s.best_dir for s in self.plan]
            self.state = read_checkpoint(args.output_dir, stage_dirs) if args.resume else None
            if self.state is None:
                check_output_dir(args, stage_dirs)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        try:  # training data that is evaluation data: reported, then kept, dropped or refused (--decontaminate)
            guard(args, [n for s in self.plan for n in s.sources], self.rank, print)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        barrier(self.world)  # with drop, rank 0 has written the filtered copies
        try:  # the data a resumed run trains on must be the data it started with (every rank: all stop alike)
            check_data_fingerprints(args, [n for s in self.plan for n in s.sources], self.state is not None)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        set_seed(args.seed + self.rank)  # per-rank dropout masks
        self.log = RunLog(os.path.join(args.output_dir, "train_log.jsonl"), self.rank)  # opened at its first record
        return self

    def start(self, tokenizer, encoder):
        """Every input has loaded: build the dev evaluator (rank 0; None elsewhere), then prepare the output
        folder (a new run) or cut its log back to the checkpoint (a resumed one)."""
        args = self.args
        args.eval_max_len = model_max_len(tokenizer, encoder)  # dev sentences and saved models: never cut short
        evaluate = None
        if self.rank == 0:
            evaluate = DevEvaluator(args.dev_file, args.data_dir, tokenizer, args.eval_max_len, args.eval_batch_size,
                                    args.device, autocast_dtype(args), args.dev_protocol, args.batch_size, args.seed,
                                    self.log, prefix=args.query_prefix)
            if self.state is not None:
                truncate_log(self.log.path, [s.name for s in self.plan], self.state["stage"], self.state["step"])
            else:
                prepare_output_dir(args, extra=[s.best_dir for s in self.plan])
        barrier(self.world)  # nobody starts before rank 0 has set up (or truncated) the output folder
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


def load_training_tokenizer(model):
    """The tokenizer of --model (evaluation.load_tokenizer), which must have a padding token."""
    tokenizer = load_or_exit(load_tokenizer, model)
    if tokenizer.pad_token_id is None:
        raise SystemExit(f"error: the tokenizer of {model} has no padding token")
    return tokenizer


class BestModel:
    """The best dev model of one stage, kept by rank 0 in output_dir/<stage.best_dir> (a no-op elsewhere).
    ``evaluate`` logs the dev metrics of ``encoder`` and saves it when its max Spearman beats ``score``,
    the best so far; ``finish`` saves the final model when no dev score was a number (constant embeddings),
    so a stage always leaves a model."""

    def __init__(self, args, stage, encoder, tokenizer, evaluate, log, score, sources, rank, stale=0):
        self.args, self.stage, self.encoder, self.tokenizer = args, stage, encoder, tokenizer
        self.dev, self.log = evaluate, log
        self.score, self.main = score, rank == 0
        self.stale = stale  # evaluations since the best one (rank 0), for --early_stop_evals
        self.dir = os.path.join(args.output_dir, stage.best_dir)
        self.files = [f for s in sources for f in s.files]  # for the model card

    def evaluate(self, step, epoch):
        if not self.main:
            return
        metrics = self.dev(self.encoder)
        self.log.record({"stage": self.stage.name, "step": step, "epoch": epoch, "dev": metrics})
        self.log(f"[{self.stage.name}] step {step}: dev avg {metrics['avg']:.2f}, cosine spearman "
                 f"{metrics['cosine_spearman']:.2f}, max spearman {metrics['max_spearman']:.2f}")
        self.stale += 1
        if metrics["max_spearman"] > self.score:
            self.score, self.stale = metrics["max_spearman"], 0
            self.save(step, metrics)
            self.log(f"\t## SAVE {self.dir} | valid_score: {self.score / 100:.4f} | epochs: {epoch} | steps: {step} ##")

    def stop_early(self):
        """True, on every process, once --early_stop_evals N evaluations in a row have not beaten the best
        score (BM-K's rule: a counter reset by every improvement, the run ends when it reaches N)."""
        stop = [0 < self.args.early_stop_evals <= self.stale]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(stop, src=0)  # only rank 0 evaluates
        return stop[0]

    def save(self, step, metrics):
        save_atomically(lambda d: save_model(self.encoder, d, self.tokenizer, self.args, self.stage.name, step, metrics,
                                             self.files), self.dir)

    def finish(self, step):
        if self.main and not os.path.isdir(self.dir):  # every dev score was NaN
            self.save(step, None)
            self.log(f"warning: no dev score was a number; saved the final model to {self.dir}")


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

# Copied from KoSimCSE/common/flags.py (whole file; delete this line to own it)
"""The flags every train.py shares, presets, and their checks: ``add_run_args`` defines them,
``PresetParser`` reads ``@presets/NAME.args`` (argparse's own fromfile_prefix_chars, each line split as a
shell would), ``finish_args`` checks them before anything loads and, with --resume, restores the run's
recorded flags."""
import argparse
import json
import math
import os
import shlex
import sys

import torch

from .data import DEFAULT_DATA_DIR
from .decontaminate import MODES as DECONTAMINATE_MODES
from .files import check_device

RESUME_MAY_CHANGE = ("device", "num_workers", "keep_checkpoint")  # flags --resume lets differ from args.json


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


def refuse_idle_flags(p, args, used_in):
    """Flags that cannot act in the run's --mode (``used_in``: flag -> the modes that read it). Typed on the
    command line: refused (parser.error, one line). Set by a preset file: a warning, since a published preset
    may carry one for another mode. A resumed run is not checked (its flags were checked when it started)."""
    if args.resume:
        return
    argv = list(p.argv)  # explicit_flags parses again, which resets p.argv
    typed, given = explicit_flags(p, [a for a in argv if not a.startswith("@")]), explicit_flags(p, argv)
    p.argv = argv
    for flag, modes in used_in.items():
        if args.mode in modes or flag not in given:
            continue
        reason = f"--{flag} does nothing with --mode {args.mode} (it is read by --mode {', '.join(modes)})"
        if flag in typed:
            p.error(reason + "; leave it out or pick the mode that uses it")
        print(f"warning: {reason}; set by a preset file, ignored", file=sys.stderr)


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
    for name, value in sorted(vars(args).items()):  # every float flag: NaN and inf never train
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = next((v for v in values if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            p.error(f"--{name} {bad}: must be a finite number")
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

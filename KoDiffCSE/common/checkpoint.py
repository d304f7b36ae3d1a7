# Copied from KoSimCSE/common/checkpoint.py (whole file; delete this line to own it)
"""What a run keeps on disk and how --resume reads it back: the output folder (its lock, the refusal to mix
two runs), saves that a kill cannot tear, the checkpoint with its RNG states, the training files'
fingerprints, and the JSON-lines training log.

The checkpoint is one ``state.pt`` per run (torch.save of the model, optimizer, schedule and RNG states):
torch.distributed.checkpoint's sharded layout does the job for models split over ranks; here every rank
holds the whole model and only rank 0 writes. Saved models are written by transformers' save_pretrained
(safetensors); state.pt holds optimizer and RNG state too, which safetensors does not store.
"""
import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors import SafetensorError

from .data import resolve_path
from .decontaminate import SOURCE_FLAGS
from .files import FolderLock, save_atomic

RUN_FILES = ("args.json", "train_log.jsonl", "best_model", "checkpoint")


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

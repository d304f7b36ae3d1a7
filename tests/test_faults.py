"""Faults beyond a clean kill: a full disk during a save, a truncated checkpoint, two runs on one output
folder, and a kill at any point of a save. One test per fault, all through KoSimCSE's train.py (the
plumbing is common/{flags,checkpoint,stages,dev,run}.py, checked whole-file copies in every method folder)."""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, crash_after_first_checkpoint

TRAIN = os.path.join(ROOT, "KoSimCSE", "train.py")


def cli(tiny_bert, data, out, *extra):
    return ["--model", tiny_bert, "--data_dir", data, "--mode", "unsup", "--output_dir", out, "--batch_size", "8",
            "--max_len", "24", "--max_steps", "6", "--eval_steps", "2", "--logging_steps", "1", "--device", "cpu",
            *extra]


def dev_scores(out):
    return [e["dev"]["avg"] for e in map(json.loads, open(os.path.join(out, "train_log.jsonl"))) if "dev" in e]


@pytest.fixture(scope="module")
def uninterrupted(kosimcse, tiny_bert, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("whole") / "run")
    kosimcse.train.main(cli(tiny_bert, synthetic_data, out))
    return dev_scores(out)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "best_model", "best_model-safetensors"])
def test_full_disk_during_a_save_keeps_the_previous_one(kosimcse, tiny_bert, synthetic_data, tmp_path,
                                                        monkeypatch, uninterrupted, what):
    """checkpoint: the second state.pt goes to a file that fills up after 1 kB, as a full disk does (then
    torch.save raises its RuntimeError with the file's OSError as __context__, as seen on a real full tmpfs). best_model: a save that leaves half a folder; -safetensors: the error type safetensors raises
    on a full disk (its message as seen on a full tmpfs)."""
    out = str(tmp_path / "run")
    calls = []
    if what == "checkpoint":
        class FullDisk(io.RawIOBase):  # takes 1 kB, then every write fails
            written = 0

            def writable(self):
                return True

            def write(self, data):
                if self.written + len(data) > 1024:
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.written += len(data)
                return len(data)

        def full_disk_open(path, mode="r", *a, **k):  # checkpoint.py's own open: the second state.pt finds the disk full
            if str(path).endswith("state.pt"):
                calls.append(path)
                if len(calls) == 2:
                    open(path, mode).close()  # the file exists, empty, as on a full disk
                    return FullDisk()
            return open(path, mode, *a, **k)
        monkeypatch.setattr(kosimcse.checkpoint, "open", full_disk_open, raising=False)
    elif what == "best_model":
        real = kosimcse.dev.save_model

        def save(encoder, folder, *a):  # writes half the folder, then the disk is full
            calls.append(folder)
            if len(calls) == 2:
                os.makedirs(folder)
                open(os.path.join(folder, "model.safetensors"), "wb").write(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(encoder, folder, *a)
        monkeypatch.setattr(kosimcse.dev, "save_model", save)
    else:
        import transformers.modeling_utils
        from safetensors import SafetensorError
        real = transformers.modeling_utils.safe_save_file

        def save_file(tensors, filename, *a, **k):
            calls.append(filename)
            if len(calls) == 2:
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, *a, **k)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
        what = "best_model"
    real_dev, scores = kosimcse.dev.DevEvaluator.__call__, iter(range(100))

    def improving(self, model):  # every evaluation a new best, so that best_model is saved each time
        return {**real_dev(self, model), "max_spearman": 10.0 + next(scores)}
    monkeypatch.setattr(kosimcse.dev.DevEvaluator, "__call__", improving)
    with pytest.raises(SystemExit) as e:
        kosimcse.train.main(cli(tiny_bert, synthetic_data, out, "--temperature", "0.05"))
    message = str(e.value)
    assert message.startswith(f"error: could not write {os.path.join(out, what)}: ") and "\n" not in message
    assert "No space left on device" in message and f"; the previous {what} is intact" in message
    assert message.endswith(f"Free some space, then continue with --resume {out}")  # step 2's checkpoint is there
    assert not os.path.exists(os.path.join(out, what + ".tmp"))
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
    assert state["step"] == 2  # the checkpoint before the failure, whole
    assert os.path.isfile(os.path.join(out, "best_model", "model.safetensors"))
    monkeypatch.undo()
    kosimcse.train.main(["--resume", out])  # after "freeing space" the run continues
    assert dev_scores(out)[-1] == pytest.approx(uninterrupted[-1], abs=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_checkpoint_is_a_clear_error_on_resume(kosimcse, tiny_bert, synthetic_data, tmp_path, damage):
    out = str(tmp_path / "run")
    kosimcse.train.main(cli(tiny_bert, synthetic_data, out, "--keep_checkpoint"))
    path = os.path.join(out, "checkpoint", "state.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 10)
    with pytest.raises(SystemExit, match=rf"^error: {path} is truncated or corrupt \(.*\); it cannot be resumed"):
        kosimcse.train.main(["--resume", out])


@pytest.mark.slow
def test_a_finished_run_removes_its_checkpoint_unless_asked_to_keep_it(kosimcse, tiny_bert, synthetic_data,
                                                                        tmp_path, capsys, monkeypatch):
    """The checkpoint (weights + Adam moments, 3x the model) only serves --resume of an unfinished run: once
    the run has finished it is removed, so a row of run_example.sh leaves one model, not four."""
    removed, kept = str(tmp_path / "removed"), str(tmp_path / "kept")
    real, saved_at = kosimcse.train.save_checkpoint, []

    def save_checkpoint(*a, **k):
        saved_at.append(a[5])  # the step
        return real(*a, **k)
    monkeypatch.setattr(kosimcse.train, "save_checkpoint", save_checkpoint)
    kosimcse.train.main(cli(tiny_bert, synthetic_data, removed))
    assert saved_at == [2, 4]  # none at the last step: it would be removed at once
    assert sorted(os.listdir(removed)) == ["args.json", "best_model", "train_log.jsonl"]
    assert f"removed {os.path.join(removed, 'checkpoint')} (the run has finished" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no checkpoint/state.pt there to resume from \(a run removes its checkpoint "
                                         r"once it has finished, unless --keep_checkpoint; its model is in best_model/\)"):
        kosimcse.train.main(["--resume", removed])
    kosimcse.train.main(cli(tiny_bert, synthetic_data, kept, "--keep_checkpoint"))
    assert saved_at == [2, 4, 2, 4, 6]
    state = torch.load(os.path.join(kept, "checkpoint", "state.pt"), weights_only=False)
    assert state["step"] == 6 and set(state["optimizer"]["state"])  # the last step's, with the Adam moments
    crashed = str(tmp_path / "crashed")  # an interrupted run keeps it, for --resume
    crash_after_first_checkpoint(kosimcse.train, cli(tiny_bert, synthetic_data, crashed))
    assert torch.load(os.path.join(crashed, "checkpoint", "state.pt"), weights_only=False)["step"] == 2


@pytest.mark.slow
def test_a_second_run_on_a_live_output_folder_is_refused(kosimcse, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, TRAIN, *cli(tiny_bert, synthetic_data, out, "--max_steps", "100000",
                                                          "--eval_steps", "50000")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock, deadline = os.path.join(out, ".lock"), time.time() + 120
        while time.time() < deadline and not (os.path.exists(lock) and open(lock).read() == str(proc.pid)
                                               and os.path.exists(os.path.join(out, "train_log.jsonl"))):
            time.sleep(0.05)
        with pytest.raises(SystemExit, match=rf"{out} is in use by a running training \(pid {proc.pid}\)"):
            kosimcse.train.main(cli(tiny_bert, synthetic_data, out, "--overwrite_output_dir"))
        with pytest.raises(SystemExit, match="is in use by a running training"):
            kosimcse.train.main(["--resume", out])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel dropped the dead run's lock: the folder can be taken again (and the lock is released on exit)
    kosimcse.train.main(cli(tiny_bert, synthetic_data, out, "--overwrite_output_dir"))
    kosimcse.train.main(cli(tiny_bert, synthetic_data, out, "--overwrite_output_dir", "--max_steps", "2"))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["while_writing", "after_first_rename", "after_second_rename"])
def test_a_kill_at_any_point_of_a_save_leaves_a_resumable_run(kosimcse, tiny_bert, synthetic_data, tmp_path,
                                                              monkeypatch, uninterrupted, point):
    """The second checkpoint save is killed: while state.pt is written, between checkpoint -> checkpoint.old
    and checkpoint.tmp -> checkpoint, or before checkpoint.old is removed. --resume then continues from a
    whole checkpoint, and the run ends exactly as an uninterrupted one."""
    out = str(tmp_path / "run")
    real_replace, real_save = os.replace, torch.save
    final = os.path.join(out, "checkpoint")

    def replace(src, dst):
        real_replace(src, dst)
        if point == "after_first_rename" and dst == final + ".old":
            raise KeyboardInterrupt
        if point == "after_second_rename" and dst == final and os.path.isdir(final + ".old"):
            raise KeyboardInterrupt

    def save(obj, f, *a, **k):
        if point == "while_writing" and os.path.isdir(final):
            f.write(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        kosimcse.train.main(cli(tiny_bert, synthetic_data, out))
    monkeypatch.undo()
    assert not os.path.isdir(final) or not os.path.isdir(final + ".tmp") or point == "while_writing"
    kosimcse.train.main(["--resume", out])
    assert dev_scores(out)[-1] == pytest.approx(uninterrupted[-1], abs=1e-6)
    assert [f for f in os.listdir(out) if f.startswith("checkpoint")] == []  # no .tmp/.old left; the finished run's removed


def test_a_write_error_is_found_behind_torchs_runtime_error_and_nothing_else_is_masked(kosimcse, tmp_path):
    """torch.save on a full disk raises its zip writer's RuntimeError while closing, with the file's OSError
    as its __context__: that is a write error (with no checkpoint yet, the advice is to run again). Any
    other error of a save is raised as it is."""
    final = str(tmp_path / "run" / "best_model")

    def full_disk(folder):
        os.makedirs(folder)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    with pytest.raises(SystemExit) as e:
        kosimcse.checkpoint.save_atomically(full_disk, final)
    assert str(e.value) == (f"error: could not write {final}: No space left on device; nothing was lost. Free some "
                            f"space, then run it again")
    assert os.listdir(tmp_path / "run") == []  # the half-written .tmp is gone

    def bug(folder):
        raise RuntimeError("shared tensors")
    with pytest.raises(RuntimeError, match="^shared tensors$"):
        kosimcse.checkpoint.save_atomically(bug, final)

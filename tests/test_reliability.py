"""Reliability beyond the tested paths (issue 25): torn training logs, write errors outside a save,
result files written atomically, one line per error, flags checked once for every train.py."""
import errno
import json
import os

import pytest
import torch

from conftest import crash_after_first_checkpoint
from test_faults import cli, dev_scores, uninterrupted  # noqa: F401 (a fixture)


# --- 1. torn or failed log writes ----------------------------------------------------------------------

@pytest.mark.parametrize("tail", [b'{"stage": "unsup", "step": 3, "epoch": 0, "lo',   # cut mid-line
                                  b'{"stage": "unsup", "step": 3, "epoch": 0, "loss": 1.5}',  # whole but no newline
                                  b"\0\0\0\0\0\0\0\0\n",                                # NULs of a power loss
                                  b'\xed\x95\x9c{"st\n'])                               # a cut UTF-8 char
def test_a_resume_drops_a_torn_last_log_line(kosimcse, tiny_bert, synthetic_data, tmp_path, uninterrupted, tail):
    out = str(tmp_path / "run")
    crash_after_first_checkpoint(kosimcse.train, cli(tiny_bert, synthetic_data, out))
    log = os.path.join(out, "train_log.jsonl")
    with open(log, "ab") as f:
        f.write(tail)
    kosimcse.train.main(["--resume", out])
    assert dev_scores(out)[-1] == pytest.approx(uninterrupted[-1], abs=1e-6)
    entries = [json.loads(line) for line in open(log)]  # every line whole again
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_read_log_drops_only_a_torn_tail(kosimcse, tmp_path):
    path = str(tmp_path / "train_log.jsonl")
    good = '{"stage": "a", "step": 1}\n{"stage": "a", "step": 2}\n'
    open(path, "w").write(good + '{"stage": "a", "st')
    assert [e["step"] for _, e in kosimcse.run_utils.read_log(path)] == [1, 2]
    open(path, "w").write(good)
    assert [e["step"] for _, e in kosimcse.run_utils.read_log(path)] == [1, 2]
    open(path, "w").write('{"stage": "a", "step": 1}\nnot json\n{"stage": "a", "step": 2}\n')  # damage inside
    with pytest.raises(SystemExit, match=rf"^error: {path}:2: not a log entry"):
        kosimcse.run_utils.read_log(path)
    kosimcse.run_utils.truncate_log(path + ".none", ["a"], "a", 1)  # no log yet: nothing to do
    open(path, "w").write(good + "\0\0\0")
    kosimcse.run_utils.truncate_log(path, ["a"], "a", 5)
    assert open(path).read() == good


def test_plot_training_reads_a_torn_log(tmp_path):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("plot_training", os.path.join(ROOT, "utils", "plot_training.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = str(tmp_path / "train_log.jsonl")
    open(path, "w").write('{"stage": "a", "step": 1, "loss": 2.0}\n{"stage": "a", "step": 2, "lo')
    assert module.read_log(path) == ([(1, 2.0)], [])


def test_a_full_disk_on_a_log_write_is_one_line_and_the_run_resumes(kosimcse, tiny_bert, synthetic_data, tmp_path,
                                                                    monkeypatch, uninterrupted):
    """The log file fills up after the checkpoint of step 2: half of step 3's line is written, then ENOSPC.
    The run stops with one line naming the log and --resume; the resume drops the torn line and ends as an
    uninterrupted run."""
    out = str(tmp_path / "run")
    log = os.path.join(out, "train_log.jsonl")
    real_open = open

    class FullLog:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if os.path.isfile(os.path.join(out, "checkpoint", "state.pt")) and '"step": 3' in text:
                self.f.write(text[:len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()

    def log_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullLog(f) if str(path) == log and "a" in mode else f
    monkeypatch.setattr(kosimcse.run_utils, "open", log_open, raising=False)
    with pytest.raises(SystemExit) as e:
        kosimcse.train.main(cli(tiny_bert, synthetic_data, out))
    assert str(e.value) == (f"error: could not write {log}: No space left on device; nothing was lost. Free some "
                            f"space, then continue with --resume {out}")
    assert not open(log).read().endswith("\n")  # the torn line is there
    monkeypatch.undo()
    kosimcse.train.main(["--resume", out])
    assert dev_scores(out)[-1] == pytest.approx(uninterrupted[-1], abs=1e-6)

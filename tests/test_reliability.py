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


# --- 2. evaluation.py never destroys recorded results -------------------------------------------------

@pytest.fixture(scope="module")
def evaluated_model(kosimcse, tiny_bert, synthetic_data, tmp_path_factory):
    """A best_model of a short run, evaluated once on korsts-dev (so it has eval_results.json and a card)."""
    out = str(tmp_path_factory.mktemp("evaluated") / "run")
    kosimcse.train.main(cli(tiny_bert, synthetic_data, out))
    best = os.path.join(out, "best_model")
    kosimcse.evaluation.main(["--model_dir", best, "--data_dir", synthetic_data, "--dataset", "korsts-dev",
                              "--device", "cpu"])
    return best


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in ("eval_results.json", "README.md")}


def evaluate_test_set(kosimcse, folder, data, *extra):
    kosimcse.evaluation.main(["--model_dir", folder, "--data_dir", data, "--dataset", "korsts-test", "--device", "cpu",
                              *extra])


@pytest.mark.parametrize("failing", ["eval_results.json", "README.md"])
def test_a_failed_card_write_keeps_the_recorded_results(kosimcse, evaluated_model, synthetic_data, monkeypatch,
                                                        capsys, failing, tmp_path):
    """The disk fills while eval_results.json (or README.md) is written: the metrics are printed, one warning
    says the card is unchanged, the exit is 0, and the earlier rows are still whole JSON."""
    folder = str(tmp_path / "model")
    import shutil
    shutil.copytree(evaluated_model, folder)
    before = snapshot(folder)
    real_open = open

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path) == os.path.join(folder, failing + ".tmp") and "w" in mode:
            f.write(b"[{\"dataset\": \"kor")  # half written, then the disk is full
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f
    monkeypatch.setattr(kosimcse.files, "open", full_open, raising=False)
    evaluate_test_set(kosimcse, folder, synthetic_data)  # no SystemExit: exit 0
    captured = capsys.readouterr()
    assert "korsts-test" in captured.out  # the metrics
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: could not update")]
    assert warning == [f"warning: could not update the model card of {folder} (README.md, eval_results.json): No "
                       f"space left on device; both are unchanged"]
    if failing == "eval_results.json":
        assert snapshot(folder) == before
    assert snapshot(folder)["eval_results.json"] == before["eval_results.json"]
    assert [r["dataset"] for r in json.load(open(os.path.join(folder, "eval_results.json")))] == ["korsts-dev"]
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    monkeypatch.undo()
    evaluate_test_set(kosimcse, folder, synthetic_data)  # space again: the new row joins the old one
    assert [r["dataset"] for r in json.load(open(os.path.join(folder, "eval_results.json")))] == ["korsts-dev",
                                                                                                    "korsts-test"]


def test_a_read_only_model_folder_prints_the_metrics_and_one_warning(kosimcse, evaluated_model, synthetic_data,
                                                                     monkeypatch, capsys, tmp_path):
    """chmod a-w where permissions count; as root (which ignores them) the writes are refused by a patched
    open, as a read-only mount does."""
    folder = str(tmp_path / "model")
    import shutil
    shutil.copytree(evaluated_model, folder)
    before = snapshot(folder)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
    else:
        real_open = open

        def read_only(path, mode="r", *a, **k):
            if os.path.dirname(os.path.abspath(str(path))) == folder and any(c in mode for c in "wax+"):
                raise OSError(errno.EROFS, "Read-only file system")
            return real_open(path, mode, *a, **k)
        monkeypatch.setattr(kosimcse.files, "open", read_only, raising=False)
    try:
        evaluate_test_set(kosimcse, folder, synthetic_data)
    finally:
        os.chmod(folder, 0o755)
    captured = capsys.readouterr()
    assert "korsts-test" in captured.out
    assert [line for line in captured.err.splitlines() if line.startswith("warning:")] == [
        f"warning: could not update the model card of {folder} (README.md, eval_results.json): "
        f"{'Read-only file system' if os.geteuid() == 0 else 'Permission denied'}; both are unchanged"]
    assert snapshot(folder) == before


def test_a_torn_eval_results_json_is_set_aside_not_crashed_on(kosimcse, evaluated_model, synthetic_data, capsys,
                                                             tmp_path):
    folder = str(tmp_path / "model")
    import shutil
    shutil.copytree(evaluated_model, folder)
    results = os.path.join(folder, "eval_results.json")
    torn = open(results, "rb").read()[:40]
    open(results, "wb").write(torn)
    evaluate_test_set(kosimcse, folder, synthetic_data)
    assert f"warning: {results} was not readable" in capsys.readouterr().err
    assert open(results + ".corrupt", "rb").read() == torn
    assert [r["dataset"] for r in json.load(open(results))] == ["korsts-test"]


def test_a_failed_output_json_write_is_one_line_and_keeps_the_old_file(kosimcse, evaluated_model, synthetic_data,
                                                                       monkeypatch, tmp_path):
    target = str(tmp_path / "results.json")
    open(target, "w").write('[{"earlier": 1}]')

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(kosimcse.files.os, "replace", replace)
    with pytest.raises(SystemExit) as e:
        evaluate_test_set(kosimcse, evaluated_model, synthetic_data, "--output_json", target)
    assert str(e.value) == (f"error: could not write --output_json {target}: No space left on device; the results "
                            f"are printed above and any earlier file there is unchanged")
    assert json.load(open(target)) == [{"earlier": 1}] and not os.path.exists(target + ".tmp")

"""Reliability beyond the tested paths (issue 25): torn training logs, write errors outside a save,
result files written atomically, one line per error, flags checked once for every train.py."""
import errno
import json
import os
import re

import pytest
import torch

from conftest import crash_after_first_checkpoint
from test_faults import cli, dev_scores, uninterrupted  # noqa: F401 (a fixture)


# --- 1. torn or failed log writes ----------------------------------------------------------------------

@pytest.mark.parametrize("tail", [b'{"stage": "unsup", "step": 3, "epoch": 0, "lo',   # cut mid-line
                                  b'{"stage": "unsup", "step": 3, "epoch": 0, "loss": 1.5}',  # whole but no newline
                                  b"\0\0\0\0\0\0\0\0\n",                                # NULs of a power loss
                                  b'\xed\x95\x9c{"st\n'])                               # a cut UTF-8 char
@pytest.mark.slow
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
    assert [e["step"] for _, e in kosimcse.checkpoint.read_log(path)] == [1, 2]
    open(path, "w").write(good)
    assert [e["step"] for _, e in kosimcse.checkpoint.read_log(path)] == [1, 2]
    open(path, "w").write('{"stage": "a", "step": 1}\nnot json\n{"stage": "a", "step": 2}\n')  # damage inside
    with pytest.raises(SystemExit, match=rf"^error: {path}:2: not a log entry"):
        kosimcse.checkpoint.read_log(path)
    kosimcse.checkpoint.truncate_log(path + ".none", ["a"], "a", 1)  # no log yet: nothing to do
    open(path, "w").write(good + "\0\0\0")
    kosimcse.checkpoint.truncate_log(path, ["a"], "a", 5)
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


@pytest.mark.slow
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
    monkeypatch.setattr(kosimcse.run, "open", log_open, raising=False)
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


@pytest.mark.slow
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


# --- 3. one line per error ---------------------------------------------------------------------------------

FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE")


@pytest.fixture(scope="module")
def methods():
    from conftest import load_method
    return {name: load_method(name) for name in FOLDERS}


def refused(capsys, parse, argv):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("flags, expected", [
    (["--lr", "-0.001"], "--lr -0.001: must be a positive number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--max_len", "0"], "--max_len 0: must be at least 2"),
    (["--max_train_samples", "0"], "--max_train_samples 0: must be at least 1"),
    (["--eval_batch_size", "-3"], "--eval_batch_size -3: must be at least 1"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio 1.5: must be between 0 and 1"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1.0: must not be negative"),
    (["--device", "cuda:7"], "--device cuda:7: "),
    (["--device", "gpu"], "--device gpu: not a device name"),
])
def test_train_flags_no_run_can_use_are_one_line(methods, capsys, folder, flags, expected):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert expected in refused(capsys, methods[folder].train.parse_args, ["--output_dir", "unused", *flags])


@pytest.mark.parametrize("folder", FOLDERS)
def test_epochs_0_without_max_steps_and_an_output_dir_that_is_a_file(methods, capsys, folder, tmp_path):
    parse = methods[folder].train.parse_args
    epochs = "--nli_epochs" if folder == "KoSBERT" else "--epochs"
    assert f"{epochs} 0 with no --max_steps: nothing would be trained" in refused(capsys, parse, [epochs, "0"])
    args = parse([epochs, "0", "--max_steps", "3", "--output_dir", str(tmp_path / "ok")])  # steps say how long
    assert args.max_steps == 3
    file = tmp_path / "a_file"
    file.write_text("x")
    assert f"--output_dir {file}: is a file, not a folder" in refused(capsys, parse, ["--output_dir", str(file)])


@pytest.mark.parametrize("folder", FOLDERS)
def test_contrastive_batch_size_1_is_refused(methods, capsys, folder):
    parse = methods[folder].train.parse_args
    if folder == "KoSBERT":  # classification / regression: one example per batch trains
        assert parse(["--batch_size", "1", "--output_dir", "unused"]).batch_size == 1
    else:
        assert "contrastive training needs at least 2 examples" in refused(capsys, parse, ["--batch_size", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(methods, capsys):
    line = refused(capsys, methods["KoSBERT"].train.parse_args, ["--device", "cuda"])
    assert "--device cuda: CUDA is not available on this machine (use --device cpu)" in line
    line = refused(capsys, methods["KoSimCSE"].evaluation.parse_args, ["--model_dir", "m", "--device", "cuda"])
    assert "--device cuda: CUDA is not available" in line


@pytest.mark.parametrize("flags, expected", [
    (["--task", "index", "--index_type", "hnsw", "--hnsw_m", "0"], "--hnsw_m 0: must be at least 2"),
    (["--task", "index", "--index_type", "hnsw", "--hnsw_m", "1"], "--hnsw_m 1: must be at least 2"),
    (["--task", "index", "--ef_construction", "0"], "--ef_construction 0: must be at least 1"),
    (["--task", "search", "--ef_search", "-1"], "--ef_search -1: must be at least 1"),
    (["--task", "index", "--index_type", "ivf", "--nlist", "0"], "--nlist 0: must be at least 1"),
    (["--task", "search", "--nprobe", "0"], "--nprobe 0: must be at least 1"),
    (["--top_k", "0"], "--top_k 0: must be at least 1"),
    (["--max_len", "0"], "--max_len 0: must be at least 2"),
])
def test_evaluation_index_flags_are_checked_before_faiss(methods, capsys, flags, expected):
    for folder in FOLDERS:
        argv = ["--model_dir", "m", "--corpus_file", "c.txt", "--index_dir", "i", *flags]
        assert expected in refused(capsys, methods[folder].evaluation.parse_args, argv)


def test_an_unexpected_exception_is_one_line_with_the_trace_in_a_file(methods, monkeypatch):
    def boom(argv):
        raise RuntimeError("something broke\nover two lines")
    for folder in FOLDERS:
        monkeypatch.setattr(methods[folder].train, "train", boom)
        with pytest.raises(SystemExit) as e:
            methods[folder].train.main(["--output_dir", "unused", "--max_steps", "1"])
        message = str(e.value)
        assert message.startswith("error: RuntimeError: something broke over two lines (full trace in ")
        assert "\n" not in message
        trace = message.rsplit("(full trace in ", 1)[1][:-1]
        assert "Traceback" in open(trace).read() and "boom" in open(trace).read()
        os.remove(trace)

    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(methods["KoSimCSE"].train, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C stays Ctrl-C
        methods["KoSimCSE"].train.main(["--output_dir", "unused", "--max_steps", "1"])


@pytest.mark.slow
def test_evaluation_cli_a_bad_model_folder_is_one_error_line(tmp_path):
    """The real command line, a model folder whose config.json is not a config: exit 1, one error line on
    stderr (transformers' own warnings aside), no traceback."""
    import subprocess
    import sys
    from conftest import ROOT
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": 5}')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "KoSimCSE", "evaluation.py"), "--model_dir",
                           str(folder), "--pooling", "mean", "--device", "cpu"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: cannot load model from "), proc.stderr
    assert "Traceback" not in proc.stderr


# --- 4. --resume compares the flags and the training data with the run's --------------------------------

def copied_data(synthetic_data, tmp_path):
    import shutil
    root = str(tmp_path / "data")
    shutil.copytree(synthetic_data, root)
    return root


def interrupted_run(kosimcse, tiny_bert, data, tmp_path, *extra):
    out = str(tmp_path / "run")
    crash_after_first_checkpoint(kosimcse.train, cli(tiny_bert, data, out, *extra))
    return out


@pytest.mark.parametrize("flags, named", [(["--lr", "1e-4"], "--lr"), (["--max_steps", "9"], "--max_steps"),
                                          (["--pooler", "mean", "--seed", "7"], "--pooler"),
                                          (["--mode", "sup"], "--mode"), (["--no-mlp_only_train", "--temperature", "0.1"],
                                                                           "--temperature")])
def test_resume_refuses_changed_flags_in_one_line(kosimcse, tiny_bert, synthetic_data, tmp_path, capsys, flags, named):
    out = interrupted_run(kosimcse, tiny_bert, synthetic_data, tmp_path)
    with pytest.raises(SystemExit) as e:
        kosimcse.train.main(["--resume", out, *flags])
    assert e.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"train.py: error: --resume {out}: ") or "error: --resume" in message
    assert named in message and "may change on --resume" in message and "--device" in message
    if "--seed" in flags:
        assert "--seed 7 (was 42)" in message


@pytest.mark.slow
def test_resume_accepts_equal_flags_and_the_ones_that_may_change(kosimcse, tiny_bert, synthetic_data, tmp_path,
                                                                 uninterrupted):
    out = interrupted_run(kosimcse, tiny_bert, synthetic_data, tmp_path)
    kosimcse.train.main(["--resume", out, "--max_steps", "6", "--batch_size", "8", "--device", "cpu",
                         "--num_workers", "0", "--keep_checkpoint", "--output_dir", out])
    assert dev_scores(out)[-1] == pytest.approx(uninterrupted[-1], abs=1e-6)
    assert os.path.isfile(os.path.join(out, "checkpoint", "state.pt"))  # --keep_checkpoint took effect
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        kosimcse.train.main(["--help"])
    assert "--device, --num_workers, --keep_checkpoint" in " ".join(buffer.getvalue().split())


@pytest.mark.parametrize("change", ["append", "shuffle", "truncate", "remove"])
def test_resume_refuses_a_changed_training_file(kosimcse, tiny_bert, synthetic_data, tmp_path, change):
    data = copied_data(synthetic_data, tmp_path)
    out = interrupted_run(kosimcse, tiny_bert, data, tmp_path)
    wiki = os.path.join(data, "wiki", "wiki_corpus.txt")
    recorded = json.load(open(os.path.join(out, "args.json")))["data_fingerprints"]
    assert list(recorded) == [wiki] and recorded[wiki]["size"] == os.path.getsize(wiki)
    lines = open(wiki, encoding="utf-8").read().splitlines(keepends=True)
    if change == "remove":
        os.remove(wiki)
    else:
        changed = {"append": lines + ["새로운 문장 하나.\n"], "shuffle": lines[1:] + lines[:1],
                   "truncate": lines[:-3]}[change]
        open(wiki, "w", encoding="utf-8").write("".join(changed))
    what = {"append": "has changed since the run started (", "truncate": "has changed since the run started (",
            "shuffle": "(same size, different content)", "remove": "is missing"}[change]
    with pytest.raises(SystemExit) as e:
        kosimcse.train.main(["--resume", out])
    message = str(e.value)
    if change == "remove":  # the decontamination guard reads the files first
        assert message == f"error: {wiki}: file not found (--train_file)"
    else:
        assert message.startswith(f"error: --resume {out}: the training file {wiki} ") and what in message
    assert "\n" not in message
    assert not os.path.exists(os.path.join(out, ".lock"))  # the lock was released


def test_resume_fingerprints_the_decontaminated_copy_it_trains_on(kosimcse, tiny_bert, synthetic_data, tmp_path):
    data = copied_data(synthetic_data, tmp_path)
    wiki = os.path.join(data, "wiki", "wiki_corpus.txt")
    with open(wiki, "a", encoding="utf-8") as f:
        f.write('"슈퍼맨" 셔츠를 입은 개가 뛴다.\n')  # a KorSTS dev sentence: dropped
    out = interrupted_run(kosimcse, tiny_bert, data, tmp_path, "--decontaminate", "drop")
    copy = os.path.join(out, "decontaminated", "wiki_corpus.txt")
    assert list(json.load(open(os.path.join(out, "args.json")))["data_fingerprints"]) == [copy]
    with open(copy, "a", encoding="utf-8") as f:
        f.write("덧붙인 문장.\n")
    with pytest.raises(SystemExit, match=rf"^error: --resume {out}: the training file {copy} has changed"):
        kosimcse.train.main(["--resume", out])


# --- 9. messages that say what is wrong ------------------------------------------------------------------

BOM = "\ufeff"


def test_a_byte_order_mark_is_accepted_by_every_reader(kosimcse, tmp_path):
    """Excel's "CSV UTF-8" export starts the file with a BOM: the header is still found, and the first
    sentence does not carry it."""
    data = kosimcse.data
    sts_tsv = tmp_path / "sts.tsv"
    sts_tsv.write_text(BOM + "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
                       "main\tf\t2020\t1\t3.5\t첫 문장.\t둘째 문장.\n", encoding="utf-8")
    assert data.read_sts(str(sts_tsv)) == [("첫 문장.", "둘째 문장.", 3.5)]
    sts_csv = tmp_path / "sts.csv"
    sts_csv.write_text(BOM + "sentence1,sentence2,label\n하나.,둘.,4.2\n", encoding="utf-8")
    assert data.read_sts(str(sts_csv)) == [("하나.", "둘.", 4.2)]
    sts_json = tmp_path / "sts.json"
    sts_json.write_text(BOM + json.dumps([{"guid": "g", "sentence1": "가.", "sentence2": "나.",
                                           "labels": {"real-label": 1.5}}], ensure_ascii=False), encoding="utf-8")
    assert data.read_sts(str(sts_json)) == [("가.", "나.", 1.5)]
    nli_tsv = tmp_path / "nli.tsv"
    nli_tsv.write_text(BOM + "sentence1\tsentence2\tgold_label\n전제.\t가설.\tentailment\n", encoding="utf-8")
    assert data.read_nli(str(nli_tsv)) == ([("전제.", "가설.", "entailment")], 0)
    nli_json = tmp_path / "nli.json"
    nli_json.write_text(BOM + json.dumps([{"premise": "전제.", "hypothesis": "가설.", "gold_label": "neutral"}],
                                         ensure_ascii=False), encoding="utf-8")
    assert data.read_nli(str(nli_json)) == ([("전제.", "가설.", "neutral")], 0)
    text = tmp_path / "wiki.txt"
    text.write_text(BOM + "첫 줄의 문장.\n둘째 줄.\n", encoding="utf-8")
    assert [line for _, line in data.iter_lines(str(text))] == ["첫 줄의 문장.", "둘째 줄."]
    offsets, _ = kosimcse.index.corpus_offsets(str(text))  # the index reads lines at byte offsets
    assert kosimcse.index.read_lines_at(str(text), offsets) == ["첫 줄의 문장.", "둘째 줄."]
    assert kosimcse.decontaminate.sentences(str(nli_json), "nli") == ["전제.", "가설."]


def test_a_directory_is_named_as_one(kosimcse, tiny_bert, synthetic_data, tmp_path, capsys):
    folder = tmp_path / "a_folder.tsv"
    folder.mkdir()
    for read in (kosimcse.data.read_sts, kosimcse.data.read_nli, lambda p: list(kosimcse.data.iter_lines(p)),
                 kosimcse.files.require_file):
        with pytest.raises(kosimcse.data.DataError, match=rf"^{folder}: is a directory, not a file$"):
            read(str(folder))
    with pytest.raises(SystemExit) as e:  # the command line: one line naming the flag
        kosimcse.train.main(cli(tiny_bert, synthetic_data, str(tmp_path / "run"), "--train_file", str(folder)))
    assert e.value.code == f"error: {folder}: is a directory, not a file (--train_file)"
    with pytest.raises(SystemExit) as e:  # evaluation.py: refused by its parser, before the model loads
        kosimcse.evaluation.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "sts", "--data_dir",
                                  synthetic_data, "--dataset", str(folder)])
    assert e.value.code == 2
    assert f"error: --dataset {folder}: {folder}: is a directory, not a file (an STS set is a file" in capsys.readouterr().err


def test_the_nan_loss_message_names_only_what_exists(kosimcse, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit) as e:
        kosimcse.train.main(cli(tiny_bert, synthetic_data, out, "--lr", "1e38"))  # NaN before anything is saved
    message = str(e.value)
    assert re.match(r"error: the loss was not finite \(NaN or inf\) in the steps up to \d+; stopping, nothing was "
                    r"saved before it \(no evaluation or checkpoint yet\)\. Try a lower --lr", message)
    assert os.path.join(out, "best_model") not in message and os.path.join(out, "checkpoint") not in message
    exit_message = kosimcse.run.nonfinite_loss_exit
    os.makedirs(os.path.join(out, "sup_model"))
    assert "kept in " + os.path.join(out, "sup_model") in str(exit_message(5, out, "sup_model"))
    assert "nothing was saved" in str(exit_message(5, out))  # another stage's best model is not this one's
    os.makedirs(os.path.join(out, "checkpoint"))
    assert "nothing was saved" in str(exit_message(5, out))  # an empty folder is no checkpoint
    open(os.path.join(out, "checkpoint", "state.pt"), "wb").close()
    assert str(exit_message(5, out)).endswith(f"stopping, the last checkpoint in {os.path.join(out, 'checkpoint')}. "
                                              f"Try a lower --lr, or --bf16 instead of --fp16.")


@pytest.mark.parametrize("folder", ["KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE"])
def test_every_train_py_compares_resume_flags(folder, tmp_path, capsys):
    """The check is in the parser (common/flags.finish_args), before anything loads: args.json as a run of
    the folder records it, then --resume with the same, a changeable and a changed flag."""
    from conftest import load_method
    train = load_method(folder).train
    out = str(tmp_path / "run")
    args = train.parse_args(["--output_dir", out, "--device", "cpu"])
    os.makedirs(out)
    json.dump({k: v for k, v in vars(args).items() if k != "resume"}, open(os.path.join(out, "args.json"), "w"))
    resumed = train.parse_args(["--resume", out, "--lr", str(args.lr), "--num_workers", "2", "--device", "cpu"])
    assert (resumed.lr, resumed.num_workers, resumed.output_dir) == (args.lr, 2, out)
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--resume", out, "--seed", str(args.seed + 1), "--eval_steps", "7"])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--seed {args.seed + 1} (was {args.seed})" in line and f"--eval_steps 7 (was {args.eval_steps})" in line


def test_a_model_that_cannot_load_is_one_line(kosimcse, synthetic_data, tmp_path):
    """A folder with weights but no tokenizer, and one whose config.json is not JSON: one line each, naming
    the folder and --model (transformers' own messages run to several lines)."""
    from transformers import BertConfig, BertModel
    no_tokenizer, bad_config = tmp_path / "no_tokenizer", tmp_path / "bad_config"
    BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(no_tokenizer)
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    for folder in (no_tokenizer, bad_config):
        with pytest.raises(SystemExit) as e:
            kosimcse.train.main(["--model", str(folder), "--data_dir", synthetic_data, "--mode", "unsup",
                                 "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
        message = str(e.value)
        assert message.startswith(f"error: cannot load model '{folder}': ") and "\n" not in message
        assert message.endswith("; pass --model with a Hugging Face model folder (config.json, weights and tokenizer "
                                "files) or a hub id reachable from this machine")


@pytest.mark.parametrize("folder", ["KoSimCSE", "KoSBERT", "KoDiffCSE"])
def test_unusable_sentences_are_refused_with_their_line(folder, tmp_path):
    """An empty, whitespace-only or NUL sentence in an STS or NLI row, a JSON null, or a NUL inside a text line
    (training, corpus or query file) stops with `<file>:<line>: ...` instead of being encoded as [CLS][SEP]."""
    from conftest import load_method
    data = load_method(folder).data
    header = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
    cases = {
        "blank.tsv": (header + "g\tf\t2020\t1\t3.0\t한 문장.\t다른 문장.\ng\tf\t2020\t2\t1.0\t   \t둘째.\n",
                      data.read_sts, r"blank\.tsv:3: empty sentence"),
        "nul.tsv": (header + "g\tf\t2020\t1\t3.0\t한 문장.\t\x00\x00\n", data.read_sts, r"nul\.tsv:2: NUL byte"),
        "nli.tsv": ("sentence1\tsentence2\tgold_label\n전제.\t\t\tentailment\n".replace("\t\t\t", "\t \t"),
                    lambda p: data.read_nli(p), r"nli\.tsv:2: empty sentence"),
        "klue.json": ('[{"sentence1": "가", "sentence2": null, "labels": {"real-label": 1.0}}]', data.read_sts,
                      r"klue\.json: item 0 .*: a sentence is None, not text"),
        "lines.txt": ("첫 문장.\n둘째\x00 문장.\n", lambda p: data.read_sentences(p, log=lambda _: None),
                      r"lines\.txt:2: NUL byte"),
    }
    for name, (text, read, message) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(data.DataError, match=message):
            read(str(path))


@pytest.mark.slow
def test_search_refuses_a_corpus_or_queries_of_blank_lines(tiny_bert, tmp_path):
    """Streaming search over a corpus of blank lines is one error line, as --task index is (it printed "Top 0")."""
    import subprocess
    import sys
    from conftest import ROOT
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    base = [sys.executable, os.path.join(ROOT, "KoSBERT", "evaluation.py"), "--model_dir", tiny_bert, "--pooling", "mean",
            "--task", "search"]
    for extra, message in ((["--corpus_file", str(blank)], f"error: {blank}: no non-blank line to search in"),
                           (["--queries_file", str(blank)], "no query to search for")):
        out = subprocess.run(base + extra, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
        assert out.returncode == 1 and len(errors) == 1 and message in errors[0], out.stderr

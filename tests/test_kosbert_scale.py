"""KoSBERT at scale and under failure: DDP (gloo, 2 processes) for both objectives, torchrun end to end,
--resume after SIGKILL and across the two stages of nli_sts."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_method, sigkill_after_checkpoint, single_and_ddp, torchrun

TRAIN = os.path.join(ROOT, "KoSBERT", "train.py")


@pytest.fixture(scope="module")
def kosbert():
    return load_method("KoSBERT")


@pytest.mark.slow
def test_ddp_step_equals_single_process_on_the_global_batch(tiny_bert_no_dropout, tmp_path):
    """The SBERT losses are means over pairs, so DDP's gradient average over equal slices must equal one
    process on the whole batch: checked for the NLI softmax (classifier included) and STS regression."""
    a, b = single_and_ddp("kosbert_ddp_step.py", "KoSBERT", tiny_bert_no_dropout, tmp_path)
    for source in ("nli", "sts"):
        assert b[source]["loss"].item() == pytest.approx(a[source]["loss"].item(), abs=1e-5)
        assert a[source]["grads"].keys() == b[source]["grads"].keys() and len(a[source]["grads"]) > 20
        worst = max((a[source]["grads"][k] - b[source]["grads"][k]).abs().max().item() for k in a[source]["grads"])
        assert worst < 1e-5, (source, worst)
    assert any(k.startswith("classifier.") for k in a["nli"]["grads"])


@pytest.mark.slow
def test_torchrun_nli_sts_end_to_end(tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "ddp")
    run = torchrun(TRAIN, "--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "nli_sts", "--nli_file",
                   "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "16", "--max_steps", "4",
                   "--eval_steps", "2", "--max_len", "24", "--device", "cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes x 8" in run.stderr + run.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [(e["stage"], e["step"]) for e in log if "dev" in e] == [("nli", 2), ("nli", 4), ("sts", 2), ("sts", 4)]
    for folder in ("nli_model", "best_model"):
        assert os.path.isfile(os.path.join(out, folder, "model.safetensors"))


def train_cmd(model, data, out, task="multitask", *extra):
    return [sys.executable, TRAIN, "--model", model, "--data_dir", data, "--mode", task, "--nli_file",
            "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "16", "--max_len", "24",
            "--epochs", "3", "--eval_steps", "40", "--save_steps", "5", "--logging_steps", "5", "--lr", "1e-3",
            "--device", "cpu", *extra]


def dev_lines(out):
    return [e for e in map(json.loads, open(os.path.join(out, "train_log.jsonl"))) if "dev" in e]


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_result(tiny_bert, synthetic_data, tmp_path):
    """multitask: the kill lands mid-epoch, so the resumed run must find its place in both sources."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = str(tmp_path / "straight")
    subprocess.run(train_cmd(tiny_bert, synthetic_data, straight), check=True, capture_output=True, env=env)

    killed = str(tmp_path / "killed")
    step_at_kill = sigkill_after_checkpoint(train_cmd(tiny_bert, synthetic_data, killed), killed, env)
    total = len(dev_lines(straight)) and max(e["step"] for e in dev_lines(straight))
    assert 0 < step_at_kill < total
    resumed = subprocess.run([sys.executable, TRAIN, "--resume", killed, "--device", "cpu"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {killed} at step {step_at_kill}" in resumed.stderr + resumed.stdout
    a, b = dev_lines(straight), dev_lines(killed)
    assert [e["step"] for e in a] == [e["step"] for e in b] and len(a) >= 3
    for key in a[-1]["dev"]:
        assert b[-1]["dev"][key] == pytest.approx(a[-1]["dev"][key], abs=1e-6), key
    steps = [e["step"] for e in map(json.loads, open(os.path.join(killed, "train_log.jsonl"))) if "dev" not in e]
    assert steps == sorted(set(steps))  # the lines after the checkpoint were dropped, not duplicated


@pytest.mark.slow
@pytest.mark.parametrize("crash_after", [1, 3], ids=["in-nli-stage", "in-sts-stage"])
def test_nli_sts_resumes_in_either_stage(kosbert, tiny_bert, synthetic_data, tmp_path, monkeypatch, crash_after):
    """A crash right after the n-th checkpoint: in the NLI stage (resume it, then run STS) or in the STS
    stage (skip the finished NLI stage). Either way the result equals an uninterrupted run."""
    def args(out):
        return ["--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "nli_sts", "--nli_file",
                "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "16", "--max_len", "24",
                "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--lr", "1e-3", "--device", "cpu"]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    kosbert.train.main(args(straight))

    original, calls = kosbert.train.save_checkpoint, []

    def save_then_crash(*a, **k):
        original(*a, **k)
        calls.append(k["stage"])
        if len(calls) == crash_after:
            raise KeyboardInterrupt
    monkeypatch.setattr(kosbert.train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        kosbert.train.main(args(crashed))
    monkeypatch.setattr(kosbert.train, "save_checkpoint", original)
    assert calls[-1] == ("nli" if crash_after == 1 else "sts")
    kosbert.train.main(["--resume", crashed])
    a, b = dev_lines(straight), dev_lines(crashed)
    assert [(e["stage"], e["step"]) for e in b] == [(e["stage"], e["step"]) for e in a] == \
        [("nli", 3), ("nli", 6), ("sts", 3), ("sts", 6)]
    for x, y in zip(a, b):
        for key in x["dev"]:
            assert y["dev"][key] == pytest.approx(x["dev"][key], abs=1e-6), (x["stage"], x["step"], key)

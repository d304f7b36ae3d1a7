"""KoSimCSE at scale and under failure: DDP (gloo, 2 processes), resume after SIGKILL, atomic saves,
NaN stop, and bad input that must not cost an earlier run anything."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, sigkill_after_checkpoint, torchrun

TRAIN = os.path.join(ROOT, "KoSimCSE", "train.py")


@pytest.mark.slow
def test_ddp_step_equals_single_process_on_the_global_batch(tiny_bert_no_dropout, tmp_path):
    script = os.path.join(ROOT, "tests", "scripts", "ddp_step.py")
    method = os.path.join(ROOT, "KoSimCSE")
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    subprocess.run([sys.executable, script, method, tiny_bert_no_dropout, single], check=True, capture_output=True)
    run = torchrun(script, method, tiny_bert_no_dropout, double)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(single), torch.load(double)
    assert b["loss"].item() == pytest.approx(a["loss"].item(), abs=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 20
    worst = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_torchrun_training_end_to_end(tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "ddp")
    run = torchrun(TRAIN, "--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "sup", "--train_file",
                   "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "16", "--max_steps", "4",
                   "--eval_steps", "2", "--max_len", "24", "--device", "cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes x 8" in run.stderr + run.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [e["step"] for e in log if "dev" in e] == [2, 4]  # one log, from rank 0 only
    assert os.path.isfile(os.path.join(out, "best_model", "model.safetensors"))


def train_cmd(model, data, out, *extra):
    return [sys.executable, TRAIN, "--model", model, "--data_dir", data, "--mode", "unsup", "--output_dir", out,
            "--batch_size", "16", "--max_len", "24", "--max_steps", "300", "--eval_steps", "100",
            "--save_steps", "10", "--logging_steps", "10", "--lr", "1e-3", "--device", "cpu", *extra]


def final_dev(out):
    return [e["dev"] for e in map(json.loads, open(os.path.join(out, "train_log.jsonl"))) if "dev" in e]


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_result(tiny_bert, synthetic_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = str(tmp_path / "straight")
    subprocess.run(train_cmd(tiny_bert, synthetic_data, straight), check=True, capture_output=True, env=env)

    killed = str(tmp_path / "killed")
    step_at_kill = sigkill_after_checkpoint(train_cmd(tiny_bert, synthetic_data, killed), killed, env)
    assert 0 < step_at_kill < 300
    resumed = subprocess.run([sys.executable, TRAIN, "--resume", killed, "--device", "cpu"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {killed} at step {step_at_kill}" in resumed.stderr + resumed.stdout
    a, b = final_dev(straight), final_dev(killed)
    assert len(a) == len(b) == 3
    for key in a[-1]:
        assert b[-1][key] == pytest.approx(a[-1][key], abs=1e-6), key
    steps = [e["step"] for e in map(json.loads, open(os.path.join(killed, "train_log.jsonl")))]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 3  # no duplicates but the dev lines


def test_save_atomically_never_leaves_a_broken_model(kosimcse, tmp_path):
    final = str(tmp_path / "best_model")
    os.makedirs(final)
    open(os.path.join(final, "weights"), "w").write("good")

    def crash(folder):
        os.makedirs(folder)
        open(os.path.join(folder, "weights"), "w").write("half")
        raise KeyboardInterrupt  # killed mid-save

    with pytest.raises(KeyboardInterrupt):
        kosimcse.checkpoint.save_atomically(crash, final)
    assert open(os.path.join(final, "weights")).read() == "good"

    def ok(folder):
        os.makedirs(folder)
        open(os.path.join(folder, "weights"), "w").write("new")
    kosimcse.checkpoint.save_atomically(ok, final)
    assert open(os.path.join(final, "weights")).read() == "new"
    assert os.listdir(tmp_path) == ["best_model"]  # no .tmp or .old left behind


def test_nan_loss_stops_with_a_clear_message(kosimcse, tiny_bert, synthetic_data, tmp_path):
    # Checked without a per-step GPU sync: at the first logging, evaluation or checkpoint step (here 3), and
    # before anything is saved, so no NaN weights reach best_model/ or checkpoint/.
    with pytest.raises(SystemExit, match=r"the loss was not finite \(NaN or inf\) in the steps up to 3; stopping"):
        kosimcse.train.main(["--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "unsup", "--output_dir",
                             str(tmp_path / "nan"), "--batch_size", "8", "--max_steps", "3",
                             "--lr", "1e38"])  # the weights overflow after the first step
    assert sorted(os.listdir(tmp_path / "nan")) == ["args.json"]


def test_bad_input_does_not_touch_the_earlier_run(kosimcse, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    common = ["--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "unsup", "--output_dir", out,
              "--batch_size", "8", "--max_len", "24", "--max_steps", "2", "--eval_steps", "2"]
    kosimcse.train.main(common)
    weights = os.path.join(out, "best_model", "model.safetensors")
    before = open(weights, "rb").read()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe broken\n")
    with pytest.raises(SystemExit, match=r"bad.txt:1: not valid UTF-8"):
        kosimcse.train.main(common + ["--overwrite_output_dir", "--train_file", str(bad)])
    assert open(weights, "rb").read() == before and os.path.exists(os.path.join(out, "train_log.jsonl"))


def test_long_sentences_are_truncated_and_reported(kosimcse, tiny_bert, tmp_path, capsys):
    from transformers import AutoTokenizer
    (tmp_path / "wiki.txt").write_text("사과 바나나.\n" + " ".join(["사과"] * 50) + ".\n바다.\n", encoding="utf-8")
    dataset = kosimcse.dataloader.build_contrastive_dataset("unsup", [str(tmp_path / "wiki.txt")],
                                                            AutoTokenizer.from_pretrained(tiny_bert), max_len=8)
    assert len(dataset) == 3 and all(len(x[0]) <= 8 for x in (dataset[i] for i in range(3)))
    assert "1 of 3 training sentences were longer than --max_len 8 tokens and were truncated" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["--fp16", "--bf16"])
def test_amp_training_on_cuda(kosimcse, tiny_bert, synthetic_data, tmp_path, amp):
    out = str(tmp_path / "amp")
    kosimcse.train.main(["--model", tiny_bert, "--data_dir", synthetic_data, "--mode", "sup", "--train_file",
                         "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "16", "--max_len", "24",
                         "--max_steps", "20", "--eval_steps", "10", "--lr", "1e-3", "--device", "cuda", amp])
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
    assert [e["step"] for e in log if "dev" in e] == [10, 20]
    assert os.path.isfile(os.path.join(out, "best_model", "model.safetensors"))

"""KoSimCSE multitask (joint) and sup_sts (sequential), the dev protocol option, and that no evaluation
truncates a benchmark sentence because training used a short --max_len."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import crash_after_first_checkpoint


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


def common(tiny_bert, data, out, *extra):
    return ["--model", tiny_bert, "--data_dir", data, "--output_dir", out, "--train_file", "KorNLI/nli.train.ko.tsv",
            "--max_train_samples", "160", "--batch_size", "16", "--sts_batch_size", "8", "--max_len", "24",
            "--logging_steps", "1", "--eval_steps", "1000", "--lr", "1e-3", "--device", "cpu", *extra]


def test_multitask_interleaves_contrastive_and_sts_batches(kosimcse, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "multi")
    # 160 triplets / 16 = 10 NLI batches, 120 STS pairs / 8 = 15 STS batches: 25 steps an epoch
    kosimcse.train.main(common(tiny_bert, synthetic_data, out, "--mode", "multitask"))
    log = [e for e in read_log(out) if "loss" in e]
    kinds = ["sts" if "loss_sts" in e else "sup" for e in log]
    assert kinds == [["sup", "sts"][i] for i in kosimcse.run_utils.interleave([10, 15])]
    assert all(e["stage"] == "multitask" for e in log)
    sup, sts = [e["loss_sup"] for e in log if "loss_sup" in e], [e["loss_sts"] for e in log if "loss_sts" in e]
    assert len(sup) == 10 and len(sts) == 15 and len(set(sup)) > 1 and len(set(sts)) > 1
    # the STS loss is SBERT's regression: a squared error of cosines against 0-1 targets, below 4
    assert max(sts) < 4 and min(sup) > 0
    cfg = json.load(open(os.path.join(out, "best_model", "1_Pooling", "config.json")))
    assert cfg["pooling_mode_cls_token"]  # the mode's preset: raw [CLS], as BM-K's multitask checkpoints


def test_sts_step_is_cosine_regression(kosimcse, tiny_bert):
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="mean")
    ids = torch.randint(5, 50, (4, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0.2, 0.9])}
    loss, logged = kosimcse.train.training_step(model, "sts", batch, None, world=4)
    u, v = model(ids, torch.ones_like(ids)).split(2)
    expected = ((torch.nn.functional.cosine_similarity(u, v) - batch["labels"]) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # not scaled by the world size
    assert logged["loss"] is loss


def test_sup_sts_continues_from_the_best_sup_checkpoint(kosimcse, tiny_bert, synthetic_data, tmp_path, capsys):
    out = str(tmp_path / "seq")
    kosimcse.train.main(common(tiny_bert, synthetic_data, out, "--mode", "sup_sts", "--epochs", "1",
                               "--sts_epochs", "1", "--sts_lr", "5e-4"))
    log = read_log(out)
    assert [(e["stage"], e["step"]) for e in log if "dev" in e] == [("sup", 10), ("sts", 15)]
    assert [e["lr"] for e in log if e["stage"] == "sts" and e["step"] == 1] == [pytest.approx(5e-4)]  # --sts_lr
    assert os.path.isdir(os.path.join(out, "sup_model")) and os.path.isdir(os.path.join(out, "best_model"))
    assert "[sts] continuing from sup_model" in capsys.readouterr().out


def test_multitask_resumes_exactly(kosimcse, tiny_bert, synthetic_data, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ["--mode", "multitask", "--eval_steps", "8", "--max_steps", "20"]
    kosimcse.train.main(common(tiny_bert, synthetic_data, a, *extra))
    crash_after_first_checkpoint(kosimcse.train, common(tiny_bert, synthetic_data, b, *extra))
    kosimcse.train.main(["--resume", b])
    la, lb = read_log(a), read_log(b)
    assert [e["step"] for e in la] == [e["step"] for e in lb]
    for x, y in zip(la, lb):
        for key in ("loss", "dev"):
            if key == "loss" and key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-5), x["step"]
            elif key in x:
                assert y[key]["avg"] == pytest.approx(x[key]["avg"], abs=1e-5), x["step"]


def test_dev_protocol_bmk_is_bmks_per_batch_score(kosimcse, tiny_bert, synthetic_data):
    tok = kosimcse.tokenizer.load_tokenizer(tiny_bert)
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="mean")
    make = lambda protocol: kosimcse.run_utils.DevEvaluator(  # noqa: E731
        "korsts-dev", synthetic_data, tok, 64, 32, "cpu", None, protocol, bmk_batch=16, seed=3, log=lambda m: None)
    bmk, standard = make("bmk")(model), make("standard")(model)
    pairs = kosimcse.data.read_sts(os.path.join(synthetic_data, "KorSTS", "sts-dev.tsv"))
    emb = kosimcse.evaluation.encode(model.eval(), tok, [p[0] for p in pairs] + [p[1] for p in pairs], 64)
    gold, n = np.array([p[2] for p in pairs]), len(pairs)
    assert bmk == pytest.approx(kosimcse.sts.bmk_metrics(emb[:n], emb[n:], gold, 16, 3), abs=1e-6)
    assert standard == pytest.approx(kosimcse.sts.sts_metrics(emb[:n], emb[n:], gold), abs=1e-6)
    assert bmk["max_spearman"] != pytest.approx(standard["max_spearman"], abs=1e-3)


def test_training_max_len_never_truncates_evaluation(kosimcse, tiny_bert, synthetic_data, tmp_path, capsys):
    """--max_len 6 cuts the training sentences, but the dev set and the saved model keep the model's own
    limit (64 positions for tiny_bert): every dev sentence stays whole."""
    out = str(tmp_path / "short")
    kosimcse.train.main(["--model", tiny_bert, "--data_dir", synthetic_data, "--output_dir", out, "--mode", "unsup",
                         "--max_len", "6", "--batch_size", "8", "--max_steps", "2", "--eval_steps", "2"])
    printed = capsys.readouterr().out
    assert "training sentences were longer than --max_len 6 tokens and were truncated" in printed
    assert "dev pairs, 0 of 240 sentences truncated at 64 tokens" in printed
    config = json.load(open(os.path.join(out, "best_model", "sentence_bert_config.json")))
    assert config["max_seq_length"] == 64
    assert json.load(open(os.path.join(out, "args.json")))["max_len"] == 6

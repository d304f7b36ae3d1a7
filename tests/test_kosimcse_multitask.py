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


@pytest.mark.slow
def test_multitask_interleaves_contrastive_and_sts_batches(kosimcse, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "multi")
    # 160 triplets / 16 = 10 NLI batches, 120 STS pairs / 8 = 15 STS batches: 25 steps an epoch
    kosimcse.train.main(common(tiny_bert, synthetic_data, out, "--mode", "multitask"))
    log = [e for e in read_log(out) if "loss" in e]
    kinds = ["sts" if "loss_sts" in e else "sup" for e in log]
    assert kinds == [["sup", "sts"][i] for i in kosimcse.stages.interleave([10, 15])]
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


@pytest.mark.slow
def test_sup_sts_continues_from_the_best_sup_checkpoint(kosimcse, tiny_bert, synthetic_data, tmp_path, capsys):
    out = str(tmp_path / "seq")
    kosimcse.train.main(common(tiny_bert, synthetic_data, out, "--mode", "sup_sts", "--epochs", "1",
                               "--sts_epochs", "1", "--sts_lr", "5e-4"))
    log = read_log(out)
    assert [(e["stage"], e["step"]) for e in log if "dev" in e] == [("sup", 10), ("sts", 15)]
    assert [e["lr"] for e in log if e["stage"] == "sts" and e["step"] == 1] == [pytest.approx(5e-4)]  # --sts_lr
    assert os.path.isdir(os.path.join(out, "sup_model")) and os.path.isdir(os.path.join(out, "best_model"))
    assert "[sts] continuing from sup_model" in capsys.readouterr().out


@pytest.mark.slow
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
    make = lambda protocol: kosimcse.dev.DevEvaluator(  # noqa: E731
        "korsts-dev", synthetic_data, tok, 64, 32, "cpu", None, protocol, bmk_batch=16, seed=3, log=lambda m: None)
    bmk, standard = make("bmk")(model), make("standard")(model)
    pairs = kosimcse.data.read_sts(os.path.join(synthetic_data, "KorSTS", "sts-dev.tsv"))
    emb = kosimcse.encoding.encode(model.eval(), tok, [p[0] for p in pairs] + [p[1] for p in pairs], 64)
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


@pytest.mark.slow
def test_early_stop_evals_ends_the_stage_and_resumes_exactly(kosimcse, tiny_bert, synthetic_data, tmp_path, capsys):
    """--early_stop_evals 3 with lr 1e-30 (below every weight's float32 step, so every dev score equals the
    first): evaluations at steps 1-4, the
    counter reaches 3 at step 4 and the run ends there with its best model (BM-K's patience rule). A run
    killed after its step-2 checkpoint resumes with the counter it had (1), so it stops at step 4 too."""
    def argv(out):
        return ["--model", tiny_bert, "--data_dir", synthetic_data, "--output_dir", out, "--mode", "unsup",
                "--batch_size", "8", "--max_len", "24", "--max_steps", "12", "--eval_steps", "1", "--save_steps", "2",
                "--lr", "1e-30", "--early_stop_evals", "3", "--logging_steps", "1", "--device", "cpu"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    kosimcse.train.main(argv(a))
    assert "early stop at step 4: 3 evaluations without a better dev score" in capsys.readouterr().out
    crash_after_first_checkpoint(kosimcse.train, argv(b))  # killed right after step 2's checkpoint
    kosimcse.train.main(["--resume", b])
    for out in (a, b):
        log = read_log(out)
        assert [e["step"] for e in log if "dev" in e] == [1, 2, 3, 4] and max(e["step"] for e in log) == 4
        assert os.path.isdir(os.path.join(out, "best_model")) and not os.path.isdir(os.path.join(out, "checkpoint"))
    never = str(tmp_path / "never")
    kosimcse.train.main(argv(never) + ["--early_stop_evals", "0", "--max_steps", "6"])  # 0: no early stop
    assert [e["step"] for e in read_log(never) if "dev" in e] == [1, 2, 3, 4, 5, 6]


class FakeSource:
    """A stand-in Source: its batch ``b`` of pass ``k`` is the tuple (name, k, b)."""

    def __init__(self, name, n):
        self.name, self.plan = name, range(n)

    def loader(self, epoch, start, num_workers=0, pin_memory=False):
        return iter([(self.name, epoch, b) for b in range(start, len(self.plan))])


def sentence_transformers_fit_order(sizes, epochs):
    """The batch order of sentence-transformers' fit(train_objectives=[...]) (2.x SentenceTransformer.fit,
    the version jhgan's training_multi-task.py ran), transcribed: steps_per_epoch = min(len(dataloader));
    data_iterators made once before the epoch loop; every step takes next() of each objective in order, and
    an exhausted iterator is replaced by a new iter(dataloader) (a new shuffle: pass k + 1)."""
    passes = [0] * len(sizes)

    def new_pass(i):
        passes[i] += 1
        return iter([(f"s{i}", passes[i] - 1, b) for b in range(sizes[i])])
    iterators = [new_pass(i) for i in range(len(sizes))]
    order = []
    for _ in range(epochs):
        for _ in range(min(sizes)):
            for i in range(len(sizes)):
                try:
                    data = next(iterators[i])
                except StopIteration:
                    iterators[i] = new_pass(i)
                    data = next(iterators[i])
                order.append(data)
    return order


@pytest.mark.parametrize("sizes", [(4, 7), (7, 3), (5, 5)])
def test_paired_schedule_is_sentence_transformers_fit_order(kosimcse, sizes):
    """--multitask_schedule paired: the batches of 3 epochs (each source's pass and batch) equal
    sentence-transformers' multi-objective fit rule, from the start and from any step (--resume)."""
    ru = kosimcse.stages
    sources = [FakeSource(f"s{i}", n) for i, n in enumerate(sizes)]
    schedule = ru.interleave(list(sizes), "paired")
    assert schedule == [0, 1] * min(sizes)
    total = 3 * len(schedule)
    ours = [batch for _, _, batch in ru.stage_batches(sources, schedule, 0, total)]
    assert ours == sentence_transformers_fit_order(sizes, 3)
    for step in range(total):
        assert [b for _, _, b in ru.stage_batches(sources, schedule, step, total)] == ours[step:], step
    epochs = [epoch for epoch, _, _ in ru.stage_batches(sources, schedule, 0, total)]
    assert epochs == [e for e in range(3) for _ in schedule]
    proportional = ru.interleave(list(sizes))  # unchanged: every epoch is pass e of every source
    got = list(ru.stage_batches(sources, proportional, 0, 2 * len(proportional)))
    assert all(batch[1] == epoch for epoch, _, batch in got)


@pytest.mark.slow
def test_paired_multitask_has_an_optimizer_per_source_and_resumes_exactly(kosimcse, tiny_bert, synthetic_data,
                                                                         tmp_path):
    """10 NLI and 15 STS batches: 10 rounds of (NLI, STS) an epoch, 20 steps. Each source has its own
    AdamW and linear schedule over its own 10 steps a epoch (sentence-transformers' fit), both in the
    checkpoint; a run killed after its first checkpoint resumes to the same losses and dev scores."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ["--mode", "multitask", "--multitask_schedule", "paired", "--epochs", "2", "--eval_steps", "8",
             "--keep_checkpoint"]
    kosimcse.train.main(common(tiny_bert, synthetic_data, a, *extra))
    log = [e for e in read_log(a) if "loss" in e]
    assert ["sts" if "loss_sts" in e else "sup" for e in log] == ["sup", "sts"] * 20
    lrs = [e["lr"] for e in log]  # each source's schedule: warmup over 2 of its own 20 steps (the preset's
    assert lrs[0::2] == lrs[1::2]  # 0.1), then linear decay to 0 (one shared schedule would warm up over 4 of 40)
    assert (lrs[0], lrs[2], lrs[-1]) == (pytest.approx(5e-4), pytest.approx(1e-3), pytest.approx(0.0))
    state = torch.load(os.path.join(a, "checkpoint", "state.pt"), weights_only=False)
    assert isinstance(state["optimizer"], list) and len(state["optimizer"]) == 2
    assert [s["state"][0]["step"].item() for s in state["optimizer"]] == [20, 20]  # each stepped on its own batches
    crash_after_first_checkpoint(kosimcse.train, common(tiny_bert, synthetic_data, b, *extra))
    kosimcse.train.main(["--resume", b])
    la, lb = read_log(a), read_log(b)
    assert [e["step"] for e in la] == [e["step"] for e in lb]
    for x, y in zip(la, lb):
        if "loss" in x:
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-5), x["step"]
        if "dev" in x:
            assert y["dev"]["avg"] == pytest.approx(x["dev"]["avg"], abs=1e-5), x["step"]

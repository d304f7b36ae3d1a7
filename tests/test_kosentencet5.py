"""KoSentenceT5: tiny random T5 and BART with locally trained tokenizers -- shapes, padding-invariant
pooling, loss, train -> save -> SentenceTransformer reload, evaluation row."""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import crash_after_first_checkpoint, load_method, seq2seq_tokenizer


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return load_method("KoSentenceT5")


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    from transformers import BartConfig, BartModel
    out = str(tmp_path_factory.mktemp("tiny-bart"))
    tok = seq2seq_tokenizer(out, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>")
    torch.manual_seed(0)
    BartModel(BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, decoder_start_token_id=2)).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch, st5_head", [("t5", False), ("t5", True), ("bart", False)])
def test_shapes_and_padding_is_masked_out(t5, tiny_t5, tiny_bart, arch, st5_head):
    from transformers import AutoTokenizer
    path = tiny_t5 if arch == "t5" else tiny_bart
    model = t5.model.SentenceT5.from_pretrained(path, arch=arch, st5_head=st5_head).eval()
    if arch == "t5":
        assert type(model.backbone).__name__ == "T5EncoderModel"
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["사과 바나나 포도.", "기차."], padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = model(**batch)
        assert emb.shape == (2, 32)
        if st5_head:
            assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
        changed = batch["input_ids"].clone()
        changed[batch["attention_mask"] == 0] = 7  # other tokens at padded positions
        assert (batch["attention_mask"] == 0).any()
        if arch == "t5":  # an encoder with masked attention: padded positions cannot matter
            torch.testing.assert_close(model(changed, batch["attention_mask"]), emb)
        # and a sentence embeds the same alone as padded inside a batch
        alone = tok(["기차."], return_tensors="pt")
        torch.testing.assert_close(model(**alone)[0], emb[1], atol=1e-5, rtol=1e-5)


def test_arch_mismatch_is_a_clear_error(t5, tiny_t5, tiny_bart):
    with pytest.raises(ValueError, match="--arch t5 needs a T5"):
        t5.model.SentenceT5.from_pretrained(tiny_bart, arch="t5")
    with pytest.raises(ValueError, match="--arch bart needs a BART-like"):
        t5.model.SentenceT5.from_pretrained(tiny_t5, arch="bart")


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoding_in_length_buckets_equals_one_pass(t5, tiny_t5, tiny_bart, arch):
    """Cutting the padding columns a bucket does not need changes nothing: T5's relative attention and
    BART's causal decoder over the shifted input both leave real positions alone."""
    from transformers import AutoTokenizer
    path = tiny_t5 if arch == "t5" else tiny_bart
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["사과.", " ".join(["바다 파도 모래"] * 6), "기차 역.", " ".join(["축구 공 골"] * 5), "비.", "책 작가."] * 3
    batch = tok(texts, padding=True, return_tensors="pt")
    outputs = []
    for bucket_tokens in (0, 16):
        torch.manual_seed(0)
        model = t5.model.SentenceT5.from_pretrained(path, arch=arch, st5_head=True, bucket_tokens=bucket_tokens).eval()
        emb = model(batch["input_ids"], batch["attention_mask"])
        emb.sum().backward()
        outputs.append((emb.detach(), model.head.weight.grad))
    assert len(t5.encoding.length_buckets(batch["attention_mask"].sum(1), 16)) > 2
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], atol=1e-5, rtol=1e-4)


def test_loss_matches_hand_computation(t5):
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])  # anchors a1 a2, positives p1 p2
    tau = 0.05
    c = 1 / math.sqrt(2)
    want = (-math.log(math.exp(c / tau) / (math.exp(c / tau) + 1))
            - math.log(math.exp(1 / tau) / (math.exp(c / tau) + math.exp(1 / tau)))) / 2
    assert t5.model.contrastive_loss(z, 2, tau).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch, extra", [("t5", []), ("t5", ["--st5_head"]), ("bart", [])])
def test_train_save_reload_and_evaluate(t5, tiny_t5, tiny_bart, synthetic_data, tmp_path, arch, extra):
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer
    out = str(tmp_path / "run")
    t5.train.main(["--model", tiny_t5 if arch == "t5" else tiny_bart, "--arch", arch, *extra, "--mode", "sup",
                   "--data_dir", synthetic_data, "--train_file", "KorNLI/nli.train.ko.tsv", "--output_dir", out,
                   "--batch_size", "16", "--max_len", "24", "--max_steps", "30", "--eval_steps", "15",
                   "--lr", "1e-3", "--warmup_ratio", "0.1", "--seed", "0"])
    best = os.path.join(out, "best_model")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.load(open(os.path.join(best, "modules.json")))]
    assert modules == (["Transformer", "Pooling", "Dense", "Normalize"] if extra else ["Transformer", "Pooling"])
    sentences = ["사과 바나나 포도.", "기차 역 승객 표 출발.", '"슈퍼맨" 셔츠를 입은 개가 뛴다.']
    ev = t5.evaluation
    ours = t5.encoding.encode(ev.FolderEncoder(best).eval(), AutoTokenizer.from_pretrained(best), sentences, 24)
    theirs = st.SentenceTransformer(best, device="cpu").encode(sentences)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    if arch == "t5":
        assert type(st.SentenceTransformer(best, device="cpu")[0].auto_model).__name__ == "T5EncoderModel"
    rows_json = os.path.join(out, "test.json")
    ev.main(["--model_dir", best, "--data_dir", synthetic_data, "--dataset", "korsts-test", "--output_json", rows_json])
    row = json.load(open(rows_json))[0]
    assert row["n_pairs"] == 120 and set(t5.sts.METRICS) <= set(row["metrics"])


@pytest.mark.slow
def test_training_beats_untrained_on_held_out_pairs(t5, tiny_t5, synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    common = ["--data_dir", synthetic_data, "--dataset", "korsts-test", "--output_json"]
    t5.evaluation.main(["--model_dir", tiny_t5, "--pooling", "mean", *common, str(tmp_path / "before.json")])
    t5.train.main(["--model", tiny_t5, "--mode", "sup", "--data_dir", synthetic_data, "--train_file",
                   "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "16", "--max_len", "24",
                   "--max_steps", "80", "--eval_steps", "40", "--lr", "1e-3", "--warmup_ratio", "0.1", "--seed", "0"])
    t5.evaluation.main(["--model_dir", os.path.join(out, "best_model"), *common, str(tmp_path / "after.json")])
    before, after = (json.load(open(tmp_path / f"{n}.json"))[0]["metrics"]["cosine_spearman"] for n in ("before", "after"))
    assert after > before + 10, (before, after)


@pytest.mark.slow
def test_ddp_step_equals_single_process_on_the_global_batch(tiny_t5, tmp_path):
    """torchrun (gloo, 2 processes, embeddings all-gathered) vs one process on the same global batch."""
    import subprocess
    import sys
    from conftest import ROOT, torchrun
    script, method = os.path.join(ROOT, "tests", "scripts", "ddp_step.py"), os.path.join(ROOT, "KoSentenceT5")
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    run = subprocess.run([sys.executable, script, method, tiny_t5, single], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    run = torchrun(script, method, tiny_t5, double)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(single), torch.load(double)
    assert b["loss"].item() == pytest.approx(a["loss"].item(), abs=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and any(k.startswith("head.") or "dense" in k for k in a["grads"])
    worst = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_torchrun_training_end_to_end(tiny_t5, synthetic_data, tmp_path):
    from conftest import ROOT, torchrun
    out = str(tmp_path / "ddp")
    run = torchrun(os.path.join(ROOT, "KoSentenceT5", "train.py"), "--model", tiny_t5, "--mode", "sup",
                   "--data_dir", synthetic_data, "--train_file", "KorNLI/nli.train.ko.tsv", "--output_dir", out,
                   "--batch_size", "16", "--max_len", "24", "--max_steps", "4", "--eval_steps", "2", "--device", "cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes x 8" in run.stderr + run.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [e["step"] for e in log if "dev" in e] == [2, 4]  # one log, from rank 0 only
    assert os.path.isfile(os.path.join(out, "best_model", "model.safetensors"))


@pytest.mark.slow
def test_resume_after_a_crash_reaches_the_same_result(t5, tiny_t5, synthetic_data, tmp_path):
    def args(out):
        return ["--model", tiny_t5, "--mode", "sup", "--data_dir", synthetic_data, "--train_file",
                "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "16", "--max_len", "24",
                "--max_steps", "9", "--eval_steps", "3", "--save_steps", "2", "--logging_steps", "1", "--lr", "1e-3",
                "--device", "cpu"]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    t5.train.main(args(straight))
    crash_after_first_checkpoint(t5.train, args(crashed))  # killed right after step 2's checkpoint
    t5.train.main(["--resume", crashed])
    a, b = ([json.loads(x) for x in open(os.path.join(d, "train_log.jsonl"))] for d in (straight, crashed))
    assert [e["step"] for e in a] == [e["step"] for e in b] and len(a) == 9 + 3
    for x, y in zip(a, b):  # every loss after the resume and every dev score as if never interrupted
        assert y.get("loss") == pytest.approx(x.get("loss"), abs=1e-6), x["step"]
        for key in x.get("dev", {}):
            assert y["dev"][key] == pytest.approx(x["dev"][key], abs=1e-6), (x["step"], key)

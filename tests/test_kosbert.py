"""KoSBERT: the two SBERT objectives by hand, the multitask mixing, training end to end for every task,
saved-model loading in transformers and sentence-transformers, and the readers on the real data."""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import load_method, readers


@pytest.fixture(scope="module")
def kosbert():
    return load_method("KoSBERT")


def run_train(kosbert, model, data, out, *extra):
    args = ["--model", model, "--data_dir", data, "--output_dir", out, "--batch_size", "16",
            "--eval_batch_size", "64", "--max_len", "24", "--seed", "0", "--logging_steps", "2", *extra]
    kosbert.train.main(args)
    return os.path.join(out, "best_model")


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


# --- objectives --------------------------------------------------------------------------------------

def test_softmax_loss_matches_hand_computation(kosbert):
    m = kosbert.model
    clf = m.SoftmaxClassifier(dim=2, num_labels=3)
    with torch.no_grad():  # features are [u1, u2, v1, v2, |u1-v1|, |u2-v2|]
        clf.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0],
                                              [0, 0, 0, 1, 0, 0],
                                              [0, 0, 0, 0, 1, 1]]))
        clf.linear.bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
    # pairs (u, v): ([1, 0], [0, 2]) with label 1 (entailment); ([2, -1], [1, 1]) with label 0
    emb = torch.tensor([[1.0, 0.0], [2.0, -1.0], [0.0, 2.0], [1.0, 1.0]])
    logits1 = [1.0, 2.0 + 0.5, 1 + 2 - 1.0]   # u1; v2 + .5; |1-0| + |0-2| - 1
    logits2 = [2.0, 1.0 + 0.5, 1 + 2 - 1.0]
    ce = lambda z, y: -z[y] + math.log(sum(math.exp(x) for x in z))
    want = (ce(logits1, 1) + ce(logits2, 0)) / 2
    got = m.softmax_loss(clf, emb, torch.tensor([1, 0]))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert kosbert.dataloader.LABEL_IDS == {"contradiction": 0, "entailment": 1, "neutral": 2}


def test_regression_loss_matches_hand_computation(kosbert):
    # pairs ([1, 0], [1, 1]) gold 4/5 and ([0, 2], [0, -1]) gold 1/5: cosines 1/sqrt(2) and -1
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, -1.0]])
    want = ((1 / math.sqrt(2) - 0.8) ** 2 + (-1 - 0.2) ** 2) / 2
    got = kosbert.model.cosine_regression_loss(emb, torch.tensor([0.8, 0.2]))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_objectives_equal_sentence_transformers_losses(kosbert, tiny_bert):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import losses
    from sentence_transformers.models import Pooling, Transformer
    from transformers import AutoTokenizer
    transformer = Transformer(tiny_bert, max_seq_length=24)
    model = st.SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(),
                                                                 pooling_mode="mean")], device="cpu").eval()
    firsts, seconds = ["사과 바나나 포도.", "기차 역.", "비 우산 구름 날씨 바람."], ["사과 과일.", "책 작가 소설 독서.", "비 천둥."]
    features = [model.tokenize(firsts), model.tokenize(seconds)]
    m, dl = kosbert.model, readers(kosbert)
    encoder, tok = m.SentenceEncoder.from_pretrained(tiny_bert).eval(), AutoTokenizer.from_pretrained(tiny_bert)
    scores, classes = [0.9, 0.1, 0.5], [1, 0, 2]
    items = lambda targets: [dl.PairDataset(tok, list(zip(firsts, seconds, targets)), 24)[i] for i in range(3)]
    with torch.no_grad():
        theirs = losses.CosineSimilarityLoss(model)(features, torch.tensor(scores))
        batch = dl.PairCollator(tok.pad_token_id, torch.float)(items(scores))
        ours = m.cosine_regression_loss(encoder(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
        softmax = losses.SoftmaxLoss(model, sentence_embedding_dimension=32, num_labels=3)
        theirs = softmax(features, torch.tensor(classes))
        classifier = m.SoftmaxClassifier(32)
        classifier.linear.load_state_dict(softmax.classifier.state_dict())
        batch = dl.PairCollator(tok.pad_token_id, torch.long)(items(classes))
        ours = m.softmax_loss(classifier, encoder(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_sts_targets_are_score_over_five(kosbert, synthetic_data):
    dl = readers(kosbert)
    path = os.path.join(synthetic_data, "KorSTS", "sts-train.tsv")
    raw, pairs = dl.read_sts(path), dl.load_sts_pairs(path, log=lambda _: None)
    assert [p[2] for p in pairs] == pytest.approx([r[2] / 5 for r in raw])
    assert all(0 <= p[2] <= 1 for p in pairs)


def test_interleave_is_proportional_round_robin(kosbert):
    order = kosbert.stages.interleave([6, 2])
    assert order == [0, 0, 0, 1, 0, 0, 0, 1]  # STS batches spread evenly through the NLI ones
    assert kosbert.stages.interleave([3]) == [0, 0, 0]
    order = kosbert.stages.interleave([100, 7])
    assert order.count(1) == 7 and max(np.diff([i for i, s in enumerate(order) if s == 1])) <= 16


# --- training end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sts_run(kosbert, tiny_bert, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sts"))  # 120 pairs, batch 16: 8 batches an epoch
    best = run_train(kosbert, tiny_bert, synthetic_data, out, "--mode", "sts", "--sts_epochs", "6",
                     "--eval_steps", "20", "--lr", "2e-3")
    return out, best


@pytest.mark.slow
def test_sts_training_improves_held_out_pairs_and_logs(kosbert, tiny_bert, synthetic_data, sts_run, capsys):
    out, best = sts_run
    log = read_log(out)
    # every 20 steps and at the end of each 8-step epoch, once per step
    assert [e["step"] for e in log if "dev" in e] == [8, 16, 20, 24, 32, 40, 48]
    losses = [e["loss"] for e in log if "loss" in e]  # one source: no per-source loss_sts field
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert sorted(os.listdir(best)) == sorted(["1_Pooling", "README.md", "config.json", "eval_results.json",
                                               "model.safetensors", "modules.json", "sentence_bert_config.json",
                                               "tokenizer.json", "tokenizer_config.json", "training.json"])
    scores = {}
    for name, folder, pooler in (("before", tiny_bert, ["--pooling", "mean"]), ("after", best, [])):
        rows_json = os.path.join(out, f"{name}.json")
        kosbert.evaluation.main(["--model_dir", folder, "--data_dir", synthetic_data, "--dataset", "korsts-test",
                                 "--output_json", rows_json, *pooler])
        rows = json.load(open(rows_json))
        assert len(rows) == 1 and rows[0]["protocol"] == "standard" and rows[0]["n_pairs"] == 120
        scores[name] = rows[0]["metrics"]["cosine_spearman"]
    assert "| AVG | cosP | cosS | eucP | eucS | manP | manS | dotP | dotS |" in capsys.readouterr().out
    assert scores["after"] > scores["before"] + 10, scores  # test split: pairs never seen in training


def assert_loads_equal(best, sentences=("사과 바나나 포도.", "기차 역 승객 표 출발.", '"슈퍼맨" 셔츠를 입은 개가 뛴다.')):
    from transformers import AutoModel, AutoTokenizer
    sentences = list(sentences)
    tok, hf = AutoTokenizer.from_pretrained(best), AutoModel.from_pretrained(best).eval()
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():  # mean pooling by hand from plain transformers
        hidden = hf(**batch)[0]
    mask = batch["attention_mask"].unsqueeze(-1)
    manual = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    st_module = pytest.importorskip("sentence_transformers")
    st = st_module.SentenceTransformer(best, device="cpu")
    np.testing.assert_allclose(st.encode(sentences, batch_size=2), manual, atol=1e-5)


def test_sts_model_loads_in_transformers_and_sentence_transformers(sts_run):
    assert_loads_equal(sts_run[1])


@pytest.mark.slow
def test_nli_task_trains_classifier_but_saves_encoder_only(kosbert, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "nli")
    best = run_train(kosbert, tiny_bert, synthetic_data, out, "--mode", "nli", "--train_file",
                     "KorNLI/nli.train.ko.tsv", "--max_steps", "12", "--eval_steps", "6", "--lr", "1e-3",
                     "--max_train_samples", "300")
    log = read_log(out)
    assert [e["step"] for e in log if "dev" in e] == [6, 12]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 6 and np.isfinite(losses).all()  # logged every 2 steps (run_train), one source
    modules = json.load(open(os.path.join(best, "modules.json")))
    assert [m["path"] for m in modules] == ["", "1_Pooling"]  # no classifier in the saved model
    assert_loads_equal(best)


@pytest.mark.slow
def test_nli_sts_continues_from_best_nli_checkpoint(kosbert, tiny_bert, synthetic_data, tmp_path, capsys):
    out = str(tmp_path / "nli_sts")
    best = run_train(kosbert, tiny_bert, synthetic_data, out, "--mode", "nli_sts", "--nli_file",
                     "KorNLI/nli.train.ko.tsv", "--max_train_samples", "160", "--nli_epochs", "1",
                     "--sts_epochs", "1", "--eval_steps", "1000", "--lr", "1e-3")
    log = read_log(out)
    assert [(e["stage"], e["step"]) for e in log if "dev" in e] == [("nli", 10), ("sts", 8)]
    assert os.path.isdir(os.path.join(out, "nli_model")) and os.path.isdir(best)
    assert "continuing from" in capsys.readouterr().out
    assert_loads_equal(best)


@pytest.mark.slow
def test_multitask_alternates_both_sources(kosbert, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "multi")
    # NLI 300 pairs -> 19 batches, STS 120 pairs -> 8 batches: 27 steps, 8 of them STS
    run_train(kosbert, tiny_bert, synthetic_data, out, "--mode", "multitask", "--nli_file",
              "KorNLI/nli.train.ko.tsv", "--max_train_samples", "300", "--eval_steps", "1000", "--lr", "1e-3",
              "--logging_steps", "1")
    log = [e for e in read_log(out) if "loss" in e]
    kinds = [("nli" if "loss_nli" in e else "sts") for e in log]
    assert len(kinds) == 27 and kinds.count("sts") == 8
    assert kinds == ["nli" if i == 0 else "sts" for i in kosbert.stages.interleave([19, 8])]
    nli, sts = [e["loss_nli"] for e in log if "loss_nli" in e], [e["loss_sts"] for e in log if "loss_sts" in e]
    assert len(set(nli)) > 1 and len(set(sts)) > 1  # both losses computed and moving
    assert [e["step"] for e in read_log(out) if "dev" in e] == [27]


def test_refuses_to_overwrite_and_reports_bad_model(kosbert, tiny_bert, synthetic_data, sts_run, tmp_path):
    out, best = sts_run
    before = os.path.getmtime(os.path.join(best, "model.safetensors"))
    with pytest.raises(SystemExit, match="already holds a run"):
        run_train(kosbert, tiny_bert, synthetic_data, out, "--mode", "sts")
    assert os.path.getmtime(os.path.join(best, "model.safetensors")) == before
    with pytest.raises(SystemExit, match="cannot load model"):
        run_train(kosbert, str(tmp_path / "missing"), synthetic_data, str(tmp_path / "o"), "--mode", "sts")
    with pytest.raises(SystemExit, match="file not found"):
        run_train(kosbert, tiny_bert, synthetic_data, str(tmp_path / "o"), "--mode", "sts", "--train_file", "no.tsv")
    assert not os.path.exists(tmp_path / "o")  # a failed start leaves nothing that blocks the next attempt
    with pytest.raises(SystemExit):  # --train_file is ambiguous for the two-source tasks
        kosbert.train.parse_args(["--mode", "multitask", "--train_file", "x.tsv"])


def test_pooler_refuses_randomly_initialised_pooler(kosbert, tiny_bert, tmp_path):
    from transformers import AutoModel
    AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False).save_pretrained(tmp_path / "nopool")
    with pytest.raises(ValueError, match="no trained pooler weights"):
        kosbert.model.SentenceEncoder.from_pretrained(str(tmp_path / "nopool"), pooler="pooler")
    assert kosbert.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="pooler").pooler == "pooler"


def test_search_cli_on_trained_model(kosbert, sts_run, capsys):
    kosbert.evaluation.main(["--model_dir", sts_run[1], "--task", "search", "--top_k", "2"])
    out = capsys.readouterr().out
    assert out.count("Query:") == 3 and "Top 2 most similar sentences in corpus:" in out


# --- real data ---------------------------------------------------------------------------------------

def test_real_data_parsing(kosbert, shared_data):
    dl = readers(kosbert)
    log = lambda _: None
    train = dl.load_sts_pairs(dl.resolve_path("korsts-train", shared_data), log=log)
    assert len(train) == 5749 and all(0 <= p[2] <= 1 for p in train)
    counts = {name: len(dl.read_sts(dl.resolve_path(name, shared_data)))
              for name in ("korsts-dev", "korsts-test", "klue-sts-dev")}
    assert counts == {"korsts-dev": 1500, "korsts-test": 1379, "klue-sts-dev": 519}
    xnli = dl.load_nli_pairs([os.path.join(shared_data, "KorNLI", "xnli.dev.ko.tsv")], log=log)
    klue = dl.load_nli_pairs([os.path.join(shared_data, "KLUE-NLI", "klue-nli-v1.1_dev.json")], log=log)
    for pairs in (xnli, klue):  # both sets are balanced over the three classes
        counts = np.bincount([p[2] for p in pairs], minlength=3)
        assert counts.min() == counts.max() and len(pairs) == 3 * counts[0]

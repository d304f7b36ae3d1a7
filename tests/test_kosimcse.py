"""KoSimCSE: loss, metrics, protocols, training end to end, saved-model loading, search, clustering."""
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import run_train


def test_contrastive_loss_matches_hand_computation(kosimcse):
    # B=2 triplets, d=2: rows are [a1, a2, p1, p2, n1, n2].
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 0.0]])
    tau = 0.05
    s = 1 / math.sqrt(2)
    # cosine of a1 with [p1, p2, n1, n2] = [s, 0, -1, 1]; of a2 = [s, 1, 0, 0]
    loss1 = -math.log(math.exp(s / tau) / sum(math.exp(c / tau) for c in (s, 0, -1, 1)))
    loss2 = -math.log(math.exp(1 / tau) / sum(math.exp(c / tau) for c in (s, 1, 0, 0)))
    got = kosimcse.model.contrastive_loss(z, num_columns=3, temperature=tau)
    assert got.item() == pytest.approx((loss1 + loss2) / 2, rel=1e-5)
    # Unsupervised: two columns, (B, B) logits.
    z2 = z[:4]
    loss_u = (-math.log(math.exp(s / tau) / (math.exp(s / tau) + 1))
              - math.log(math.exp(1 / tau) / (math.exp(s / tau) + math.exp(1 / tau)))) / 2
    assert kosimcse.model.contrastive_loss(z2, 2, tau).item() == pytest.approx(loss_u, rel=1e-5)


def test_sup_training_improves_held_out_sts_and_logs(kosimcse, tiny_bert, synthetic_data, sup_run, capsys):
    out, best = sup_run
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [e["step"] for e in log if "dev" in e] == [50, 100, 150]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    ev = kosimcse.evaluation
    scores = {}
    for name, folder, pooler in (("before", tiny_bert, "mean"), ("after", best, None)):
        rows_json = os.path.join(out, f"{name}.json")
        args = ["--model_dir", folder, "--data_dir", synthetic_data, "--dataset", "korsts-test", "--output_json",
                rows_json, "--protocol", "standard", "bmk", "--batch_size", "50"]
        ev.main(args + (["--pooling", pooler] if pooler else []))
        rows = json.load(open(rows_json))
        assert [r["protocol"] for r in rows] == ["standard", "bmk"]
        scores[name] = rows[0]["metrics"]["cosine_spearman"]
    printed = capsys.readouterr().out
    assert "| AVG | cosP | cosS | eucP | eucS | manP | manS | dotP | dotS |" in printed
    assert scores["after"] > scores["before"] + 10, scores  # test split: pairs never seen in training


def test_saved_model_loads_in_transformers_and_sentence_transformers(kosimcse, sup_run):
    from transformers import AutoModel, AutoTokenizer
    _, best = sup_run
    sentences = ["사과 바나나 포도.", "기차 역 승객 표 출발.", '"슈퍼맨" 셔츠를 입은 개가 뛴다.']
    ours = kosimcse.encoding.encode(kosimcse.evaluation.FolderEncoder(best).eval(),
                                      AutoTokenizer.from_pretrained(best), sentences, 24)
    tok, hf = AutoTokenizer.from_pretrained(best), AutoModel.from_pretrained(best).eval()
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():  # mean pooling by hand from plain transformers
        hidden = hf(**batch)[0]
    mask = batch["attention_mask"].unsqueeze(-1)
    np.testing.assert_allclose(ours, ((hidden * mask).sum(1) / mask.sum(1)).numpy(), atol=1e-5)
    st_module = pytest.importorskip("sentence_transformers")
    st = st_module.SentenceTransformer(best, device="cpu")
    np.testing.assert_allclose(ours, st.encode(sentences, batch_size=2), atol=1e-5)


@pytest.mark.slow
def test_unsup_mlp_only_train_saves_raw_cls(kosimcse, tiny_bert, synthetic_data, tmp_path):
    best = run_train(kosimcse, tiny_bert, synthetic_data, str(tmp_path / "unsup"), "--mode", "unsup",
                     "--max_steps", "6", "--eval_steps", "3", "--max_train_samples", "200")
    modules = json.load(open(os.path.join(best, "modules.json")))
    assert [m["path"] for m in modules] == ["", "1_Pooling"]  # the MLP is not part of the saved model
    from transformers import AutoModel, AutoTokenizer
    tok, hf = AutoTokenizer.from_pretrained(best), AutoModel.from_pretrained(best).eval()
    sentences = ["바다 파도.", "책 도서관 작가 소설."]
    ours = kosimcse.encoding.encode(kosimcse.evaluation.FolderEncoder(best).eval(), tok, sentences, 24)
    with torch.no_grad():  # the README quick-tour snippet on a CLS-pooled model
        quick = hf(**tok(sentences, padding=True, truncation=True, return_tensors="pt"), return_dict=False)[0][:, 0]
    np.testing.assert_allclose(ours, quick.numpy(), atol=1e-5)
    st_module = pytest.importorskip("sentence_transformers")
    np.testing.assert_allclose(ours, st_module.SentenceTransformer(best, device="cpu").encode(sentences), atol=1e-5)


def test_cls_with_mlp_kept_is_saved_as_dense(kosimcse, tiny_bert, synthetic_data, tmp_path):
    best = run_train(kosimcse, tiny_bert, synthetic_data, str(tmp_path / "mlp"), "--mode", "sup", "--train_file",
                     "KorNLI/nli.train.ko.tsv", "--max_steps", "3", "--eval_steps", "3", "--pooler", "cls",
                     "--no-mlp_only_train")
    st_module = pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer
    ours = kosimcse.encoding.encode(kosimcse.evaluation.FolderEncoder(best).eval(),
                                      AutoTokenizer.from_pretrained(best), ["바다 파도.", "책 작가."], 24)
    assert os.path.isdir(os.path.join(best, "2_Dense"))
    np.testing.assert_allclose(ours, st_module.SentenceTransformer(best, device="cpu").encode(["바다 파도.", "책 작가."]),
                               atol=1e-5)


def test_refuses_to_overwrite_an_earlier_run(kosimcse, tiny_bert, synthetic_data, sup_run):
    out, best = sup_run
    before = os.path.getmtime(os.path.join(best, "model.safetensors"))
    with pytest.raises(SystemExit, match="already holds a run"):
        run_train(kosimcse, tiny_bert, synthetic_data, out, "--mode", "sup", "--train_file", "KorNLI/nli.train.ko.tsv")
    assert os.path.getmtime(os.path.join(best, "model.safetensors")) == before


def test_model_folder_without_tokenizer_is_a_clear_error(kosimcse, synthetic_data, tmp_path):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="cannot load model"):
        run_train(kosimcse, str(tmp_path / "m"), synthetic_data, str(tmp_path / "out"), "--mode", "unsup")


def test_length_buckets_are_the_fewest_padded_tokens_under_the_minimum(kosimcse):
    import itertools
    lengths = torch.tensor([5, 30, 6, 29, 12, 31, 7, 11, 30, 5, 6, 6])
    for min_tokens in (1, 20, 60, 150, 1000):
        groups = kosimcse.encoding.length_buckets(lengths, min_tokens)
        rows = torch.cat([idx for idx, _ in groups])
        assert sorted(rows.tolist()) == list(range(len(lengths)))
        for i, (idx, padded) in enumerate(groups):
            assert padded == lengths[idx].max().item()
            assert i == 0 or len(idx) * padded >= min_tokens  # only the longest rows' group may be smaller
        # brute force over every cut of the length-sorted distinct values
        values = sorted(set(lengths.tolist()), reverse=True)
        counts = [int((lengths == v).sum()) for v in values]
        best = math.inf
        for cuts in itertools.product((0, 1), repeat=len(values) - 1):
            bounds = [0] + [k + 1 for k, c in enumerate(cuts) if c] + [len(values)]
            parts = [(values[x], sum(counts[x:y])) for x, y in zip(bounds, bounds[1:])]
            if all(w * n >= min_tokens for w, n in parts[1:]):
                best = min(best, sum(w * n for w, n in parts))
        assert sum(len(idx) * p for idx, p in groups) == best, min_tokens
    assert len(kosimcse.encoding.length_buckets(lengths, 1000)) == 1
    assert kosimcse.encoding.length_buckets(lengths, 0)[0][1] == 31 and len(kosimcse.encoding.length_buckets(lengths, 0)) == 1


def test_encoding_in_length_buckets_equals_one_pass(kosimcse, tiny_bert):
    """Same embeddings and the same gradients as one pass over the whole padded batch."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["사과.", " ".join(["바다 파도 모래"] * 6), "기차 역.", " ".join(["축구 공 골"] * 5), "비.", "책 작가 소설."]
    batch = tok(texts * 4, padding=True, return_tensors="pt")
    results = []
    for bucket_tokens in (0, 16):
        torch.manual_seed(0)
        model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="mean", bucket_tokens=bucket_tokens)
        model.eval()  # no dropout: both runs deterministic
        emb = model(batch["input_ids"], batch["attention_mask"])
        emb.pow(2).sum().backward()
        results.append((emb.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    lengths = batch["attention_mask"].sum(1)
    assert len(kosimcse.encoding.length_buckets(lengths, 16)) > 2
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sup_step_equals_sentence_transformers_mnrl(kosimcse, tiny_bert):
    """Without dropout, one supervised step of ours (one bucketed forward over all 3B sentences, InfoNCE
    at tau 0.05) and of sentence-transformers' MultipleNegativesRankingLoss(scale=20) with hard negatives
    (one forward per column) give the same loss and the same gradients: any gap between trained models
    can only come from the dropout masks."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import losses
    from sentence_transformers.models import Pooling, Transformer
    from transformers import AutoTokenizer
    columns = [["사과 바나나 포도 딸기 수박 과일 그리고.", "기차 역.", "비 우산 구름."],
               ["사과 과일.", "기차 승객 표 출발 역 선로.", "비 천둥 날씨."],
               ["축구 공.", "책 작가.", "고양이 강아지 먹이 꼬리 산책."]]
    transformer = Transformer(tiny_bert, max_seq_length=24)
    theirs_model = st.SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu")
    theirs_model.eval()
    loss = losses.MultipleNegativesRankingLoss(theirs_model, scale=20.0)(
        [theirs_model.tokenize(c) for c in columns], torch.zeros(3))
    loss.backward()
    theirs = {n: p.grad for n, p in transformer.auto_model.named_parameters() if p.grad is not None}

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler="mean", bucket_tokens=8).eval()
    # ContrastiveDataset reads (anchor, positive, negative) as consecutive rows: interleave the columns
    tokenized = kosimcse.data.TokenizedTexts(tok, [c[i] for i in range(3) for c in columns], 24)
    dataset = kosimcse.dataloader.ContrastiveDataset(tokenized, 3)
    batch = kosimcse.data.ColumnCollator(tok.pad_token_id)([dataset[i] for i in range(3)])
    ours_loss = kosimcse.model.contrastive_loss(model(**batch), 3, 0.05)
    ours_loss.backward()
    assert ours_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    ours = {n: p.grad for n, p in model.backbone.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and len(ours) > 20
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)



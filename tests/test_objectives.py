"""The newer objectives (issue 23): CoSENT, AnglE, hardness-weighted and multi-directional InfoNCE and
Matryoshka equal sentence-transformers' losses (loss and every embedding gradient), driven through the ST
loss modules themselves with a stub model that returns given embeddings; the constants that define them
(scale, pair mask, hardness mask, weights) are pinned; DDP and gradient caching keep them exact; and short
training runs with the new flags learn on synthetic data and save folders that load truncated."""
import json
import math
import os
import shutil
import types

import numpy as np
import pytest
import torch
from torch import nn

from conftest import load_method, single_and_ddp

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


@pytest.fixture(scope="module")
def kosimcse():
    return load_method("KoSimCSE")


@pytest.fixture(scope="module")
def kosbert():
    return load_method("KoSBERT")


class GivenEmbeddings(nn.Module):
    """A stand-in SentenceTransformer whose 'features' are the embeddings themselves, so that an ST loss
    module runs its own forward (embed_columns, MatryoshkaLoss's forward decorator, ...) on our tensors."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}

    def _get_untruncated_embedding_dimension(self):
        return self.dim

    get_embedding_dimension = _get_untruncated_embedding_dimension


def embeddings(k, B=6, d=16, seed=0, hard=True):
    """(k*B, d) float32 columns; with ``hard`` the third column's hard negatives lie close to the positives
    (what hardness weighting is about) and some rows repeat in the first column."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(k * B, d, generator=g)
    if hard and k >= 3:
        e[2 * B:3 * B] = e[B:2 * B] + 0.3 * torch.randn(B, d, generator=g)
    return e


def ours_and_theirs(ours, theirs, e, k, labels=None):
    """(our loss, our gradient, their loss, their gradient) w.r.t. the same (k*B, d) embeddings; ``theirs`` is
    an ST loss module called on the k columns as its model's outputs."""
    a = e.clone().requires_grad_()
    loss_a = ours(a)
    loss_a.backward()
    b = e.clone().requires_grad_()
    loss_b = theirs([{"embedding": column} for column in b.chunk(k)], labels)
    loss_b.backward()
    return loss_a, a.grad, loss_b, b.grad


def assert_equal_to_st(ours, theirs, e, k, labels=None):
    loss_a, grad_a, loss_b, grad_b = ours_and_theirs(ours, theirs, e, k, labels)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-5, rel=1e-6)
    assert grad_a.abs().max() > 0
    torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)
    return loss_a.item()


# --- CoSENT and AnglE ----------------------------------------------------------------------------------

SCORES = torch.tensor([0.8, 0.2, 0.2, 1.0, 0.0, 0.56])  # a tie: the pair (1, 2) gives no term


@pytest.mark.parametrize("kind", ["cosent", "angle"])
@pytest.mark.parametrize("d", [16, 15])  # odd d: AnglE pads a zero column
def test_ranking_losses_equal_sentence_transformers(kosimcse, kind, d):
    m, model = kosimcse.model, GivenEmbeddings(d)
    e = embeddings(2, d=d)
    ours, cls = {"cosent": (m.cosent_loss, st_losses.CoSENTLoss), "angle": (m.angle_loss, st_losses.AnglELoss)}[kind]
    value = assert_equal_to_st(lambda x: ours(x, SCORES), cls(model), e, 2, SCORES)
    # the scale is 20 and is used: another scale gives another loss (and matches ST at that scale)
    assert_equal_to_st(lambda x: ours(x, SCORES, scale=7.0), cls(model, scale=7.0), e, 2, SCORES)
    assert ours(e, SCORES, scale=21.0).item() != pytest.approx(value, rel=1e-3)
    # only the order of the gold scores counts: 0-5 scores give the loss of score / 5
    assert ours(e, SCORES * 5).item() == pytest.approx(value, rel=1e-6)


def test_ranking_loss_pair_mask_by_hand(kosimcse):
    m = kosimcse.model
    sims = torch.tensor([0.1, 0.5, -0.2])
    # pair 0 should outrank 1 and 2, pair 2 should outrank 1: terms (i, j) with score_i > score_j
    scores = torch.tensor([1.0, 0.0, 0.5])
    terms = [20 * (0.5 - 0.1), 20 * (-0.2 - 0.1), 20 * (0.5 - -0.2)]
    want = math.log(1 + sum(math.exp(t) for t in terms))
    assert m.pair_ranking_loss(sims, scores, 20.0).item() == pytest.approx(want, rel=1e-6)
    # the reversed mask (score_i < score_j) would be another number
    assert m.pair_ranking_loss(sims, -scores, 20.0).item() != pytest.approx(want, rel=1e-3)
    # ties give no term: all scores equal -> log(1) = 0
    assert m.pair_ranking_loss(sims, torch.zeros(3), 20.0).item() == 0.0


def test_angle_similarity_is_the_complex_angle_by_hand(kosimcse):
    # u = (1 + 0i), v = (cos t + i sin t) as 2-d vectors [re, im]: |cos t - sin t| per ST 6.x's sign convention
    t = 0.3
    u, v = torch.tensor([[1.0, 0.0]]), torch.tensor([[math.cos(t), math.sin(t)]])
    assert kosimcse.model.angle_similarity(u, v).item() == pytest.approx(abs(math.cos(t) - math.sin(t)), rel=1e-6)
    from sentence_transformers.util import pairwise_angle_sim
    assert kosimcse.model.angle_similarity(u, v).item() == pytest.approx(pairwise_angle_sim(u, v).item(), rel=1e-6)


# --- InfoNCE: hardness weighting, directions ---------------------------------------------------------

INFONCE_CASES = [
    dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    dict(hardness_mode="all_negatives", hardness_strength=3.0),
    dict(directions=("query_to_doc", "doc_to_query")),
    dict(directions=("query_to_doc", "doc_to_query"), partition="per_direction"),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),  # GTE
    dict(directions=("query_to_doc", "doc_to_doc"), hardness_mode="all_negatives", hardness_strength=5.0),
]


@pytest.mark.parametrize("k", [3, 2])
@pytest.mark.parametrize("options", INFONCE_CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_infonce_options_equal_multiple_negatives_ranking_loss(kosimcse, k, options):
    st_options = {("partition_mode" if key == "partition" else key): value for key, value in options.items()}
    theirs = st_losses.MultipleNegativesRankingLoss(GivenEmbeddings(16), scale=20.0, **st_options)
    e = embeddings(k)
    value = assert_equal_to_st(lambda x: kosimcse.model.contrastive_loss(x, k, 0.05, **options), theirs, e, k)
    plain = kosimcse.model.contrastive_loss(e, k, 0.05).item()
    if k == 2 and options.get("hardness_mode") == "hard_negatives" and "directions" not in options:
        assert value == pytest.approx(plain, rel=1e-6)  # pairs have no hard negatives to weight
    else:
        assert value != pytest.approx(plain, rel=1e-4)  # each option changes the loss
    if "hardness_strength" in options:  # the strength is used as given
        changed = dict(options, hardness_strength=options["hardness_strength"] + 1)
        other = kosimcse.model.contrastive_loss(e, k, 0.05, **changed).item()
        assert (other == pytest.approx(value, rel=1e-6)) == (value == pytest.approx(plain, rel=1e-6))


def test_hardness_masks_by_hand(kosimcse):
    """B = 2, triplets: candidates [p0, p1, n0, n1]. Each mode adds alpha * cos to exactly its negatives."""
    m = kosimcse.model
    e = embeddings(3, B=2, d=4, seed=3)
    a, c = torch.nn.functional.normalize(e[:2], dim=-1), torch.nn.functional.normalize(e[2:], dim=-1)
    cos = a @ c.T
    masks = {"in_batch_negatives": [[0, 1, 0, 1], [1, 0, 1, 0]], "hard_negatives": [[0, 0, 1, 0], [0, 0, 0, 1]],
             "all_negatives": [[0, 1, 1, 1], [1, 0, 1, 1]]}
    for mode, mask in masks.items():
        logits = cos / 0.05 + 4.0 * cos * torch.tensor(mask, dtype=torch.float)
        want = torch.nn.functional.cross_entropy(logits, torch.arange(2))
        got = m.contrastive_loss(e, 3, 0.05, hardness_mode=mode, hardness_strength=4.0)
        assert got.item() == pytest.approx(want.item(), rel=1e-6), mode


def test_hardness_penalty_carries_no_gradient(kosimcse):
    """alpha * stop_grad(cos): the gradient is that of the plain logits under the reweighted softmax, not of
    (1/tau + alpha) * cos; a version without the detach would give a different gradient."""
    m, e = kosimcse.model, embeddings(3, B=4, d=8)
    x = e.clone().requires_grad_()
    m.contrastive_loss(x, 3, 0.05, hardness_mode="all_negatives", hardness_strength=5.0).backward()
    y = e.clone().requires_grad_()
    batch = 4
    a, c = torch.nn.functional.normalize(y[:batch], dim=-1), torch.nn.functional.normalize(y[batch:], dim=-1)
    cos = a @ c.T
    penalised = torch.ones_like(cos)
    penalised[torch.arange(batch), torch.arange(batch)] = 0
    torch.nn.functional.cross_entropy(cos / 0.05 + 5.0 * cos * penalised, torch.arange(batch)).backward()
    assert (x.grad - y.grad).abs().max() > 1e-3


# --- Matryoshka ----------------------------------------------------------------------------------------

def test_matryoshka_equals_sentence_transformers(kosimcse):
    m, model = kosimcse.model, GivenEmbeddings(16)
    dims, weights = [16, 8, 4, 2], [1.0, 0.5, 2.0, 0.25]
    e3, e2 = embeddings(3), embeddings(2)
    cases = [
        (lambda x: m.contrastive_loss(x, 3, 0.05, hardness_mode="hard_negatives", hardness_strength=5.0), 3, None,
         st_losses.MultipleNegativesRankingLoss(model, hardness_mode="hard_negatives", hardness_strength=5.0), e3),
        (lambda x: m.cosent_loss(x, SCORES), 2, SCORES, st_losses.CoSENTLoss(model), e2),
        (lambda x: m.angle_loss(x, SCORES), 2, SCORES, st_losses.AnglELoss(model), e2),
        (lambda x: m.cosine_regression_loss(x, SCORES), 2, SCORES, st_losses.CosineSimilarityLoss(model), e2),
    ]
    for loss_fn, k, labels, inner, e in cases:
        theirs = st_losses.MatryoshkaLoss(model, inner, dims, matryoshka_weights=weights)
        value = assert_equal_to_st(lambda x: m.matryoshka_loss(loss_fn, x, dims, weights), theirs, e, k, labels)
        assert_equal_to_st(lambda x: m.matryoshka_loss(loss_fn, x, [4, 16]),  # default weights 1, any order
                           st_losses.MatryoshkaLoss(model, inner, [4, 16]), e, k, labels)
        # a weighted sum of the loss at each truncation (not a mean): pinned against the parts
        parts = [w * loss_fn(e[:, :d]).item() for d, w in zip(dims, weights)]
        assert value == pytest.approx(sum(parts), rel=1e-5)
        assert m.matryoshka_loss(loss_fn, e, dims, [1.0] * 4).item() != pytest.approx(value, rel=1e-4)
    assert m.matryoshka_loss(cases[1][0], e2, []) is not None  # empty dims: the loss itself
    assert m.matryoshka_loss(cases[1][0], e2, []).item() == cases[1][0](e2).item()
    with pytest.raises(ValueError, match="exceeds"):
        m.matryoshka_loss(cases[1][0], e2, [32])


def test_truncation_renormalises_like_sentence_transformers(kosimcse):
    from sentence_transformers.sentence_transformer.losses.matryoshka import shrink
    e = embeddings(2)
    torch.testing.assert_close(kosimcse.model.truncate_and_normalize(e, 5), shrink(e, 5))
    half = e.bfloat16()
    assert kosimcse.model.truncate_and_normalize(half, 5).dtype == torch.bfloat16
    torch.testing.assert_close(kosimcse.model.truncate_and_normalize(half, 5), shrink(half, 5))


# --- the training step: defaults unchanged, gradient caching, DDP --------------------------------------

def batch_of(k, B=8, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (k * B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 4:] = torch.randint(0, 2, (k * B, L - 4), generator=g).cummin(dim=1).values
    return {"input_ids": ids * mask, "attention_mask": mask}


def step(method, model, source, batch, args):
    model.zero_grad(set_to_none=True)
    loss, _ = method.train.training_step(model, source, batch, args, world=1)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_default_flags_are_the_published_step(kosimcse, tiny_bert_no_dropout):
    """The flags' defaults give exactly the step of an args object without them (the published losses)."""
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert_no_dropout, pooler="cls").train()
    args = kosimcse.train.parse_args(["--model", tiny_bert_no_dropout])
    assert args.sts_loss == "cosine" and args.matryoshka_dims == [] and args.hardness_mode is None
    bare = types.SimpleNamespace(temperature=args.temperature)
    sts = dict(batch_of(2), labels=torch.rand(8))
    for source, batch in (("sup", batch_of(3)), ("sts", sts)):
        a, b = step(kosimcse, model, source, batch, args), step(kosimcse, model, source, batch, bare)
        assert a[0] == b[0] and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


@pytest.mark.parametrize("source, options", [
    ("sup", dict(matryoshka_dims=[32, 16, 8], hardness_mode="in_batch_negatives", hardness_strength=9.0,
                 infonce_directions=["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"])),
    ("sts", dict(matryoshka_dims=[32, 8], sts_loss="cosent")),
    ("sts", dict(sts_loss="angle")),
])
def test_gradient_caching_keeps_the_new_objectives_exact(kosimcse, tiny_bert_no_dropout, source, options):
    model = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert_no_dropout, pooler="cls").train()
    args = types.SimpleNamespace(temperature=0.05, **options)
    batch = batch_of(3) if source == "sup" else dict(batch_of(2), labels=torch.rand(8))
    plain = step(kosimcse, model, source, batch, args)
    model.mini_batch_size = 5
    cached = step(kosimcse, model, source, batch, args)
    assert cached[0] == pytest.approx(plain[0], abs=1e-5, rel=1e-6)
    for name, grad in plain[1].items():  # float32 sums in another order: 1e-5 relative to the largest entry
        torch.testing.assert_close(cached[1][name], grad, rtol=0, atol=1e-5 * max(1.0, grad.abs().max().item()),
                                   msg=name)


@pytest.mark.slow
def test_ddp_step_equals_single_process_with_new_objectives(tiny_bert_no_dropout, tmp_path):
    """cosent / angle rank pairs across the whole batch and InfoNCE's negatives span it: gathered across 2
    gloo ranks (with Matryoshka and gradient caching on), loss and gradients equal one process's."""
    a, b = single_and_ddp("objectives_ddp_step.py", "KoSimCSE", tiny_bert_no_dropout, tmp_path)
    for case in ("cosent", "angle", "infonce"):
        assert b[case]["loss"].item() == pytest.approx(a[case]["loss"].item(), abs=1e-5), case
        assert a[case]["grads"].keys() == b[case]["grads"].keys() and len(a[case]["grads"]) > 20
        worst = max((a[case]["grads"][k] - b[case]["grads"][k]).abs().max().item() for k in a[case]["grads"])
        largest = max(g.abs().max().item() for g in a[case]["grads"].values())  # 60-440 here (scale 20, 3 dims)
        assert worst < 1e-6 * largest, (case, worst, largest)  # float32 round-off; a wrong factor would be O(1)


# --- flags ----------------------------------------------------------------------------------------------

def test_flags_refuse_what_sentence_transformers_refuses(kosimcse, kosbert, tiny_bert, capsys):
    base = ["--model", tiny_bert]
    for bad in (["--infonce_directions", "doc_to_query"],
                ["--infonce_directions", "query_to_doc", "doc_to_doc", "--infonce_partition", "per_direction"],
                ["--matryoshka_dims", "32", "16", "--matryoshka_weights", "1"],
                ["--mode", "unsup", "--matryoshka_dims", "32", "16"],  # unsup's preset: --mlp_only_train
                ["--sts_loss", "mse"]):
        with pytest.raises(SystemExit):
            kosimcse.train.parse_args(base + bad)
    with pytest.raises(SystemExit):
        kosbert.train.parse_args(base + ["--mode", "nli", "--matryoshka_dims", "32", "16"])
    assert "--matryoshka_dims" in capsys.readouterr().err
    args = kosimcse.train.parse_args(base + ["--mode", "unsup", "--no-mlp_only_train", "--matryoshka_dims", "32", "16"])
    assert args.matryoshka_dims == [32, 16]


# --- training end to end ----------------------------------------------------------------------------------

def spearman_at(folder, pairs, dim=None):
    """KorSTS-style Spearman of cos(u, v) vs gold, from SentenceTransformer(folder, truncate_dim=dim)."""
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(folder, device="cpu", truncate_dim=dim)
    u = model.encode([p[0] for p in pairs], normalize_embeddings=True)
    v = model.encode([p[1] for p in pairs], normalize_embeddings=True)
    if dim is not None:
        assert u.shape[1] == dim
    return spearmanr((u * v).sum(1), [p[2] for p in pairs]).correlation


def run_kosbert(kosbert, model, data, out, *extra):
    kosbert.train.main(["--model", model, "--data_dir", data, "--output_dir", out, "--batch_size", "16",
                        "--eval_batch_size", "64", "--max_len", "24", "--seed", "0", "--logging_steps", "2",
                        "--mode", "sts", "--sts_epochs", "4", "--eval_steps", "100", "--lr", "2e-3", *extra])
    return os.path.join(out, "best_model")


@pytest.mark.slow
def test_cosent_matryoshka_training_learns_and_saves_the_dims(kosbert, tiny_bert, synthetic_data, tmp_path):
    """KoSBERT --sts_loss cosent --matryoshka_dims 32 16 8 on synthetic KorSTS: the loss falls, and on the
    held-out test pairs the trained model beats the untrained one at every trained dimension; the saved folder
    records the dims and loads truncated in sentence-transformers."""
    out = str(tmp_path / "cosent")
    best = run_kosbert(kosbert, tiny_bert, synthetic_data, out, "--sts_loss", "cosent",
                       "--matryoshka_dims", "32", "16", "8")
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    losses = [e["loss"] for e in log if "loss" in e]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    config = json.load(open(os.path.join(best, "config_sentence_transformers.json")))
    assert config == {"matryoshka_dims": [32, 16, 8]}
    assert "--matryoshka_dims 32 16 8" in json.load(open(os.path.join(best, "training.json")))["command"]
    test = kosbert.data.load_sts_pairs(os.path.join(synthetic_data, "KorSTS", "sts-test.tsv"), log=lambda _: None)
    for dim in (None, 16, 8):
        before, after = spearman_at(tiny_bert, test, dim), spearman_at(best, test, dim)
        assert after > before + 0.1, (dim, before, after)
    # a folder whose config also says truncate_dim (what a truncated export writes) loads truncated by default
    truncated = str(tmp_path / "truncated")
    shutil.copytree(best, truncated)
    with open(os.path.join(truncated, "config_sentence_transformers.json"), "w") as f:
        json.dump({**config, "truncate_dim": 8}, f)
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(truncated, device="cpu")
    assert model.get_embedding_dimension() == 8 and model.encode(["사과 바나나."]).shape == (1, 8)


@pytest.mark.slow
def test_angle_sts_training_learns(kosbert, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "angle")
    best = run_kosbert(kosbert, tiny_bert, synthetic_data, out, "--sts_loss", "angle")
    assert not os.path.exists(os.path.join(best, "config_sentence_transformers.json"))  # no dims: as before
    test = kosbert.data.load_sts_pairs(os.path.join(synthetic_data, "KorSTS", "sts-test.tsv"), log=lambda _: None)
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    losses = [e["loss"] for e in log if "loss" in e]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # AnglE alone learns more slowly here than CoSENT (0.62 -> 0.66 on this run): a smaller margin
    assert spearman_at(best, test) > spearman_at(tiny_bert, test) + 0.02


@pytest.mark.slow
def test_kosimcse_sup_with_hardness_bidirectional_matryoshka_trains(kosimcse, tiny_bert, synthetic_data, tmp_path):
    out = str(tmp_path / "sup")
    kosimcse.train.main(["--model", tiny_bert, "--data_dir", synthetic_data, "--output_dir", out, "--mode", "sup",
                         "--train_file", "KorNLI/nli.train.ko.tsv", "--batch_size", "16", "--max_len", "24",
                         "--pooler", "mean", "--lr", "1e-3", "--epochs", "1", "--eval_steps", "100",
                         "--logging_steps", "2", "--seed", "0", "--mini_batch_size", "20",
                         "--hardness_mode", "in_batch_negatives", "--hardness_strength", "9",
                         "--infonce_directions", "query_to_doc", "doc_to_query", "--matryoshka_dims", "32", "8"])
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 6 and np.mean(losses[-3:]) < np.mean(losses[:3])
    best = os.path.join(out, "best_model")
    assert json.load(open(os.path.join(best, "config_sentence_transformers.json"))) == {"matryoshka_dims": [32, 8]}
    test = kosimcse.data.load_sts_pairs(os.path.join(synthetic_data, "KorSTS", "sts-test.tsv"),
                                              log=lambda _: None)
    assert spearman_at(best, test, 8) > spearman_at(tiny_bert, test, 8) + 0.1

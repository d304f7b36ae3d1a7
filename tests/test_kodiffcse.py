"""KoDiffCSE on a tiny encoder + tiny MLM generator sharing one tokenizer: masking statistics, the
conditioning against the originals' cls_input, the losses by hand, generator dropout, lambda=0 ==
unsupervised KoSimCSE, the vocabulary check, DDP, train -> save -> reload, resume."""
import json
import math
import os
import types

import numpy as np
import pytest
import torch

from conftest import corpus_texts, crash_after_first_checkpoint, load_method, train_tokenizer


@pytest.fixture(scope="module")
def dc():
    return load_method("KoDiffCSE")


@pytest.fixture(scope="module")
def tok(tiny_bert):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_bert)


def batch_of(tok, texts):
    return tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)


def step_args(**kwargs):
    """The flags training_step reads."""
    return types.SimpleNamespace(**{"masking": "dynamic", "masking_ratio": 0.3, "temperature": 0.05,
                                    "lambda_weight": 0.005, **kwargs})


def test_dynamic_masking_ratio_and_80_10_10(dc, tok):
    batch = batch_of(tok, corpus_texts()[:200])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vocabulary = dc.dataloader.masking_vocabulary(tok)
    real = mask.bool() & ~dc.dataloader.special_token_mask(ids, vocabulary)
    chosen_total = real_total = masked_as_mask = kept = 0
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        masked, chosen = dc.dataloader.mask_tokens(ids, mask, vocabulary, 0.3, generator=g)
        assert not (chosen & ~real).any()  # never specials or padding
        assert torch.equal(masked[~chosen], ids[~chosen])
        chosen_total += chosen.sum().item()
        real_total += real.sum().item()
        masked_as_mask += (masked[chosen] == tok.mask_token_id).sum().item()
        kept += (masked[chosen] == ids[chosen]).sum().item()
    assert chosen_total / real_total == pytest.approx(0.3, abs=0.01)
    assert masked_as_mask / chosen_total == pytest.approx(0.8, abs=0.015)
    assert kept / chosen_total == pytest.approx(0.1, abs=0.015)  # 10% kept (+ random hits of the same id)


def test_static_sep_masking_is_exact_k(dc, tok):
    tt = dc.data.TokenizedTexts(tok, corpus_texts()[:50], 32)
    masked = dc.dataloader.static_sep_masks(tt, tok.sep_token_id, 0.15, seed=0)
    for i in range(len(tt)):
        a, b = tt.offsets[i], tt.offsets[i + 1]
        n_content = len(tt[i]) - 2
        changed = masked[a:b] != tt.ids[a:b]
        assert changed.sum() == max(1, int(n_content * 0.15))
        assert (masked[a:b][changed] == tok.sep_token_id).all() and not changed[[0, -1]].any()


def test_unk_to_sep_masking_equals_bmks_only_mask_tokens(dc, tok):
    """--unk_to_sep: every sentence equals BM-K's data/dataloader.py only_mask_tokens (transcribed below on
    the sentence padded to max_len) fed the same drawn positions: every [UNK] -> [SEP], the k =
    max(1, int(m * 0.15)) drawn positions distinct and among 1..m, m = the tokens that are not [UNK]."""
    max_len, ratio = 32, 0.15
    texts = [t.replace(" ", " ☃ ", i % 3) for i, t in enumerate(corpus_texts()[:40])] + ["☃ ☃", "☃"]
    tt = dc.dataloader.TokenizedTexts(tok, texts, max_len)
    ours = dc.dataloader.static_sep_masks(tt, tok.sep_token_id, ratio, seed=0, special_ids=tok.all_special_ids)
    rng = np.random.default_rng(0)  # the same draws, in the same order, as static_sep_masks
    with_unk = 0
    for i in range(len(tt)):
        ids = torch.tensor(tt[i])
        special = torch.isin(ids[1:-1], torch.tensor(tok.all_special_ids))
        with_unk += bool(special.any())
        m = len(ids) - 2 - int(special.sum())
        positions = rng.choice(m, max(1, int(m * ratio)), replace=False) + 1 if m > 0 else np.array([], dtype=int)
        assert len(set(positions.tolist())) == len(positions) and all(1 <= p <= m for p in positions)
        # BM-K's only_mask_tokens on one sentence padded to max_len, with these positions as its draws
        inputs = torch.full((1, max_len), tok.pad_token_id)
        inputs[0, :len(ids)] = ids
        attn = (torch.arange(max_len) < len(ids)).long()[None]
        special_mask = torch.tensor([tok.get_special_tokens_mask(r, already_has_special_tokens=True)
                                     for r in inputs.tolist()], dtype=torch.bool)
        num_of_false = max_len - special_mask.sum()
        assert num_of_false == m
        masking_map = torch.zeros(inputs.shape)
        masking_map[0].index_add_(0, torch.arange(len(positions)), torch.tensor(positions, dtype=torch.float))
        special_mask.scatter_(1, masking_map.long(), torch.ones(inputs.shape).bool())
        inputs[special_mask] = tok.sep_token_id
        inputs *= attn
        inputs[inputs == 0] = tok.pad_token_id
        inputs[:, 0] = tok.cls_token_id
        a, b = tt.offsets[i], tt.offsets[i + 1]
        assert inputs[0, :len(ids)].tolist() == ours[a:b].tolist(), i
        assert (inputs[0, len(ids):] == tok.pad_token_id).all()
    assert 10 < with_unk < len(tt)
    default = dc.dataloader.static_sep_masks(tt, tok.sep_token_id, ratio, seed=0)
    assert (default == tok.unk_token_id).any() and not (ours == tok.unk_token_id).any()


@pytest.fixture
def model(dc, tok, tiny_bert, generator):
    torch.manual_seed(0)
    return dc.model.DiffCSE.from_pretrained(tiny_bert, generator, dc.dataloader.masking_vocabulary(tok),
                                            projection="mlp")


def test_replaced_token_loss_by_hand(dc):
    """One sentence of 3 real tokens and a pad: the CE is the mean of the 3 real tokens' -log p(label)."""
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]])
    replaced = torch.tensor([[False, True, True, True]])  # the pad's label must not count either
    mask = torch.tensor([[1, 1, 1, 0]])
    by_hand = (math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1))) / 3
    assert dc.model.replaced_token_loss(logits, replaced, mask).item() == pytest.approx(by_hand, abs=1e-6)
    assert dc.model.replaced_token_accuracy(logits, replaced, mask).item() == pytest.approx(2 / 3)  # ties -> 0


def originals_rtd_step(model, tok, ids, mask, masked_views, rule, lambda_weight, temperature=0.05):
    """The loss of one step computed the originals' way (eval mode: no dropout). ids / mask / masked_views:
    (B, L) padded as that original pads. bmk (BM-K models.py + loss.py): two encoder passes, per view the
    generator's argmax with [CLS] put back, labels (g != ids) * mask, discriminator input g * mask
    conditioned on that view's z (cls_input), CE over the view's B x L positions, the two summed x lambda.
    diffcse (DiffCSE cl_forward): the same over both views at once, one CE over all 2B x L positions."""
    z = [model.projection(model.encoder(ids, mask)) for _ in range(2)]
    cos = torch.nn.functional.cosine_similarity(z[0][:, None], z[1][None], dim=-1) / temperature
    contrastive = torch.nn.functional.cross_entropy(cos, torch.arange(len(ids)))
    logits, labels = [], []
    for view, masked in zip(z, masked_views):
        with torch.no_grad():
            g = model.generator(input_ids=masked, attention_mask=mask).logits.argmax(-1)
        g[:, 0] = tok.cls_token_id
        labels.append((g != ids) * mask)
        logits.append(model.rtd_head(originals_discriminator(model.discriminator, g * mask, mask, view)))
    ce = torch.nn.functional.cross_entropy
    if rule == "bmk":
        rtd = sum(ce(x.view(-1, 2), y.view(-1)) for x, y in zip(logits, labels))
    else:
        rtd = ce(torch.cat(logits).view(-1, 2), torch.cat(labels).view(-1))
    return contrastive + rtd * lambda_weight


@pytest.mark.parametrize("rule", ["bmk", "diffcse"])
def test_rtd_average_equals_the_originals_loss_and_gradients(dc, tok, model, rule):
    """--rtd_average bmk / diffcse: training_step's loss and the gradients of every parameter equal the
    originals' computation (originals_rtd_step). BM-K pads every sentence to max_len (64); DiffCSE pads to
    the batch's longest, as our collator does. The default (tokens) differs from both."""
    max_len, lam = 64, 0.3  # a large lambda, so that the RTD part weighs in the gradients
    texts = ["사과 바나나 포도 딸기 기차 바다.", "기차.", "바다 파도 모래 사과.", "포도 딸기."]
    ids64 = tok(texts, padding="max_length", max_length=max_len, return_tensors="pt")
    ids, mask = ids64["input_ids"], ids64["attention_mask"]
    g = torch.Generator().manual_seed(0)
    masked = [dc.dataloader.mask_tokens(ids, mask, model.vocabulary, 0.4, generator=g)[0] for _ in range(2)]
    width = int(mask.sum(1).max()) if rule == "diffcse" else max_len
    model.eval()  # no dropout anywhere: the two computations see the same generator argmax
    reference = originals_rtd_step(model, tok, ids[:, :width], mask[:, :width], [m[:, :width] for m in masked],
                                   rule, lam)
    reference.backward()
    theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    short = int(mask.sum(1).max())  # our batch is padded to its longest sentence only
    batch = {"input_ids": torch.cat([ids, ids, *masked])[:, :short],
             "attention_mask": torch.cat([mask] * 4)[:, :short]}
    args = step_args(masking="static_sep", lambda_weight=lam, rtd_average=rule, max_len=max_len)
    loss, logged = dc.train.training_step(model, "wiki", batch, args, 1)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    assert ours.keys() == theirs.keys() and any(n.startswith("discriminator.") for n in ours)
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert worst < 1e-5, worst  # float32 rounding (sdpa attention vs the layer-by-layer route)
    model.zero_grad()
    tokens, _ = dc.train.training_step(model, "wiki", batch, step_args(masking="static_sep", lambda_weight=lam), 1)
    tokens.backward()
    assert abs(tokens.item() - loss.item()) > 1e-4  # the default averages over real tokens only
    assert max((p.grad - theirs[n]).abs().max().item() for n, p in model.named_parameters() if n in theirs) > 100 * worst


def test_replaced_labels_are_the_generators_changes_on_real_tokens(dc, tok, model):
    batch = batch_of(tok, ["사과 바나나 포도 딸기.", "기차.", "사과 바나나 포도 딸기.", "기차."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mlm, _ = dc.dataloader.mask_tokens(ids, mask, model.vocabulary, 0.5, generator=torch.Generator().manual_seed(0))
    model.eval()  # no dropout: the generator's argmax can be recomputed
    with torch.no_grad():
        out = model(ids, mask, mlm)
        generated = model.generator(input_ids=mlm, attention_mask=mask).logits.argmax(-1)
    generated[:, 0] = ids[:, 0]
    assert torch.equal(out.replaced, (generated != ids) & mask.bool())
    assert out.replaced.any() and not out.replaced[mask == 0].any() and not out.replaced[:, 0].any()
    assert out.embeddings.shape == (4, 32) and out.rtd_logits.shape == (*ids.shape, 2)


def tiny_backbone(arch, tok, dropout=0.1):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel
    kwargs = dict(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=80, pad_token_id=tok.pad_token_id,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertModel(BertConfig(**kwargs)) if arch == "bert" else RobertaModel(RobertaConfig(**kwargs))


def originals_discriminator(discriminator, input_ids, attention_mask, z):
    """DiffCSE's / BM-K's patched ``BertModel(cls_input=z)``, step by step on the stock modules: the
    embedding layer's output, its position 0 overwritten by z, then the encoder layers."""
    embedding_output = discriminator.embeddings(input_ids=input_ids)
    embedding_output = torch.cat([z[:, None], embedding_output[:, 1:]], dim=1)
    additive_mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    hidden = embedding_output
    for layer in discriminator.encoder.layer:
        out = layer(hidden, attention_mask=additive_mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_conditioning_equals_the_originals_cls_input(dc, tok, generator, arch):
    """The sentence vector replaces the embedding layer's OUTPUT at position 0 (after word + position +
    type embeddings, LayerNorm, dropout): the whole forward in eval mode, and the discriminator alone in
    train mode (dropout on, same seed), equal the originals' route to 1e-6 on every real token."""
    from transformers import AutoModelForMaskedLM
    torch.manual_seed(0)
    model = dc.model.DiffCSE(tiny_backbone(arch, tok), tiny_backbone(arch, tok),
                             AutoModelForMaskedLM.from_pretrained(generator), dc.dataloader.masking_vocabulary(tok),
                             projection="pooler").eval()
    batch = batch_of(tok, ["사과 바나나 포도 딸기 기차.", "기차.", "사과 바나나 포도 딸기 기차.", "기차."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mlm, _ = dc.dataloader.mask_tokens(ids, mask, model.vocabulary, 0.5, generator=torch.Generator().manual_seed(0))
    real = mask.bool()
    with torch.no_grad():
        out = model(ids, mask, mlm)
        generated = model.generator(input_ids=mlm, attention_mask=mask).logits.argmax(-1)
        generated[:, 0] = ids[:, 0]
        generated = torch.where(real, generated, ids)
        reference = model.rtd_head(originals_discriminator(model.discriminator, generated, mask, out.embeddings))
    assert (~real).any() and out.replaced.any()
    worst = (out.rtd_logits - reference)[real].abs().max().item()
    assert worst < 1e-6, worst
    model.train()
    z = torch.randn(len(ids), 16)
    torch.manual_seed(5)
    ours = model.discriminate(generated, mask, z)
    torch.manual_seed(5)
    theirs = originals_discriminator(model.discriminator, generated, mask, z)
    worst = (ours - theirs)[real].abs().max().item()
    assert worst < 1e-6, worst
    torch.manual_seed(6)
    assert (model.discriminate(generated, mask, z) - theirs)[real].abs().max() > 1e-3  # dropout is on


def test_generator_runs_with_dropout_unless_generator_eval(dc, tok, tiny_bert, generator):
    """As in DiffCSE and BM-K, model.train() leaves the generator in train mode, so two passes over the
    same masked input differ; --generator_eval keeps it in eval mode (and everything else training)."""
    batch = batch_of(tok, corpus_texts()[:8])
    mlm, _ = dc.dataloader.mask_tokens(batch["input_ids"], batch["attention_mask"],
                                       dc.dataloader.masking_vocabulary(tok), 0.3,
                                       generator=torch.Generator().manual_seed(0))
    for flags, differ in (([], True), (["--generator_eval"], False)):
        args = dc.train.parse_args(["--model", tiny_bert, "--generator_name", generator, "--device", "cpu", *flags])
        _, trainable = dc.train.load_model(args, tiny_bert, "unsup")
        trainable.train()
        assert trainable.generator.training is differ and trainable.encoder.training
        with torch.no_grad():
            first, second = (trainable.generator(input_ids=mlm, attention_mask=batch["attention_mask"]).logits
                             for _ in range(2))
        assert (not torch.equal(first, second)) is differ, flags


@pytest.mark.slow
def test_rtd_loss_alone_reaches_the_encoder(dc, tok, model):
    batch = batch_of(tok, ["사과 바나나 포도 딸기.", "바다 파도 모래.", "사과 바나나 포도 딸기.", "바다 파도 모래."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mlm, _ = dc.dataloader.mask_tokens(ids, mask, model.vocabulary, 0.5, generator=torch.Generator().manual_seed(1))
    model.train()
    out = model(ids, mask, mlm)
    dc.model.replaced_token_loss(out.rtd_logits, out.replaced, mask).backward()
    grads = [p.grad for n, p in model.encoder.named_parameters() if "pooler" not in n]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0
    assert all(p.grad is None for p in model.generator.parameters())  # frozen


def test_total_loss_is_computed_once(dc, tok, model, monkeypatch):
    """training_step calls each loss once and diffcse_loss once; what it backpropagates is
    world * contrastive + lambda * rtd and what it logs as loss is contrastive + lambda * rtd."""
    calls = []
    for name in ("contrastive_loss", "replaced_token_loss", "diffcse_loss"):
        def counted(*args, _f=getattr(dc.train, name), _name=name, **kwargs):
            calls.append(_name)
            return _f(*args, **kwargs)
        monkeypatch.setattr(dc.train, name, counted)
    texts = ["사과 바나나.", "바다 파도 모래.", "기차 역 승객."]
    batch = dict(batch_of(tok, texts + texts))
    model.train()
    for world in (1, 3):  # no process group: the gathered batch is the local one, only the scaling differs
        calls.clear()
        loss, logged = dc.train.training_step(model, "wiki", batch, step_args(lambda_weight=0.3), world)
        assert sorted(calls) == ["contrastive_loss", "diffcse_loss", "replaced_token_loss"]
        assert sorted(logged) == ["contrastive_loss", "loss", "rtd_accuracy", "rtd_loss"]
        assert all(not v.requires_grad for v in logged.values())
        c, r = logged["contrastive_loss"].item(), logged["rtd_loss"].item()
        assert loss.item() == pytest.approx(world * c + 0.3 * r, abs=1e-6)
        assert logged["loss"].item() == pytest.approx(c + 0.3 * r, abs=1e-6)
        assert r > 0 and loss.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("projection, pooler", [("mlp", "cls"), ("pooler", "pooler")])
def test_lambda_zero_step_equals_kosimcse_unsup_step_with_dropout(dc, tok, tiny_bert, generator, projection,
                                                                  pooler):
    """Train mode, dropout on, same seed: a KoDiffCSE training_step with lambda=0 gives unsupervised
    KoSimCSE's step (pooler cls + MLP in training, or the checkpoint's pooler): the same loss and the
    same encoder gradients, since the encoder's dropout draws come first in both and the generator and
    discriminator only run afterwards (static masking: no draws before the encoder)."""
    kosimcse = load_method("KoSimCSE")
    texts = ["사과 바나나.", "바다 파도 모래.", "기차 역 승객."]
    batch = batch_of(tok, texts + texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mlm = dc.dataloader.mask_tokens(ids, mask, dc.dataloader.masking_vocabulary(tok), 0.3,
                                    generator=torch.Generator().manual_seed(0))[0]
    torch.manual_seed(0)
    ours = dc.model.DiffCSE.from_pretrained(tiny_bert, generator, dc.dataloader.masking_vocabulary(tok),
                                            projection=projection).train()
    theirs = kosimcse.model.SentenceEncoder.from_pretrained(tiny_bert, pooler=pooler, mlp_only_train=True).train()
    if projection == "mlp":
        theirs.mlp.load_state_dict(ours.projection.state_dict())
    torch.manual_seed(123)
    loss, logged = dc.train.training_step(ours, "wiki", {"input_ids": torch.cat([ids, mlm]),
                                                         "attention_mask": torch.cat([mask, mask])},
                                          step_args(masking="static_sep", lambda_weight=0.0), 1)
    loss.backward()
    torch.manual_seed(123)
    reference, _ = kosimcse.train.training_step(theirs, "unsup", {"input_ids": ids, "attention_mask": mask},
                                                types.SimpleNamespace(temperature=0.05), 1)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    assert logged["loss"].item() == pytest.approx(reference.item(), abs=1e-6)
    theirs_grads = dict(theirs.backbone.named_parameters())
    for name, param in ours.encoder.backbone.named_parameters():
        if param.grad is not None or theirs_grads[name].grad is not None:
            torch.testing.assert_close(param.grad, theirs_grads[name].grad, atol=1e-6, rtol=0)
    assert ours.encoder.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    torch.manual_seed(124)  # dropout really is on: other draws, another loss
    with torch.no_grad():
        assert kosimcse.model.contrastive_loss(theirs(ids, mask), 2, 0.05).item() != pytest.approx(reference.item(), abs=1e-4)
    assert all(p.grad is None or not p.grad.any() for p in ours.rtd_head.parameters())


def test_pooler_projection_without_pooler_weights_warns_and_starts_from_init(dc, tok, tiny_bert, generator,
                                                                            tmp_path):
    """BM-K's projection is the encoder's pooler_output; a checkpoint saved without pooler weights gets a
    freshly initialised pooler there, so here too -- with a warning rather than silently."""
    from transformers import BertModel
    bare = str(tmp_path / "no-pooler")
    BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).save_pretrained(bare)
    tok.save_pretrained(bare)
    with pytest.warns(UserWarning, match="no trained pooler weights"):
        model = dc.model.DiffCSE.from_pretrained(bare, generator, dc.dataloader.masking_vocabulary(tok))
    assert model.projection[0] is model.encoder.backbone.pooler.dense and model.projection[0].weight.requires_grad


def test_generator_vocabulary_mismatch_stops_before_training(dc, tiny_bert, synthetic_data, tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    other = str(tmp_path / "other-generator")
    tok = train_tokenizer(other, ["완전히 다른 말뭉치 입니다."] * 20 + ["abc def ghi"] * 20)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(other)
    with pytest.raises(SystemExit, match="does not share the vocabulary"):
        dc.train.main(["--model", tiny_bert, "--generator_name", other, "--data_dir", synthetic_data,
                       "--output_dir", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_missing_generator_names_the_generator_flag(dc, tiny_bert, synthetic_data, tmp_path):
    missing = str(tmp_path / "no-such-generator")
    with pytest.raises(SystemExit) as e:
        dc.train.main(["--model", tiny_bert, "--generator_name", missing, "--data_dir", synthetic_data,
                       "--output_dir", str(tmp_path / "out")])
    message = str(e.value)
    assert message.startswith(f"error: cannot load the generator '{missing}': ") and "; pass --generator_name" in message
    assert "\n" not in message  # one line
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--masking", "dynamic", "--projection", "bn_mlp"]])
def test_train_save_reload_and_evaluate(dc, tiny_bert, generator, synthetic_data, tmp_path, extra):
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel, AutoTokenizer
    out = str(tmp_path / "run")
    dc.train.main(["--model", tiny_bert, "--generator_name", generator, "--data_dir", synthetic_data,
                   "--output_dir", out, "--batch_size", "16", "--max_len", "24", "--max_steps", "6",
                   "--eval_steps", "3", "--logging_steps", "2", "--lambda_weight", "0.1", *extra])
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    losses = [e for e in log if "loss" in e]
    assert len(losses) == 3 and all({"rtd_loss", "contrastive_loss", "rtd_accuracy"} <= set(e) for e in losses)
    best = os.path.join(out, "best_model")
    assert sorted(f for f in os.listdir(best) if f.endswith(".safetensors")) == ["model.safetensors"]
    tok, hf = AutoTokenizer.from_pretrained(best), AutoModel.from_pretrained(best).eval()
    sentences = ["사과 바나나 포도.", "기차 역 승객 표 출발."]
    ev = dc.evaluation
    ours = dc.encoding.encode(ev.FolderEncoder(best).eval(), tok, sentences, 24)
    with torch.no_grad():
        quick = hf(**tok(sentences, padding=True, return_tensors="pt"), return_dict=False)[0][:, 0]
    np.testing.assert_allclose(ours, quick.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours, st.SentenceTransformer(best, device="cpu").encode(sentences), atol=1e-5)
    ev.main(["--model_dir", best, "--data_dir", synthetic_data, "--output_json", os.path.join(out, "t.json")])
    assert json.load(open(os.path.join(out, "t.json")))[0]["n_pairs"] == 120


def test_generator_vocab_size_larger_than_the_encoders_stops(dc, tiny_bert, synthetic_data, tmp_path):
    """Same tokenizer, but the generator could predict ids the discriminator has no embedding for."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
    big = str(tmp_path / "big-generator")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.save_pretrained(big)
    BertForMaskedLM(BertConfig(vocab_size=len(tok) + 8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, pad_token_id=tok.pad_token_id)).save_pretrained(big)
    with pytest.raises(SystemExit, match="does not share the vocabulary"):
        dc.train.main(["--model", tiny_bert, "--generator_name", big, "--data_dir", synthetic_data,
                       "--output_dir", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_defaults_are_bmk_and_bn_mlp_is_diffcses_projection(dc, tok, tiny_bert, generator, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the bmk preset's --fp16 needs CUDA
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    defaults = dc.train.parse_args(["--device", "cuda"])
    bmk = dc.train.parse_args(["@" + os.path.join(dc.path, "presets", "bmk-roberta.args"), "--device", "cuda"])
    # the preset is the defaults plus the five BM-K switches that are off by default
    as_bmk = {"unk_to_sep": True, "rtd_average": "bmk", "dev_protocol": "bmk", "early_stop_evals": 30, "fp16": True}
    assert vars(bmk) == {**vars(defaults), **as_bmk}
    assert (defaults.projection, defaults.masking, defaults.generator_eval) == ("pooler", "static_sep", False)
    assert (defaults.rtd_average, defaults.unk_to_sep, defaults.early_stop_evals) == ("tokens", False, 0)
    diffcse = dc.train.parse_args(["@" + os.path.join(dc.path, "presets", "diffcse-bert.args"), "--device", "cpu"])
    assert (diffcse.projection, diffcse.masking, diffcse.masking_ratio) == ("bn_mlp", "dynamic", 0.3)
    assert diffcse.rtd_average == "diffcse"
    with pytest.raises(SystemExit):
        dc.train.parse_args(["--batchnorm"])  # DiffCSE's flag name is gone: --projection bn_mlp
    head = dc.model.DiffCSE.from_pretrained(tiny_bert, generator, dc.dataloader.masking_vocabulary(tok),
                                            projection="bn_mlp").projection
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    norms = [m for m in head if isinstance(m, torch.nn.BatchNorm1d)]
    assert [m.bias for m in linears] == [None, None] and linears[0].out_features == 2 * linears[0].in_features
    assert [m.affine for m in norms] == [True, False]


@pytest.mark.slow
def test_ddp_step_equals_single_process_on_the_global_batch(tiny_bert_no_dropout, generator, tmp_path):
    """torchrun (gloo, 2 processes) vs one process: the same training_step gradients, the RTD part
    included (its loss is local to each rank, so it must not be scaled by the world size as the gathered
    contrastive loss is)."""
    import subprocess
    import sys
    from conftest import ROOT
    script = os.path.join(ROOT, "tests", "scripts", "kodiffcse_ddp_step.py")
    method = os.path.join(ROOT, "KoDiffCSE")
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, script, method, tiny_bert_no_dropout, generator, single],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          script, method, tiny_bert_no_dropout, generator, double],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(single), torch.load(double)
    torch.testing.assert_close(b["losses"], a["losses"], atol=1e-5, rtol=0)
    assert a["grads"].keys() == b["grads"].keys()
    assert any(k.startswith("discriminator.") for k in a["grads"]) and any(k.startswith("rtd_head.") for k in a["grads"])
    worst = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_torchrun_training_end_to_end(tiny_bert, generator, synthetic_data, tmp_path):
    from conftest import ROOT, torchrun
    out = str(tmp_path / "ddp")
    run = torchrun(os.path.join(ROOT, "KoDiffCSE", "train.py"), "--model", tiny_bert, "--generator_name", generator,
                   "--data_dir", synthetic_data, "--output_dir", out, "--batch_size", "16", "--max_len", "24",
                   "--max_steps", "4", "--eval_steps", "2", "--device", "cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes x 8" in run.stderr + run.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [e["step"] for e in log if "dev" in e] == [2, 4]  # one log, from rank 0 only
    assert os.path.isfile(os.path.join(out, "best_model", "model.safetensors"))


@pytest.mark.slow
def test_resume_after_a_crash_reaches_the_same_result(dc, tiny_bert, generator, synthetic_data, tmp_path):
    """Dropout (generator included) and the dynamic masking all draw from the restored RNG states: every
    loss after the resume and every dev score equal the uninterrupted run's."""
    def args(out):
        return ["--model", tiny_bert, "--generator_name", generator, "--data_dir", synthetic_data,
                "--output_dir", out, "--batch_size", "16", "--max_len", "24", "--max_steps", "9", "--eval_steps",
                "3", "--save_steps", "2", "--logging_steps", "1", "--lambda_weight", "0.1", "--masking", "dynamic",
                "--device", "cpu"]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    dc.train.main(args(straight))
    crash_after_first_checkpoint(dc.train, args(crashed))  # killed right after step 2's checkpoint
    dc.train.main(["--resume", crashed])
    a, b = ([json.loads(x) for x in open(os.path.join(d, "train_log.jsonl"))] for d in (straight, crashed))
    assert [e["step"] for e in a] == [e["step"] for e in b] and len(a) == 9 + 3
    for x, y in zip(a, b):
        for key in ("loss", "rtd_loss", "contrastive_loss", "rtd_accuracy"):
            assert y.get(key) == pytest.approx(x.get(key), abs=1e-6), (x["step"], key)
        for key in x.get("dev", {}):
            assert y["dev"][key] == pytest.approx(x["dev"][key], abs=1e-6), (x["step"], key)

"""SKT KoBERT's sentencepiece tokenizer layouts through common/tokenizer.py:load_tokenizer (KoSimCSE/common/tokenizer.py,
copied whole into KoSBERT/ and KoSentenceT5/): a tiny sentencepiece model trained here stands in for
skt/kobert-base-v1's spiece.model (same special pieces at ids 0-4: [UNK] [PAD] [CLS] [SEP] [MASK])."""
import json
import os
import shutil

import pytest

from conftest import corpus_texts, load_method, write_synthetic_data

SENTENCE = "한국어 모델을 공유합니다."


def train_sentencepiece(prefix, texts):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=300, model_type="unigram",
        unk_id=0, pad_id=1, bos_id=-1, eos_id=-1, unk_piece="[UNK]", pad_piece="[PAD]",
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


SKT_CONFIG = {"tokenizer_class": "XLNetTokenizer", "do_lower_case": False, "remove_space": True,
              "keep_accents": False, "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]",
              "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
              "mask_token": {"content": "[MASK]", "lstrip": True, "rstrip": False}}


@pytest.fixture(scope="module")
def skt_folder(tmp_path_factory):
    """skt/kobert-base-v1's layout: spiece.model, tokenizer_config.json naming XLNetTokenizer, a BERT
    config.json and random BERT weights (so the folder also trains)."""
    import torch
    from transformers import BertConfig, BertModel
    out = str(tmp_path_factory.mktemp("skt-kobert"))
    texts = corpus_texts() + [SENTENCE, "한국어 문장 임베딩을 위한 모델입니다."] * 5
    sp = train_sentencepiece(os.path.join(out, "spiece"), texts)
    os.remove(os.path.join(out, "spiece.vocab"))
    write_json(os.path.join(out, "tokenizer_config.json"), SKT_CONFIG)
    write_json(os.path.join(out, "special_tokens_map.json"), {"cls_token": "[CLS]", "sep_token": "[SEP]"})
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=sp.get_piece_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=1)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ev():
    return load_method("KoSimCSE").tokenizer


def sp_ids(folder, text):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=os.path.join(folder, "spiece.model")).encode(text)


def test_skt_layout_gives_a_bert_style_fast_tokenizer(ev, skt_folder):
    tok = ev.load_tokenizer(skt_folder)
    assert tok.is_fast and tok.padding_side == "right"
    assert (tok.unk_token_id, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[1:-1] == sp_ids(skt_folder, SENTENCE)  # the sentencepiece ids, as KoBERTTokenizer's
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE
    pair = tok(SENTENCE, "바다", return_token_type_ids=True)
    assert pair["input_ids"].count(tok.sep_token_id) == 2 and pair["token_type_ids"][-1] == 1
    batch = tok(["바다", SENTENCE], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0
    assert batch["input_ids"][0][:3] == [tok.cls_token_id] + sp_ids(skt_folder, "바다") + [tok.sep_token_id]


def test_xlnet_style_preprocessing_is_kept(ev, skt_folder):
    """KoBERT's XLNet preprocessing: collapse spaces, ``/'' -> ", accents stripped (NFKD), Hangul intact."""
    tok = ev.load_tokenizer(skt_folder)
    assert tok("  한국어   모델을  ")["input_ids"] == tok("한국어 모델을")["input_ids"]
    assert tok("``바다''")["input_ids"] == tok('"바다"')["input_ids"]
    assert tok("café 바다")["input_ids"] == tok("cafe 바다")["input_ids"]


def test_saved_tokenizer_reloads_identically(ev, skt_folder, tmp_path):
    """The model folders training saves hold the built tokenizer (tokenizer.json), which loads as is."""
    tok = ev.load_tokenizer(skt_folder)
    tok.save_pretrained(str(tmp_path))
    again = ev.load_tokenizer(str(tmp_path))
    texts = [SENTENCE, "바다 파도 모래", "고양이가 강아지와 산책한다."]
    assert again(texts, padding=True)["input_ids"] == tok(texts, padding=True)["input_ids"]
    assert again.pad_token_id == tok.pad_token_id and again.padding_side == "right"


def test_kobert_class_names_and_monologg_vocab_order(ev, skt_folder, tmp_path):
    """tokenizer_config naming KoBERTTokenizer works without config.json; monologg's layout
    (tokenizer_78b3253a26.model + vocab.txt) takes its ids from vocab.txt."""
    kobert = tmp_path / "kobert"
    kobert.mkdir()
    shutil.copy(os.path.join(skt_folder, "spiece.model"), kobert / "spiece.model")
    write_json(kobert / "tokenizer_config.json", {**SKT_CONFIG, "tokenizer_class": "KoBERTTokenizer"})
    assert ev.load_tokenizer(str(kobert))(SENTENCE)["input_ids"] == ev.load_tokenizer(skt_folder)(SENTENCE)["input_ids"]

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(skt_folder, "spiece.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    order = pieces[:5] + pieces[5:][::-1]  # specials first, the rest reversed: ids differ from the model's
    mono = tmp_path / "monologg"
    mono.mkdir()
    shutil.copy(os.path.join(skt_folder, "spiece.model"), mono / "tokenizer_78b3253a26.model")
    (mono / "vocab.txt").write_text("\n".join(order) + "\n", encoding="utf-8")
    write_json(mono / "tokenizer_config.json", {"tokenizer_class": "KoBertTokenizer", "do_lower_case": False})
    tok = ev.load_tokenizer(str(mono))
    ids = tok(SENTENCE)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [sp.id_to_piece(i) for i in sp_ids(skt_folder, SENTENCE)]
    assert ids[1:-1] == [order.index(sp.id_to_piece(i)) for i in sp_ids(skt_folder, SENTENCE)]


def test_broken_kobert_layouts_fail_clearly(ev, skt_folder, tmp_path):
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    write_json(no_model / "tokenizer_config.json", {"tokenizer_class": "KoBERTTokenizer"})
    with pytest.raises(ValueError, match=r"SKT KoBERT.*no sentencepiece model.*spiece\.model.*skt/kobert-base-v1"):
        ev.load_tokenizer(str(no_model))

    no_vocab = tmp_path / "no-vocab"
    no_vocab.mkdir()
    shutil.copy(os.path.join(skt_folder, "spiece.model"), no_vocab / "tokenizer_78b3253a26.model")
    with pytest.raises(ValueError, match=r"tokenizer_78b3253a26\.model but no vocab\.txt"):
        ev.load_tokenizer(str(no_vocab))

    wrong_special = tmp_path / "wrong-special"
    wrong_special.mkdir()
    shutil.copy(os.path.join(skt_folder, "spiece.model"), wrong_special / "spiece.model")
    write_json(wrong_special / "tokenizer_config.json", {**SKT_CONFIG, "tokenizer_class": "KoBERTTokenizer",
                                                         "cls_token": "<cls>"})
    with pytest.raises(ValueError, match=r"special token\(s\) <cls> are not in the vocabulary"):
        ev.load_tokenizer(str(wrong_special))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "spiece.model").write_bytes(b"not a sentencepiece model")
    write_json(corrupt / "tokenizer_config.json", {"tokenizer_class": "KoBERTTokenizer"})
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        ev.load_tokenizer(str(corrupt))


def test_skt_folder_trains_and_evaluates(skt_folder, tmp_path):
    """KoSimCSE trains on the SKT layout (the †SKT rows) and the saved folder evaluates."""
    ns = load_method("KoSimCSE")
    data = write_synthetic_data(str(tmp_path / "data"), n_nli=40, n_sts=30, n_wiki=40)
    out = str(tmp_path / "run")
    ns.train.main(["--mode", "sup", "--model", skt_folder, "--data_dir", data, "--train_file",
                   "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "8", "--max_steps", "2",
                   "--eval_steps", "2", "--pooler", "pooler", "--max_len", "32", "--device", "cpu"])
    best = os.path.join(out, "best_model")
    assert os.path.isfile(os.path.join(best, "tokenizer.json"))
    encoder = ns.evaluation.FolderEncoder(best)
    assert encoder.tokenizer(SENTENCE)["input_ids"] == ns.tokenizer.load_tokenizer(skt_folder)(SENTENCE)["input_ids"]

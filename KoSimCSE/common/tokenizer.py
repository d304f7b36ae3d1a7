"""Tokenizers: AutoTokenizer, refusing a folder without tokenizer files, and SKT KoBERT's
sentencepiece model built into a fast BERT-style tokenizer."""
import json
import os

from transformers import AutoTokenizer


def load_tokenizer(path):
    """AutoTokenizer, refusing the empty vocabulary-less tokenizer that transformers builds silently
    for a model folder that has no tokenizer files.

    SKT KoBERT ships a sentencepiece model that AutoTokenizer does not read as a BERT tokenizer: the
    skt/kobert-base-v1 layout (spiece.model, tokenizer_config.json naming XLNetTokenizer or
    KoBERTTokenizer on a BERT config) and monologg's (tokenizer_78b3253a26.model + vocab.txt,
    KoBertTokenizer). Those are built here into a fast tokenizer that does what KoBERT's own tokenizer
    (SKTBrain/KoBERT kobert_hf/kobert_tokenizer, an XLNetTokenizer subclass) does: XLNet's text
    preprocessing (collapse spaces, ``/'' -> ", NFKD without combining marks), the sentencepiece model
    with its normalizer, ids = the sentencepiece ids (or vocab.txt's order where it ships one), and
    BERT's [CLS] A [SEP] ([CLS] A [SEP] B [SEP]) with [PAD] on the right. Not reproduced: the
    slow tokenizer's re-split of pieces like "1," (a digit before a comma), as in the XLNet fast
    tokenizer. A broken KoBERT layout fails with what is missing."""
    import transformers.utils.hub
    kobert_classes, sp_names = ("KoBERTTokenizer", "KoBertTokenizer"), ("spiece.model", "tokenizer_78b3253a26.model")

    def find(name):  # a file of the folder (or of the hub id's cached snapshot), else None
        if os.path.isdir(path):
            return os.path.join(path, name) if os.path.isfile(os.path.join(path, name)) else None
        try:
            return transformers.utils.hub.cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                                                      _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            return None

    def read_json(name):
        found = find(name)
        if found is None:
            return {}
        with open(found, encoding="utf-8") as f:
            return json.load(f)

    def kobert_tokenizer(tok_config, tokenizer_class):
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers.convert_slow_tokenizer import generate_merges
        sp_file = next((f for f in map(find, sp_names) if f), None)
        if sp_file is None:
            raise ValueError(f"{path} is an SKT KoBERT tokenizer ({tokenizer_class}) but has no sentencepiece model "
                             f"({' or '.join(sp_names)}); copy the tokenizer files of skt/kobert-base-v1 (spiece.model, "
                             f"tokenizer_config.json, special_tokens_map.json) into it")
        vocab_file = find("vocab.txt")
        if vocab_file is None and os.path.basename(sp_file) == sp_names[1]:
            raise ValueError(f"{path} has monologg's KoBERT sentencepiece model {sp_names[1]} but no vocab.txt, which "
                             f"gives its token ids; copy vocab.txt from the model's repository into it")
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            with open(sp_file, "rb") as f:
                proto.ParseFromString(f.read())
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"{sp_file} is not a sentencepiece model ({e})") from None
        if not proto.pieces:
            raise ValueError(f"{sp_file} is not a sentencepiece model (no pieces)")
        scores = {p.piece: p.score for p in proto.pieces}
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as f:
                order = [line.rstrip("\n") for line in f if line.strip()]
        else:
            order = [p.piece for p in proto.pieces]
        settings = {**read_json("special_tokens_map.json"), **tok_config}
        special = {}
        for name, default in (("unk_token", "[UNK]"), ("pad_token", "[PAD]"), ("cls_token", "[CLS]"),
                              ("sep_token", "[SEP]"), ("mask_token", "[MASK]")):
            value = settings.get(name) or default
            special[name] = value["content"] if isinstance(value, dict) else str(value)
        ids = {piece: i for i, piece in enumerate(order)}
        missing = [t for t in special.values() if t not in ids]
        if missing:
            raise ValueError(f"{path}: the special token(s) {', '.join(missing)} are not in the vocabulary of "
                             f"{os.path.basename(vocab_file or sp_file)} (SKT KoBERT's has [UNK] [PAD] [CLS] [SEP] "
                             f"[MASK] at ids 0-4); name the right tokens in tokenizer_config.json")
        if proto.trainer_spec.model_type == 1:  # unigram
            model = models.Unigram([(p, scores.get(p, -1e9)) for p in order], unk_id=ids[special["unk_token"]],
                                   byte_fallback=proto.trainer_spec.byte_fallback)
        elif proto.trainer_spec.model_type == 2:  # BPE
            model = models.BPE(ids, generate_merges(ids), unk_token=special["unk_token"], fuse_unk=True,
                               byte_fallback=proto.trainer_spec.byte_fallback)
        else:
            raise ValueError(f"{sp_file}: sentencepiece model type {proto.trainer_spec.model_type} is not supported "
                             f"(unigram or BPE)")
        tok = Tokenizer(model)
        steps = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
        if not tok_config.get("keep_accents", False):
            steps += [normalizers.NFKD(), normalizers.StripAccents()]
        if tok_config.get("do_lower_case", False):
            steps.append(normalizers.Lowercase())
        if "nfkc" in proto.normalizer_spec.name:  # sentencepiece's NFKC recomposes the NFKD'd Hangul, which
            steps.append(normalizers.NFKC())      # its compiled char map alone (Precompiled) does not
        if proto.normalizer_spec.precompiled_charsmap:
            steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
        cls, sep = special["cls_token"], special["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])])
        extra = {"model_max_length": tok_config["model_max_length"]} if "model_max_length" in tok_config else {}
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=cls, eos_token=sep,
                                                    padding_side="right", **special, **extra)

    tok_config = read_json("tokenizer_config.json") if find("tokenizer.json") is None else {}
    tokenizer_class = tok_config.get("tokenizer_class")
    if tokenizer_class in kobert_classes or find(sp_names[1]) is not None or (
            tokenizer_class == "XLNetTokenizer" and read_json("config.json").get("model_type") == "bert"):
        tokenizer = kobert_tokenizer(tok_config, tokenizer_class or "KoBertTokenizer")
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) <= len(tokenizer.all_special_tokens) + 1:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json, vocab.txt, spiece.model, ...); "
                         f"save the tokenizer into the model folder")
    return tokenizer

"""Evaluate a sentence-embedding model folder.

  --task sts      the 8 numbers of the Korean tables (Pearson/Spearman x cosine/euclidean/manhattan/
                  dot, x100) and their AVG on KorSTS test/dev, KLUE-STS dev or any STS file, under
                  the ``standard`` protocol (correlations over the whole set, as sentence-transformers'
                  EmbeddingSimilarityEvaluator) and/or BM-K's ``bmk`` protocol (correlations per
                  shuffled batch of --batch_size pairs, averaged over batches, as BM-K's KoSimCSE,
                  KoSentenceT5 and KoDiffCSE tables were computed).
  --task search   semantic search of queries against a corpus file, streamed in chunks so that a
                  1,000,000-sentence corpus needs memory for one chunk only; with --index_dir, against
                  an index built by --task index instead (the corpus is not encoded again).
  --task index    encode a corpus file once into --index_dir: embeddings (.npy, float32 or float16),
                  the sentences' byte offsets, a faiss index (flat = exact, hnsw, ivf) and
                  index_meta.json. Chunks are saved atomically, so a killed build resumes where it
                  stopped. The corpus is encoded as --prefix + sentence (streaming search puts
                  --prefix before the queries only); queries searched against the index must use the
                  model, pooling, max_len and prefix it was built with, or are refused.
  --task cluster  seeded KMeans over sentence embeddings, printed as in the KoSBERT example, plus a
                  2-D PNG of the sentences coloured by cluster.

The model folder is read the way sentence-transformers reads it (modules.json: Transformer ->
Pooling -> [Dense] -> [Normalize]), so the embeddings here are the ones
``SentenceTransformer(folder).encode`` gives; a plain Hugging Face folder needs --pooling. Several tasks
may be given (``--task sts search``): they run in that order on one loaded model.
"""
import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import transformers
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics.pairwise import (paired_cosine_distances, paired_euclidean_distances,
                                      paired_manhattan_distances)
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from dataloader import DataError, TokenizedTexts, iter_lines, pad_batch, read_sts, resolve_path

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
METRICS = ("cosine_pearson", "cosine_spearman", "euclidean_pearson", "euclidean_spearman",
           "manhattan_pearson", "manhattan_spearman", "dot_pearson", "dot_spearman")
COLUMNS = ("cosP", "cosS", "eucP", "eucS", "manP", "manS", "dotP", "dotS")
TASKS = ("sts", "search", "index", "cluster")

# The example of the KoSBERT/KoSimCSE READMEs: 9 corpus sentences and 3 queries.
EXAMPLE_CORPUS = ["한 남자가 음식을 먹는다.", "한 남자가 빵 한 조각을 먹는다.", "그 여자가 아이를 돌본다.",
                  "한 남자가 말을 탄다.", "한 여자가 바이올린을 연주한다.", "두 남자가 수레를 숲 속으로 밀었다.",
                  "한 남자가 담으로 싸인 땅에서 백마를 타고 있다.", "원숭이 한 마리가 드럼을 연주한다.",
                  "치타 한 마리가 먹이 뒤에서 달리고 있다."]
EXAMPLE_QUERIES = ["한 남자가 파스타를 먹는다.", "고릴라 의상을 입은 누군가가 드럼을 연주하고 있다.",
                   "치타가 들판을 가로 질러 먹이를 쫓는다."]


def sts_metrics(emb1, emb2, gold):
    """The 8 correlations x100 in the papers' order, their mean ``avg``, and ``max_spearman`` (the
    checkpoint-selection score of BM-K and sentence-transformers <= 2.2)."""
    emb1, emb2 = np.asarray(emb1, dtype=np.float64), np.asarray(emb2, dtype=np.float64)
    similarities = {"cosine": 1 - paired_cosine_distances(emb1, emb2),
                    "euclidean": -paired_euclidean_distances(emb1, emb2),
                    "manhattan": -paired_manhattan_distances(emb1, emb2),
                    "dot": np.einsum("ij,ij->i", emb1, emb2)}
    out = {}
    for name, sim in similarities.items():
        out[f"{name}_pearson"] = 100 * float(pearsonr(gold, sim)[0])
        out[f"{name}_spearman"] = 100 * float(spearmanr(gold, sim)[0])
    out["avg"] = float(np.mean([out[k] for k in METRICS]))
    out["max_spearman"] = max(out[k] for k in METRICS if k.endswith("spearman"))
    return out


def bmk_metrics(emb1, emb2, gold, batch_size, seed):
    """BM-K's protocol: shuffle the pairs (seeded), cut into batches of ``batch_size``, compute the
    metrics per batch and average them over batches (the last, smaller batch weighs as much)."""
    order = torch.randperm(len(gold), generator=torch.Generator().manual_seed(seed)).numpy()
    per_batch = [sts_metrics(emb1[idx], emb2[idx], np.asarray(gold)[idx])
                 for idx in np.array_split(order, range(batch_size, len(order), batch_size))]
    return {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}


def format_table(rows):
    """Markdown table in the papers' column order, two decimals, x100."""
    lines = ["| model | dataset | protocol | AVG | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|---:|" + "---:|" * len(COLUMNS)]
    for row in rows:
        m = row["metrics"]
        lines.append(f"| {row['model']} | {row['dataset']} | {row['protocol']} | {m['avg']:.2f} | "
                     + " | ".join(f"{m[k]:.2f}" for k in METRICS) + " |")
    return "\n".join(lines)


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


def load_backbone(path):
    """The model whose last_hidden_state sentence-transformers pools for this checkpoint: the
    encoder alone for the T5 family (T5EncoderModel, no decoder weights), else AutoModel -- which,
    for BART-like encoder-decoders, returns the decoder states over the right-shifted input. Weights
    are loaded in float32 whatever dtype they were saved in (transformers 5 would otherwise keep it)."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type in ("t5", "mt5", "umt5"):
        model_class = getattr(transformers, f"{config.model_type.upper()}EncoderModel")
        return model_class.from_pretrained(path, dtype=torch.float32)
    return AutoModel.from_pretrained(path, dtype=torch.float32)


class FolderEncoder(nn.Module):
    """Embeddings of a saved model folder, computed as sentence-transformers computes them."""

    def __init__(self, path, pooling=None):
        super().__init__()
        transformer_dir, self.pooling, self.normalize = path, pooling, False
        self.heads = nn.ModuleList()
        modules_file = os.path.join(path, "modules.json")
        if os.path.isfile(modules_file):
            with open(modules_file) as f:
                modules = json.load(f)
            for module in modules:
                kind, sub = module["type"].rsplit(".", 1)[-1], os.path.join(path, module["path"])
                if kind == "Transformer":
                    transformer_dir = sub
                elif kind == "Pooling":
                    self.pooling = _pooling_mode(os.path.join(sub, "config.json"))
                elif kind == "Dense":
                    self.heads.append(_load_dense(sub))
                elif kind == "Normalize":
                    self.normalize = True
                else:
                    raise ValueError(f"{modules_file}: module type {module['type']} is not supported")
        elif pooling is None:
            raise ValueError(f"{path} has no modules.json, so its pooling is unknown: pass --pooling "
                             f"(cls for [CLS], mean for mean pooling, pooler for pooler_output)")
        try:
            self.tokenizer = load_tokenizer(transformer_dir)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {transformer_dir}: {e}") from None
        self.backbone = load_backbone(transformer_dir)
        self.max_len = None
        config_file = os.path.join(transformer_dir, "sentence_bert_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                self.max_len = json.load(f).get("max_seq_length")

    def forward(self, input_ids, attention_mask):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "pooler":
            emb = out.pooler_output
        else:
            emb = hidden[:, 0]
        for head in self.heads:
            emb = head(emb)
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb


def _pooling_mode(config_file):
    with open(config_file) as f:
        cfg = json.load(f)
    mode = cfg.get("pooling_mode") or ("cls" if cfg.get("pooling_mode_cls_token") else
                                       "mean" if cfg.get("pooling_mode_mean_tokens") else None)
    if mode not in ("cls", "mean"):
        raise ValueError(f"{config_file}: pooling {cfg} is not supported (cls or mean)")
    return mode


def _load_dense(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    linear = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
    weights_file = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights_file):
        from safetensors.torch import load_file
        state = load_file(weights_file)
    else:
        state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    activation = cfg.get("activation_function", "torch.nn.modules.linear.Identity").rsplit(".", 1)[-1]
    if activation not in ("Tanh", "Identity"):
        raise ValueError(f"{folder}: Dense activation {activation} is not supported (Tanh or Identity)")
    return nn.Sequential(linear, nn.Tanh() if activation == "Tanh" else nn.Identity())


@torch.no_grad()
def encode_tokenized(embed, tokenized, pad_id, batch_size=64, device="cpu", desc=None, amp_dtype=None):
    """Embeddings (float32 numpy, input order) of a TokenizedTexts. Batches are formed from
    length-sorted texts, and a batch ends where the length changes once it holds a quarter of
    ``batch_size``, so most batches hold texts of one length and carry no padding at all (7% fewer
    tokens than plain sorted batches on KorSTS test). ``embed`` must already be in eval mode."""
    lengths = tokenized.lengths()
    order = np.argsort(-lengths, kind="stable")
    ordered, batches, start = lengths[order], [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or end - start == batch_size or (
                ordered[end] != ordered[start] and end - start >= max(1, batch_size // 4)):
            batches.append(order[start:end])
            start = end
    out = None
    for idx in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        batch = {k: v.to(device) for k, v in pad_batch([tokenized[i] for i in idx], pad_id).items()}
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            emb = embed(**batch).float().cpu().numpy()
        if out is None:
            out = np.empty((len(order), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    return out


def encode(embed, tokenizer, sentences, max_len, batch_size=64, device="cpu", desc=None, stats=None):
    """Embeddings (float32 numpy, input order) of ``sentences``; a sentence that occurs more than once
    is encoded once (KorSTS test repeats 9% of its sentences). ``stats`` (a dict), if given, receives the
    number of distinct sentences and of those cut at ``max_len`` tokens."""
    index = {}
    rows = np.array([index.setdefault(s, len(index)) for s in sentences], dtype=np.int64)
    tokenized = TokenizedTexts(tokenizer, list(index), max_len, desc="tokenize" if desc else None)
    if stats is not None:
        stats.update(sentences=len(tokenized), truncated=tokenized.num_truncated)
    emb = encode_tokenized(embed, tokenized, tokenizer.pad_token_id, batch_size, device, desc)
    return emb[rows] if emb is not None else emb


def evaluate_sts(embed, tokenizer, pairs, max_len, batch_size, device, protocols=("standard",), seed=42,
                 stats=None):
    """{protocol: metrics} for (sentence1, sentence2, score) pairs; ``stats``: see encode."""
    n = len(pairs)
    emb = encode(embed, tokenizer, [p[0] for p in pairs] + [p[1] for p in pairs], max_len, batch_size,
                 device, desc="encode", stats=stats)
    gold = np.array([p[2] for p in pairs])
    return {p: sts_metrics(emb[:n], emb[n:], gold) if p == "standard"
            else bmk_metrics(emb[:n], emb[n:], gold, batch_size, seed) for p in protocols}


def _corpus_chunks(corpus, chunk_size):
    if isinstance(corpus, list):
        for start in range(0, len(corpus), chunk_size):
            yield corpus[start:start + chunk_size]
        return
    chunk = []
    for _, line in iter_lines(corpus):
        chunk.append(line.strip())
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def semantic_search(embed, tokenizer, queries, corpus, top_k=5, chunk_size=20_000, max_len=128,
                    batch_size=64, device="cpu"):
    """Top-k corpus sentences by cosine for each query: a list (per query) of (score, index, sentence).

    ``corpus`` is a list of sentences or the path of a one-sentence-per-line file; a file is read and
    encoded ``chunk_size`` lines at a time, keeping only the running top-k, and the winning lines
    are read back at the end, so memory does not grow with the corpus.
    """
    q = torch.nn.functional.normalize(torch.from_numpy(
        encode(embed, tokenizer, queries, max_len, batch_size, device)), dim=-1)
    best_scores, best_ids, seen = torch.empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long), 0
    total = len(corpus) if isinstance(corpus, list) else sum(1 for _ in iter_lines(corpus))
    with tqdm(total=total, desc="search", unit="sent", disable=total <= chunk_size) as bar:
        for chunk in _corpus_chunks(corpus, chunk_size):
            c = torch.nn.functional.normalize(torch.from_numpy(
                encode(embed, tokenizer, chunk, max_len, batch_size, device)), dim=-1)
            scores, ids = (q @ c.T).topk(min(top_k, len(chunk)), dim=1)
            best_scores = torch.cat([best_scores, scores], dim=1)
            best_ids = torch.cat([best_ids, ids + seen], dim=1)
            best_scores, keep = best_scores.topk(min(top_k, best_scores.shape[1]), dim=1)
            best_ids = best_ids.gather(1, keep)
            seen += len(chunk)
            bar.update(len(chunk))
    wanted = set(best_ids.flatten().tolist())
    if isinstance(corpus, list):
        text = {i: corpus[i] for i in wanted}
    else:
        text = {i: line.strip() for i, (_, line) in enumerate(iter_lines(corpus)) if i in wanted}
    return [[(float(s), int(i), text[int(i)]) for s, i in zip(srow, irow)]
            for srow, irow in zip(best_scores, best_ids)]


def print_search_results(queries, results):
    """The printed format of the KoSBERT/KoSimCSE SemanticSearch examples."""
    for query, hits in zip(queries, results):
        print("\n\n======================\n\n")
        print("Query:", query)
        print(f"\nTop {len(hits)} most similar sentences in corpus:")
        for score, _, sentence in hits:
            print(sentence, "(Score: %.4f)" % score)


# ----------------------------------------------------------------------------------------------
# Index once, query many: --task index encodes a corpus once into D/, --task search --index_dir D
# answers queries from it. Layout of a complete index D/:
#   embeddings.npy   (count, dim) float32 or float16, L2-normalised rows (inner product = cosine)
#   offsets.npy      (count,) int64 byte offset of each sentence's line in the corpus file
#   index.faiss      the faiss index over those rows
#   index_meta.json  how it was built (model fingerprint, pooling, max_len, prefix, corpus, ...);
#                    written last, so its presence marks a complete index
# A build in progress keeps its chunks in D/chunks/ (NNNNNN.npy + progress.json) and resumes there.

INDEX_META = "index_meta.json"
INDEX_FILES = {"embeddings": "embeddings.npy", "offsets": "offsets.npy", "faiss": "index.faiss"}
INDEX_FORMAT = 1
INDEX_DEFAULTS = {"hnsw_m": 32, "ef_construction": 40, "ef_search": 64, "nprobe": 16}
# What the queries must share with the corpus embeddings for the scores to mean anything.
RECIPE_KEYS = ("model_fingerprint", "pooling", "dense_heads", "normalize", "max_len", "prefix")


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(path, write):
    """Write ``path`` via ``write(binary file)`` into ``path.tmp``, fsync it, then os.replace it over
    ``path``: a reader (or a killed build) sees the old file or the whole new one, never a part."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _save_json_atomic(path, obj):
    save_atomic(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8")))


def _require_file(path):
    """DataError unless ``path`` is a non-empty file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")


def corpus_offsets(path):
    """(offsets, info) of a one-sentence-per-line file: the int64 byte offset of every non-blank line
    (the lines ``semantic_search`` reads, in its order) and {path, size, mtime_ns, sha256}. One pass
    over the file; a line that is not UTF-8 stops with DataError naming the line."""
    _require_file(path)
    stat, digest, offsets, pos = os.stat(path), hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                offsets.append(pos)
            pos += len(raw)
    if not offsets:
        raise DataError(f"{path}: has no non-blank lines")
    info = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": digest.hexdigest()}
    return np.asarray(offsets, dtype=np.int64), info


def read_lines_at(path, offsets):
    """The sentences (stripped) at byte ``offsets`` of ``path``: one seek + readline each."""
    out = []
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(int(offset))
            out.append(f.readline().decode("utf-8").strip())
    return out


def model_fingerprint(encoder):
    """sha256 of what the embeddings depend on besides the flags: every weight of the encoder
    (backbone and Dense heads: names, shapes and values, as loaded in float32) and the tokenizer's
    vocabulary. Equal for a copied or re-saved folder, different for any other checkpoint; ~1 s per
    GB of weights."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    vocab = sorted(encoder.tokenizer.get_vocab().items())
    digest.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def index_recipe(model_dir, encoder, max_len, prefix):
    """How sentences are turned into vectors: the model (folder and fingerprint), pooling, Dense
    heads, the model's own Normalize, max_len and the prefix put before every sentence."""
    return {"model_dir": os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir,
            "model_fingerprint": model_fingerprint(encoder), "pooling": encoder.pooling,
            "dense_heads": len(encoder.heads), "normalize": bool(encoder.normalize),
            "max_len": int(max_len), "prefix": prefix}


def build_faiss_index(embeddings, index_type="flat", dtype="float32", params=None, add_batch=100_000):
    """(faiss index, info) over the rows of ``embeddings`` (L2-normalised, so inner product = cosine;
    a memmap is fine: rows go in ``add_batch`` at a time, as float32):

      flat  IndexFlatIP: exact. float16: IndexScalarQuantizer(QT_fp16), exact over the fp16 values.
      hnsw  IndexHNSWFlat(METRIC_INNER_PRODUCT), params hnsw_m, ef_construction, ef_search.
            float16: IndexHNSWSQ(QT_fp16).
      ivf   IndexIVFFlat over an IndexFlatIP quantizer, params nlist (default 4*sqrt(count), at
            most count/39) and nprobe; k-means trained on a seeded sample of up to 64*nlist rows.
            float16: IndexIVFScalarQuantizer(QT_fp16).

    ``info`` names the class and every parameter, for index_meta.json."""
    import faiss
    params = {k: v for k, v in (params or {}).items() if v is not None}
    n, dim = embeddings.shape
    ip, fp16, qt = faiss.METRIC_INNER_PRODUCT, dtype == "float16", faiss.ScalarQuantizer.QT_fp16
    info = {"type": index_type, "metric": "inner_product"}
    if index_type == "flat":
        index = faiss.IndexScalarQuantizer(dim, qt, ip) if fp16 else faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        m = int(params.get("hnsw_m", INDEX_DEFAULTS["hnsw_m"]))
        index = faiss.IndexHNSWSQ(dim, qt, m, ip) if fp16 else faiss.IndexHNSWFlat(dim, m, ip)
        index.hnsw.efConstruction = int(params.get("ef_construction", INDEX_DEFAULTS["ef_construction"]))
        index.hnsw.efSearch = int(params.get("ef_search", INDEX_DEFAULTS["ef_search"]))
        info.update(hnsw_m=m, ef_construction=index.hnsw.efConstruction, ef_search=index.hnsw.efSearch)
    elif index_type == "ivf":
        nlist = int(params.get("nlist") or max(1, min(int(4 * n ** 0.5), n // 39)))
        quantizer = faiss.IndexFlatIP(dim)  # faiss' Python wrapper keeps it alive with the index
        index = (faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qt, ip) if fp16
                 else faiss.IndexIVFFlat(quantizer, dim, nlist, ip))
        index.nprobe = int(params.get("nprobe", INDEX_DEFAULTS["nprobe"]))
        info.update(nlist=nlist, nprobe=index.nprobe)
    else:
        raise ValueError(f"unknown index type {index_type!r} (flat, hnsw or ivf)")
    if not index.is_trained:
        size = min(n, 64 * info.get("nlist", 1) if index_type == "ivf" else 100_000)
        rows = np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
        index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
        info["train_size"] = size
    for start in range(0, n, add_batch):
        index.add(np.ascontiguousarray(embeddings[start:start + add_batch], dtype=np.float32))
    info["faiss_class"] = type(index).__name__
    return index, info


def write_faiss_index(index_dir, embeddings, index_type="flat", dtype="float32", params=None):
    """Build the faiss index over ``embeddings`` and write it atomically to D/index.faiss; its info."""
    import faiss
    index, info = build_faiss_index(embeddings, index_type, dtype, params)
    path = os.path.join(index_dir, INDEX_FILES["faiss"])
    faiss.write_index(index, path + ".tmp")
    with open(path + ".tmp", "rb") as f:
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    _fsync_dir(index_dir)
    return info


def _mismatches(recorded, current, keys):
    return [f"{k} {recorded.get(k)!r} (now {current.get(k)!r})" for k in keys if recorded.get(k) != current.get(k)]


def _encode_chunks(encoder, tokenizer, corpus_file, offsets, chunks_dir, progress, recipe, chunk_size,
                   batch_size, device):
    """Encode the corpus ``chunk_size`` sentences at a time into chunks_dir/NNNNNN.npy (L2-normalised,
    in ``progress['dtype']``), each written atomically and then recorded in progress.json, starting
    after the chunks a previous, interrupted run recorded. Returns the chunk paths."""
    n, num_chunks = len(offsets), -(-len(offsets) // chunk_size)
    paths = [os.path.join(chunks_dir, f"{i:06d}.npy") for i in range(num_chunks)]
    done = progress["chunks_done"]
    prefix, dtype = recipe["prefix"], np.dtype(progress["dtype"])
    with tqdm(total=n, initial=min(n, done * chunk_size), desc="index", unit="sent", unit_scale=True,
              dynamic_ncols=True) as bar, open(corpus_file, "rb") as f:
        for i in range(done, num_chunks):
            f.seek(int(offsets[i * chunk_size]))
            want, chunk = min(chunk_size, n - i * chunk_size), []
            while len(chunk) < want:
                line = f.readline().decode("utf-8").strip()
                if line:
                    chunk.append(prefix + line)
            emb = torch.nn.functional.normalize(torch.from_numpy(
                encode(encoder, tokenizer, chunk, recipe["max_len"], batch_size, device)), dim=-1).numpy()
            save_atomic(paths[i], lambda out: np.save(out, emb.astype(dtype)))
            progress["chunks_done"] = i + 1
            _save_json_atomic(os.path.join(chunks_dir, "progress.json"), progress)
            bar.update(len(chunk))
    return paths


def build_index(encoder, tokenizer, model_dir, corpus_file, index_dir, index_type="flat", dtype="float32",
                chunk_size=20_000, max_len=128, prefix="", batch_size=64, device="cpu", params=None, log=print):
    """Encode ``corpus_file`` (one sentence per line, blank lines skipped, as ``semantic_search``
    reads it) once into ``index_dir`` and return its index_meta.json contents.

    Sentences are encoded ``chunk_size`` at a time, exactly as ``semantic_search`` encodes its chunks
    (``prefix`` + sentence, L2-normalised), and each chunk is saved atomically under D/chunks/ with
    a progress record, so a killed build rerun with the same flags resumes after its last saved
    chunk and ends byte-identical to an uninterrupted one. At the end the chunks are assembled into
    D/embeddings.npy (``dtype`` float32 or float16), the line offsets into D/offsets.npy, the faiss
    index (``build_faiss_index``) into D/index.faiss, and D/index_meta.json is written last."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"index dtype {dtype!r}: float32 or float16")
    if os.path.isfile(os.path.join(index_dir, INDEX_META)):
        raise DataError(f"{index_dir}: already holds a complete index ({INDEX_META}); remove it or "
                        f"choose another --index_dir")
    start_time = time.time()
    offsets, corpus = corpus_offsets(corpus_file)
    recipe = index_recipe(model_dir, encoder, max_len, prefix)
    chunks_dir = os.path.join(index_dir, "chunks")
    os.makedirs(chunks_dir, exist_ok=True)
    progress = {"format": INDEX_FORMAT, "recipe": recipe, "dtype": dtype, "chunk_size": chunk_size,
                "batch_size": batch_size, "device": torch.device(device).type,
                "corpus": {k: corpus[k] for k in ("path", "size", "sha256")}, "count": len(offsets),
                "chunks_done": 0}
    progress_file = os.path.join(chunks_dir, "progress.json")
    if os.path.isfile(progress_file):
        try:
            with open(progress_file) as f:
                previous = json.load(f)
            previous["recipe"], previous["corpus"], previous["chunks_done"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{progress_file}: unreadable progress record ({type(e).__name__}: {e}); "
                            f"delete {chunks_dir} to start over") from None
        differ = (_mismatches(previous["recipe"], recipe, RECIPE_KEYS)
                  + _mismatches(previous, progress, ("format", "dtype", "chunk_size", "batch_size", "device", "count"))
                  + _mismatches(previous["corpus"], progress["corpus"], ("path", "size", "sha256")))
        if differ:
            raise DataError(f"{progress_file}: a partial build with other settings ({'; '.join(differ)}); "
                            f"rerun with the same flags to resume it, or delete {chunks_dir} to start over")
        missing = [f"{i:06d}.npy" for i in range(previous["chunks_done"])
                   if not os.path.isfile(os.path.join(chunks_dir, f"{i:06d}.npy"))]
        if missing:
            raise DataError(f"{progress_file}: records {previous['chunks_done']} chunks but {missing[0]} is "
                            f"missing; delete {chunks_dir} to start over")
        progress["chunks_done"] = previous["chunks_done"]
        log(f"{chunks_dir}: resuming after {previous['chunks_done']} of {-(-len(offsets) // chunk_size)} chunks "
            f"({min(len(offsets), previous['chunks_done'] * chunk_size):,} sentences already encoded)")
    paths = _encode_chunks(encoder, tokenizer, corpus_file, offsets, chunks_dir, progress, recipe, chunk_size,
                           batch_size, device)
    encode_seconds = time.time() - start_time

    dim = np.load(paths[0], mmap_mode="r").shape[1]
    emb_path = os.path.join(index_dir, INDEX_FILES["embeddings"])
    emb = np.lib.format.open_memmap(emb_path + ".tmp", mode="w+", dtype=dtype, shape=(len(offsets), dim))
    row = 0
    for path in paths:
        chunk = np.load(path)
        emb[row:row + len(chunk)] = chunk
        row += len(chunk)
    emb.flush()
    del emb
    with open(emb_path + ".tmp", "rb") as f:
        os.fsync(f.fileno())
    os.replace(emb_path + ".tmp", emb_path)
    save_atomic(os.path.join(index_dir, INDEX_FILES["offsets"]), lambda out: np.save(out, offsets))
    faiss_start = time.time()
    index_info = write_faiss_index(index_dir, np.load(emb_path, mmap_mode="r"), index_type, dtype, params)
    meta = {"format": INDEX_FORMAT, **recipe, "normalized": "l2 (inner product = cosine)", "dtype": dtype,
            "dim": int(dim), "count": len(offsets), "chunk_size": chunk_size, "batch_size": batch_size,
            "device": progress["device"], "corpus": corpus, "index": index_info, "files": INDEX_FILES,
            "encode_seconds": round(encode_seconds, 1), "faiss_seconds": round(time.time() - faiss_start, 1),
            "build_seconds": round(time.time() - start_time, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _save_json_atomic(os.path.join(index_dir, INDEX_META), meta)
    shutil.rmtree(chunks_dir)
    return meta


def load_index(index_dir, nprobe=None, ef_search=None):
    """A complete index of ``build_index`` as a dict: ``meta`` (index_meta.json), ``embeddings``
    (memory-mapped), ``offsets`` (memory-mapped) and ``faiss`` (read with IO_FLAG_MMAP_IFC for
    flat/hnsw storage and IO_FLAG_MMAP for ivf lists: the vectors stay on disk). ``nprobe`` and
    ``ef_search`` override the build's values. DataError (one line) for anything incomplete or
    inconsistent, and when the corpus file changed since the build."""
    import faiss
    meta_file = os.path.join(index_dir, INDEX_META)
    if not os.path.isdir(index_dir):
        raise DataError(f"{index_dir}: no such index folder")
    if not os.path.isfile(meta_file):
        partial = os.path.isdir(os.path.join(index_dir, "chunks"))
        raise DataError(f"{index_dir}: not a complete index (no {INDEX_META}" + (
            "; it holds a partial build in chunks/: rerun --task index with the same flags to finish it)"
            if partial else "; build one with --task index)"))
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        count, dim, kind = meta["count"], meta["dim"], meta["index"]["type"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_file}: not an index_meta.json of this script ({type(e).__name__}: {e})") from None
    if meta.get("format") != INDEX_FORMAT:
        raise DataError(f"{meta_file}: index format {meta.get('format')!r}, this script reads {INDEX_FORMAT}")
    paths = {k: os.path.join(index_dir, v) for k, v in INDEX_FILES.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (the index is incomplete; rebuild it)")
    embeddings = np.load(paths["embeddings"], mmap_mode="r")
    offsets = np.load(paths["offsets"], mmap_mode="r")
    if embeddings.shape != (count, dim) or embeddings.dtype != np.dtype(meta["dtype"]):
        raise DataError(f"{paths['embeddings']}: {embeddings.dtype} {embeddings.shape}, index_meta.json says "
                        f"{meta['dtype']} ({count}, {dim})")
    if offsets.shape != (count,):
        raise DataError(f"{paths['offsets']}: {offsets.shape[0]} offsets for {count} sentences")
    flags = faiss.IO_FLAG_MMAP if kind == "ivf" else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
    try:
        index = faiss.read_index(paths["faiss"], flags)
    except RuntimeError as e:
        raise DataError(f"{paths['faiss']}: unreadable faiss index ({str(e).splitlines()[0][:200]})") from None
    if index.ntotal != count or index.d != dim:
        raise DataError(f"{paths['faiss']}: {index.ntotal} vectors of dim {index.d}, index_meta.json says {count} of {dim}")
    if kind == "ivf":
        index.nprobe = int(nprobe or meta["index"]["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(ef_search or meta["index"]["ef_search"])
    corpus = meta["corpus"]
    try:
        stat = os.stat(corpus["path"])
    except OSError:
        raise DataError(f"{corpus['path']}: corpus file of {index_dir} not found") from None
    if (stat.st_size, stat.st_mtime_ns) != (corpus["size"], corpus["mtime_ns"]):
        raise DataError(f"{corpus['path']}: changed since {index_dir} was built (size/mtime differ from "
                        f"{INDEX_META}); rebuild the index")
    return {"dir": index_dir, "meta": meta, "embeddings": embeddings, "offsets": offsets, "faiss": index}


def check_index_recipe(index, model_dir, encoder, max_len, prefix):
    """DataError (one line) unless the queries will be encoded as the index's corpus was: same model
    fingerprint, pooling, Dense heads, Normalize, max_len and prefix."""
    meta, current = index["meta"], index_recipe(model_dir, encoder, max_len, prefix)
    differ = _mismatches(meta, current, RECIPE_KEYS[1:])
    if meta.get("model_fingerprint") != current["model_fingerprint"]:
        differ.insert(0, f"another model ({meta.get('model_dir')}, fingerprint {str(meta.get('model_fingerprint'))[:12]}; "
                         f"now {current['model_dir']}, {current['model_fingerprint'][:12]})")
    if differ:
        raise DataError(f"{os.path.join(index['dir'], INDEX_META)}: index built with {'; '.join(differ)}: "
                        f"search with the model and flags it was built with, or rebuild it")


def encode_queries(encoder, tokenizer, queries, max_len=128, batch_size=64, device="cpu"):
    """L2-normalised float32 embeddings of ``queries`` (as ``semantic_search`` encodes them)."""
    return torch.nn.functional.normalize(torch.from_numpy(
        encode(encoder, tokenizer, queries, max_len, batch_size, device)), dim=-1).numpy()


def search_vectors(index, query_emb, top_k=5):
    """(scores, ids) of the ``top_k`` nearest rows of the index per query, best first, as lists of
    arrays (approximate indexes may return fewer than top_k; faiss' -1 padding is dropped)."""
    scores, ids = index["faiss"].search(np.ascontiguousarray(query_emb, dtype=np.float32), top_k)
    keep = ids >= 0
    return [s[k] for s, k in zip(scores, keep)], [i[k] for i, k in zip(ids, keep)]


def index_search(encoder, tokenizer, queries, index, top_k=5, max_len=128, batch_size=64, device="cpu"):
    """``semantic_search`` through an index from ``load_index``: a list (per query) of (score, index,
    sentence). The corpus is not read, except one seek + readline per result."""
    scores, ids = search_vectors(index, encode_queries(encoder, tokenizer, queries, max_len, batch_size, device),
                                 top_k)
    wanted = sorted({int(i) for row in ids for i in row})
    text = dict(zip(wanted, read_lines_at(index["meta"]["corpus"]["path"], index["offsets"][wanted])))
    return [[(float(s), int(i), text[int(i)]) for s, i in zip(srow, irow)] for srow, irow in zip(scores, ids)]


def cluster(embeddings, num_clusters, seed=42):
    from sklearn.cluster import KMeans
    return KMeans(n_clusters=num_clusters, random_state=seed, n_init=10).fit_predict(embeddings)


def plot_clusters(embeddings, labels, path, title=""):
    """Sentences in 2-D (PCA of the embeddings), coloured by cluster, numbered as printed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    xy = PCA(n_components=2, random_state=0).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(7, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=60)
    for i, (x, y) in enumerate(xy):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.legend(*scatter.legend_elements(), title="cluster", loc="best", fontsize=8)
    ax.set_title(title or "sentence embeddings (PCA), coloured by KMeans cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DATASET_NAMES = {"korsts-test": "KorSTS test", "korsts-dev": "KorSTS dev", "klue-sts-dev": "KLUE-STS dev"}
HUB_DATASETS = {"KorNLI": "kakaobrain/kor-nli", "KorSTS": "kakaobrain/kor-sts", "KLUE": "klue/klue",
                "wiki": "wikipedia"}


def _pooling(folder):
    path = os.path.join(folder, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return "unknown"
    with open(path) as f:
        cfg = json.load(f)
    return "cls" if cfg.get("pooling_mode_cls_token") else "mean" if cfg.get("pooling_mode_mean_tokens") else "other"


def write_model_card(folder, rows=()):
    """README.md of a saved model folder in the sentence-transformers card layout: YAML front matter
    (library, pipeline tag, language, base model, datasets, metrics, model-index), then how it was trained,
    its pooling, the 8-metric rows of ``rows`` (evaluation.py's JSON rows; merged with those of earlier
    calls, kept in eval_results.json) and usage with sentence-transformers and plain transformers."""
    results_path = os.path.join(folder, "eval_results.json")
    kept = []
    if os.path.isfile(results_path):
        with open(results_path) as f:
            kept = json.load(f)
    new = {(r["dataset"], r["protocol"]) for r in rows}
    rows = sorted([r for r in kept if (r["dataset"], r["protocol"]) not in new] + list(rows),
                  key=lambda r: (r["dataset"], r["protocol"]))
    with open(results_path, "w") as f:
        json.dump(rows, f, indent=2, ensure_ascii=False)
    info_path = os.path.join(folder, "training.json")
    info = {}
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
    pooling = _pooling(folder)
    datasets = sorted({hub for name in info.get("train_files", []) for key, hub in HUB_DATASETS.items()
                       if key in name} | {"kakaobrain/kor-sts"} | ({"klue/klue"} if any(
                           r["dataset"].startswith("klue") for r in rows) else set()))
    yaml = ["---", "language:", "- ko", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
            "tags:", "- sentence-transformers", "- feature-extraction", "- sentence-similarity", "- korean",
            f"- {info.get('method', 'korean-sentence-embeddings').lower()}"]
    if info.get("base_model") and not os.path.isabs(info["base_model"]):
        yaml.append(f"base_model: {info['base_model']}")
    yaml += ["datasets:"] + [f"- {d}" for d in datasets]
    yaml += ["metrics:"] + [f"- {m.split('_')[1]}_{m.split('_')[0]}" for m in METRICS]
    if rows:
        yaml += ["model-index:", f"- name: {info.get('method', 'model').lower()}-{info.get('mode') or 'model'}",
                 "  results:"]
        for r in rows:
            yaml += ["  - task:", "      type: semantic-similarity", "      name: Semantic Similarity",
                     "    dataset:", f"      name: {DATASET_NAMES.get(r['dataset'], r['dataset'])} ({r['protocol']})",
                     f"      type: {r['dataset']}", "    metrics:"]
            yaml += [f"    - type: {m.split('_')[1]}_{m.split('_')[0]}\n      value: {r['metrics'][m]:.4f}"
                     for m in METRICS]
    yaml.append("---")
    how = {"cls": "the [CLS] token's last hidden state (`last_hidden_state[:, 0]`)",
           "mean": "the mean of the token vectors over the attention mask"}.get(pooling, "see modules.json")
    body = [f"# {info.get('method', 'Korean sentence embedding')} {info.get('mode') or ''}".rstrip(), "",
            f"A Korean sentence-embedding model trained with {info.get('method', 'this toolkit')}"
            + (f" (`--mode {info['mode']}`)" if info.get("mode") else "")
            + (f" from `{info['base_model']}`" if info.get("base_model") else "") + ".", "",
            f"**Pooling: {pooling}** -- the sentence vector is {how}. `SentenceTransformer` reads this from "
            "`modules.json`; with plain `transformers`, pool the same way (below), or the embeddings will be wrong.",
            ""]
    if info:
        body += ["## Training", "", f"- data: {', '.join(info['train_files']) or '-'}",
                 f"- checkpoint selected on {info['dev_file']} ({info['dev_protocol']} protocol) at step "
                 f"{info['step']} of stage {info['stage']}", "", "```bash", info["command"], "```", ""]
    body += ["## Results (x100)", ""]
    if rows:
        body += ["| dataset | protocol | AVG | " + " | ".join(METRICS) + " |",
                 "|---|---|---:|" + "---:|" * len(METRICS)]
        body += [f"| {DATASET_NAMES.get(r['dataset'], r['dataset'])} | {r['protocol']} | {r['metrics']['avg']:.2f} | "
                 + " | ".join(f"{r['metrics'][m]:.2f}" for m in METRICS) + " |" for r in rows]
        body += ["", "standard: correlations over the whole set; bmk: BM-K's mean over shuffled batches.", ""]
    else:
        body += ["Not evaluated yet: `python <method>/evaluation.py --model_dir <this folder> --dataset korsts-test "
                 "korsts-dev klue-sts-dev --protocol standard bmk --output_json results.json` fills this in.", ""]
    pool_code = ("embeddings = out.last_hidden_state[:, 0]" if pooling == "cls" else
                 "mask = batch['attention_mask'].unsqueeze(-1).float()\n"
                 "    embeddings = (out.last_hidden_state * mask).sum(1) / mask.sum(1)")
    body += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             "model = SentenceTransformer('path/to/this/folder')  # backend='onnx': pip install sentence-transformers[onnx]",
             "embeddings = model.encode(['한 남자가 음식을 먹는다.', '한 남자가 빵 한 조각을 먹는다.'])",
             "print(model.similarity(embeddings, embeddings))", "```", "", "```python", "import torch",
             "from transformers import AutoModel, AutoTokenizer", "",
             "tokenizer = AutoTokenizer.from_pretrained('path/to/this/folder')",
             "model = AutoModel.from_pretrained('path/to/this/folder')",
             "batch = tokenizer(['한 남자가 음식을 먹는다.'], padding=True, truncation=True, return_tensors='pt')",
             "with torch.no_grad():", "    out = model(**batch)", f"    {pool_code}", "```", ""]
    if os.path.isdir(os.path.join(folder, "2_Dense")):
        body.insert(body.index("## Usage") + 1, "This folder also has a Dense layer after pooling (2_Dense): "
                    "use sentence-transformers, which applies it.\n")
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(yaml + [""] + body))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="saved model folder (ours or any sentence-transformers "
                   "folder), or a Hugging Face model folder/id together with --pooling")
    p.add_argument("--task", nargs="+", choices=TASKS, default=["sts"],
                   help="index: encode --corpus_file once into --index_dir; search: with --index_dir, "
                        "answer from that index, else stream --corpus_file; several run in order on one loaded "
                        "model (default: sts)")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="folder with KorSTS/, KLUE-STS/ (default: %(default)s)")
    p.add_argument("--dataset", nargs="+", default=["korsts-test"],
                   help="korsts-test, korsts-dev, klue-sts-dev, or a path to a KorSTS-style TSV / KLUE-STS "
                        "CSV or JSON; several may be given (default: korsts-test)")
    p.add_argument("--protocol", nargs="+", choices=("standard", "bmk"), default=["standard"],
                   help="standard: correlations over the whole set; bmk: BM-K's per-batch average over "
                        "shuffled batches of --batch_size pairs (default: standard)")
    p.add_argument("--batch_size", type=int, default=256,
                   help="encoding batch size, and the correlation batch of the bmk protocol (BM-K: 256)")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed of the bmk protocol; KMeans seed")
    p.add_argument("--max_len", type=int, default=None,
                   help="max tokens per sentence (default: max_seq_length of the folder, else 512)")
    p.add_argument("--pooling", choices=("cls", "mean", "pooler"), default=None,
                   help="pooling of a folder without modules.json, in sentence-transformers' names: cls = the raw "
                        "[CLS] vector (train.py's cls_before_pooler), mean, pooler = the checkpoint's pooler_output")
    p.add_argument("--prefix", default="", help="text put before every sentence (e.g. 'query: ' for e5 models)")
    p.add_argument("--output_json", default=None, help="write the result rows here (sts task)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--corpus_file", default=None, help="search: one sentence per line (default: the README example corpus)")
    p.add_argument("--queries", nargs="+", default=None, help="search: query sentences (default: the README examples)")
    p.add_argument("--queries_file", default=None, help="search: one query per line")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--chunk_size", type=int, default=20_000,
                   help="search/index: corpus lines encoded at a time; index: also the unit of resuming (default: %(default)s)")
    p.add_argument("--index_dir", default=None, help="index: folder to build the index in (a killed build "
                   "resumes there); search: answer from this index instead of streaming a corpus")
    p.add_argument("--index_type", choices=("flat", "hnsw", "ivf"), default="flat",
                   help="index: flat = exact (IndexFlatIP), hnsw (IndexHNSWFlat) or ivf (IndexIVFFlat) for "
                        "approximate search; all by inner product over L2-normalised rows = cosine (default: %(default)s)")
    p.add_argument("--index_dtype", choices=("float32", "float16"), default="float32",
                   help="index: stored embeddings (and faiss vectors) in float32, or float16 for half the disk "
                        "(default: %(default)s)")
    p.add_argument("--hnsw_m", type=int, default=INDEX_DEFAULTS["hnsw_m"], help="index, hnsw: links per node (default: %(default)s)")
    p.add_argument("--ef_construction", type=int, default=INDEX_DEFAULTS["ef_construction"],
                   help="index, hnsw: candidates while building (default: %(default)s)")
    p.add_argument("--ef_search", type=int, default=None,
                   help=f"hnsw: candidates per query (default: {INDEX_DEFAULTS['ef_search']} at build; the index's value at search)")
    p.add_argument("--nlist", type=int, default=None, help="index, ivf: k-means cells (default: 4*sqrt(count), at most count/39)")
    p.add_argument("--nprobe", type=int, default=None,
                   help=f"ivf: cells visited per query (default: {INDEX_DEFAULTS['nprobe']} at build; the index's value at search)")
    p.add_argument("--sentences_file", default=None,
                   help="cluster: one sentence per line (default: the example corpus + queries)")
    p.add_argument("--num_clusters", type=int, default=5)
    p.add_argument("--plot", default=None, help="cluster: PNG path (default: clusters.png beside --output_json, else ./clusters.png)")
    args = p.parse_args(argv)
    if "index" in args.task and not (args.corpus_file and args.index_dir):
        p.error("--task index needs --corpus_file and --index_dir")
    if "index" in args.task and "search" in args.task:
        p.error("--task index and search: build the index first, then search it with --task search --index_dir")
    if "search" in args.task and args.index_dir and args.corpus_file:
        p.error("--task search: give --index_dir (the index knows its corpus) or --corpus_file, not both")
    return args


def run_sts(args, encoder, max_len):
    """The 8 metrics of every --dataset under every --protocol: printed, written to --output_json, and
    merged into the model card of one of our training runs."""
    rows = []
    for name in args.dataset:
        pairs = [(args.prefix + a, args.prefix + b, s) for a, b, s in read_sts(resolve_path(name, args.data_dir))]
        stats = {}
        results = evaluate_sts(encoder, encoder.tokenizer, pairs, max_len, args.batch_size, args.device, args.protocol,
                               args.seed, stats)
        print(f"{name}: {len(pairs):,} pairs; {stats['truncated']} of {stats['sentences']:,} distinct sentences "
              f"truncated at --max_len {max_len}")
        for protocol, metrics in results.items():
            rows.append({"model": args.model_dir.rstrip("/"), "dataset": name, "protocol": protocol,
                         "n_pairs": len(pairs), "batch_size": args.batch_size if protocol == "bmk" else None,
                         "seed": args.seed if protocol == "bmk" else None, "max_len": max_len,
                         "n_truncated": stats["truncated"], "prefix": args.prefix, "metrics": metrics})
    print(format_table(rows))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(rows, f, ensure_ascii=False, indent=2)
    if os.path.isfile(os.path.join(args.model_dir, "training.json")) and not args.prefix:
        write_model_card(args.model_dir, rows)  # one of our training runs: its card gets these rows


def run_index(args, encoder, max_len):
    params = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": args.ef_search,
              "nlist": args.nlist, "nprobe": args.nprobe}
    meta = build_index(encoder, encoder.tokenizer, args.model_dir, args.corpus_file, args.index_dir, args.index_type,
                       args.index_dtype, args.chunk_size, max_len, args.prefix, args.batch_size, args.device, params)
    size = sum(os.path.getsize(os.path.join(args.index_dir, f)) for f in INDEX_FILES.values())
    print(f"index: {meta['count']:,} sentences x {meta['dim']} ({meta['dtype']}) -> {args.index_dir} "
          f"({meta['index']['faiss_class']}, {size / 2 ** 20:,.1f} MiB, {meta['build_seconds']:.1f} s)")


def run_search(args, encoder, max_len, index=None):
    queries = args.queries or ([l.strip() for _, l in iter_lines(args.queries_file)] if args.queries_file
                               else EXAMPLE_QUERIES)
    prefixed = [args.prefix + q for q in queries]
    if index is not None:
        check_index_recipe(index, args.model_dir, encoder, max_len, args.prefix)
        results = index_search(encoder, encoder.tokenizer, prefixed, index, args.top_k, max_len, args.batch_size,
                               args.device)
    else:
        corpus = args.corpus_file or EXAMPLE_CORPUS
        results = semantic_search(encoder, encoder.tokenizer, prefixed, corpus, args.top_k, args.chunk_size, max_len,
                                  args.batch_size, args.device)
    print_search_results(queries, results)


def run_cluster(args, encoder, max_len):
    sentences = ([l.strip() for _, l in iter_lines(args.sentences_file)] if args.sentences_file
                 else EXAMPLE_CORPUS + EXAMPLE_QUERIES)
    emb = encode(encoder, encoder.tokenizer, [args.prefix + s for s in sentences], max_len, args.batch_size,
                 args.device)
    labels = cluster(emb, args.num_clusters, args.seed)
    for c in range(args.num_clusters):
        print("Cluster ", c + 1)
        print([s for s, label in zip(sentences, labels) if label == c])
        print("")
    plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.output_json or "x")), "clusters.png")
    plot_clusters(emb, labels, plot)
    print(f"plot: {plot}")


def main(argv=None):
    args = parse_args(argv)
    index = None
    if "index" in args.task:  # bad input fails before the model is loaded
        _require_file(args.corpus_file)
    elif "search" in args.task and args.index_dir:
        index = load_index(args.index_dir, nprobe=args.nprobe, ef_search=args.ef_search)
    try:
        encoder = FolderEncoder(args.model_dir, pooling=args.pooling).to(args.device).eval()
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load model from {args.model_dir}: {e}")
    max_len = args.max_len or encoder.max_len or 512
    runs = {"sts": run_sts, "index": run_index, "search": functools.partial(run_search, index=index),
            "cluster": run_cluster}
    for task in dict.fromkeys(args.task):  # in the order given, each once
        runs[task](args, encoder, max_len)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")

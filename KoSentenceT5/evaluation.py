"""Evaluate a sentence-embedding model folder.

  --task sts      the 8 numbers of the Korean tables (Pearson/Spearman x cosine/euclidean/manhattan/
                  dot, x100) and their AVG on KorSTS test/dev, KLUE-STS dev or any STS file, under
                  the ``standard`` protocol (correlations over the whole set, as sentence-transformers'
                  EmbeddingSimilarityEvaluator) and/or BM-K's ``bmk`` protocol (correlations per
                  shuffled batch of --batch_size pairs, averaged over batches, as BM-K's KoSimCSE,
                  KoSentenceT5 and KoDiffCSE tables were computed).
  --task search   semantic search of queries against a corpus file, streamed in chunks so that a
                  1,000,000-sentence corpus needs memory for one chunk only.
  --task cluster  seeded KMeans over sentence embeddings, printed as in the KoSBERT example, plus a
                  2-D PNG of the sentences coloured by cluster.

The model folder is read the way sentence-transformers reads it (modules.json: Transformer ->
Pooling -> [Dense] -> [Normalize]), so the embeddings here are the ones
``SentenceTransformer(folder).encode`` gives; a plain Hugging Face folder needs --pooler.
"""
import argparse
import json
import os
import sys

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

    def __init__(self, path, pooler=None):
        super().__init__()
        transformer_dir, self.pooling, self.normalize = path, pooler, False
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
        elif pooler is None:
            raise ValueError(f"{path} has no modules.json, so its pooling is unknown: pass --pooler "
                             f"(cls_before_pooler for [CLS], mean for mean pooling, pooler for pooler_output)")
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
    return "mean" if mode == "mean" else "cls_before_pooler"


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


def encode(embed, tokenizer, sentences, max_len, batch_size=64, device="cpu", desc=None):
    """Embeddings (float32 numpy, input order) of ``sentences``; a sentence that occurs more than once
    is encoded once (KorSTS test repeats 9% of its sentences)."""
    index = {}
    rows = np.array([index.setdefault(s, len(index)) for s in sentences], dtype=np.int64)
    tokenized = TokenizedTexts(tokenizer, list(index), max_len, desc="tokenize" if desc else None)
    emb = encode_tokenized(embed, tokenized, tokenizer.pad_token_id, batch_size, device, desc)
    return emb[rows] if emb is not None else emb


def evaluate_sts(embed, tokenizer, pairs, max_len, batch_size, device, protocols=("standard",), seed=42):
    """{protocol: metrics} for (sentence1, sentence2, score) pairs."""
    n = len(pairs)
    emb = encode(embed, tokenizer, [p[0] for p in pairs] + [p[1] for p in pairs], max_len, batch_size,
                 device, desc="encode")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="saved model folder (ours or any sentence-transformers "
                   "folder), or a Hugging Face model folder/id together with --pooler")
    p.add_argument("--task", choices=("sts", "search", "cluster"), default="sts")
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
    p.add_argument("--pooler", choices=("cls_before_pooler", "cls", "mean", "pooler"), default=None,
                   help="pooling for a folder without modules.json (cls = cls_before_pooler here: no MLP)")
    p.add_argument("--prefix", default="", help="text put before every sentence (e.g. 'query: ' for e5 models)")
    p.add_argument("--output_json", default=None, help="write the result rows here (sts task)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--corpus_file", default=None, help="search: one sentence per line (default: the README example corpus)")
    p.add_argument("--queries", nargs="+", default=None, help="search: query sentences (default: the README examples)")
    p.add_argument("--queries_file", default=None, help="search: one query per line")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--chunk_size", type=int, default=20_000, help="search: corpus lines encoded at a time")
    p.add_argument("--sentences_file", default=None,
                   help="cluster: one sentence per line (default: the example corpus + queries)")
    p.add_argument("--num_clusters", type=int, default=5)
    p.add_argument("--plot", default=None, help="cluster: PNG path (default: clusters.png beside --output_json, else ./clusters.png)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        encoder = FolderEncoder(args.model_dir, pooler=args.pooler).to(args.device).eval()
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load model from {args.model_dir}: {e}")
    tok, max_len = encoder.tokenizer, args.max_len or encoder.max_len or 512
    prefixed = (lambda xs: [args.prefix + x for x in xs]) if args.prefix else (lambda xs: xs)
    if args.task == "sts":
        rows = []
        for name in args.dataset:
            pairs = [(args.prefix + a, args.prefix + b, s) for a, b, s in read_sts(resolve_path(name, args.data_dir))]
            results = evaluate_sts(encoder, tok, pairs, max_len, args.batch_size, args.device, args.protocol, args.seed)
            for protocol, metrics in results.items():
                rows.append({"model": args.model_dir.rstrip("/"), "dataset": name, "protocol": protocol,
                             "n_pairs": len(pairs), "batch_size": args.batch_size if protocol == "bmk" else None,
                             "seed": args.seed if protocol == "bmk" else None, "max_len": max_len,
                             "prefix": args.prefix, "metrics": metrics})
        print(format_table(rows))
        if args.output_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
            with open(args.output_json, "w") as f:
                json.dump(rows, f, ensure_ascii=False, indent=2)
    elif args.task == "search":
        queries = args.queries or ([l.strip() for _, l in iter_lines(args.queries_file)] if args.queries_file
                                   else EXAMPLE_QUERIES)
        corpus = args.corpus_file or EXAMPLE_CORPUS
        results = semantic_search(encoder, tok, prefixed(queries), corpus, args.top_k, args.chunk_size,
                                  max_len, args.batch_size, args.device)
        print_search_results(queries, results)
    else:
        sentences = ([l.strip() for _, l in iter_lines(args.sentences_file)] if args.sentences_file
                     else EXAMPLE_CORPUS + EXAMPLE_QUERIES)
        emb = encode(encoder, tok, prefixed(sentences), max_len, args.batch_size, args.device)
        labels = cluster(emb, args.num_clusters, args.seed)
        for c in range(args.num_clusters):
            print("Cluster ", c + 1)
            print([s for s, label in zip(sentences, labels) if label == c])
            print("")
        plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.output_json or "x")), "clusters.png")
        plot_clusters(emb, labels, plot)
        print(f"plot: {plot}")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")

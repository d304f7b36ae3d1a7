"""KoSentenceT5 model: sentence embeddings from encoder-decoder checkpoints (Sentence-T5 "ST5-Enc mean").

  --arch t5    the ENCODER of a T5 / mT5 / umT5 checkpoint (T5EncoderModel: decoder weights are not
               loaded), masked mean pooling, and with --st5_head Sentence-T5's projection: a Dense
               d->d without bias, then L2 normalisation.
  --arch bart  a BART checkpoint as sentence-transformers and BM-K's KoSentenceBART compute it: the
               model run on the sentence (decoder input = the sentence shifted right), masked mean
               pooling of the last hidden states. (sentence-transformers has no encoder-only BART
               class, so an encoder-only BART embedding could not be saved as a folder that
               SentenceTransformer reproduces; this choice keeps train, evaluation and ST identical.)

Saved folders are Transformer -> Pooling(mean) -> [Dense(no bias, identity) -> Normalize] for
sentence-transformers, and plain Hugging Face model folders for transformers.
"""
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel

T5_FAMILY = ("t5", "mt5", "umt5")
ARCHS = ("t5", "bart")


# Copied from KoSimCSE/model.py:mean_pool
def mean_pool(hidden, attention_mask):
    """Average of the token vectors where attention_mask is 1 (padding contributes nothing)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


# Copied from KoSimCSE/model.py:contrastive_loss
def contrastive_loss(embeddings, num_columns, temperature):
    """SimCSE's InfoNCE over one batch encoded in a single pass.

    ``embeddings`` is (num_columns*B, d): rows [0:B] are anchors, the rest are candidates (the
    positives, then the hard negatives if any). Logits are cos(anchor_i, candidate_j) / temperature,
    shape (B, (num_columns-1)*B), and the target of anchor i is candidate i (its own positive).
    """
    batch = embeddings.shape[0] // num_columns
    anchors = F.normalize(embeddings[:batch].float(), dim=-1)
    candidates = F.normalize(embeddings[batch:].float(), dim=-1)
    logits = anchors @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(batch, device=logits.device))


# Copied from KoSimCSE/model.py:length_buckets
def length_buckets(lengths, min_tokens):
    """Row groups of a batch for encoding each group padded only to its own longest row.

    ``lengths``: real tokens per row (a CPU tensor). Rows are sorted longest first and cut into
    contiguous groups so that the padded tokens of all groups (rows x longest row, summed) are as few
    as possible, under one constraint: every group but the first (the longest rows) holds at least
    ``min_tokens`` padded tokens, so that no forward pass gets too small to run efficiently. Exact, by
    dynamic programming over the distinct lengths (at most max_len of them). Returns
    [(row indices, padded length)]; one group when min_tokens <= 0."""
    if min_tokens <= 0 or len(lengths) == 0:
        return [(torch.arange(len(lengths)), int(lengths.max()) if len(lengths) else 0)]
    order = torch.argsort(lengths, descending=True, stable=True)
    ordered = lengths[order].tolist()
    runs = []  # [length, first position, end position] of each run of equal lengths in ``ordered``
    for pos, length in enumerate(ordered):
        if runs and runs[-1][0] == length:
            runs[-1][2] = pos + 1
        else:
            runs.append([length, pos, pos + 1])
    best, cut = [0] + [math.inf] * len(runs), [0] * (len(runs) + 1)  # best[j]: fewest tokens for runs[:j]
    for j in range(1, len(runs) + 1):
        end = runs[j - 1][2]
        for i in range(1, j + 1):  # the last group is runs[i-1:j], padded to runs[i-1]'s length
            tokens = runs[i - 1][0] * (end - runs[i - 1][1])
            if (i == 1 or tokens >= min_tokens) and best[i - 1] + tokens < best[j]:
                best[j], cut[j] = best[i - 1] + tokens, i - 1
    groups, j = [], len(runs)
    while j > 0:
        i = cut[j]
        groups.append((order[runs[i][1]:runs[j - 1][2]], runs[i][0]))
        j = i
    return groups[::-1]


# Copied from KoSimCSE/model.py:encode_in_chunks
def encode_in_chunks(encode, input_ids, attention_mask, chunk_rows):
    """Gradient caching (GradCache; sentence-transformers' CachedMultipleNegativesRankingLoss) with
    activation checkpointing: ``encode(input_ids, attention_mask) -> (rows, d)`` runs on chunks of
    ``chunk_rows`` rows, each under ``torch.utils.checkpoint``, so the forward keeps the (rows, d)
    embeddings of the whole batch but no chunk's activations. The caller computes the loss over the whole
    batch; backward then re-runs each chunk's forward with the RNG state it had the first time (the same
    dropout masks) and backpropagates that chunk's embedding gradients through it, one chunk at a time.
    Loss and gradients equal the uncached ones; activation memory is one chunk's, whatever the batch.
    chunk_rows <= 0, a batch that fits in one chunk, or no gradient being recorded: one plain call."""
    if chunk_rows <= 0 or len(input_ids) <= chunk_rows or not torch.is_grad_enabled():
        return encode(input_ids, attention_mask)
    return torch.cat([checkpoint(encode, input_ids[i:i + chunk_rows], attention_mask[i:i + chunk_rows],
                                 use_reentrant=False)
                      for i in range(0, len(input_ids), chunk_rows)])


# Copied from KoSimCSE/model.py:encode_in_length_buckets
def encode_in_length_buckets(embed, input_ids, attention_mask, min_tokens):
    """``embed(input_ids, attention_mask) -> (rows, d)`` over a right-padded batch, run per length
    bucket (see length_buckets) with the padding columns each bucket does not need cut off, then put
    back in row order. The result equals one pass over the whole batch (padding is masked out), but
    the encoder runs on far fewer padding tokens: a batch of sentences of mixed lengths, padded to its
    longest, is mostly padding (62% for SimCSE's (3B, L) KorNLI batches). All in one call, so DDP sees one
    forward."""
    groups = length_buckets(attention_mask.sum(1).cpu(), min_tokens)
    if len(groups) == 1:
        return embed(input_ids, attention_mask)
    parts, rows = [], []
    for idx, length in groups:
        idx = idx.to(input_ids.device)
        parts.append(embed(input_ids[idx, :length], attention_mask[idx, :length]))
        rows.append(idx)
    rows = torch.cat(rows)
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(len(rows), device=rows.device)
    return torch.cat(parts)[inverse]  # back in input order


def load_encoder(name_or_path, arch):
    """The backbone for --arch: T5EncoderModel-style for t5, the full BART-like model for bart."""
    config = AutoConfig.from_pretrained(name_or_path)
    if arch == "t5":
        if config.model_type not in T5_FAMILY:
            raise ValueError(f"--arch t5 needs a T5/mT5/umT5 checkpoint; {name_or_path} is '{config.model_type}'")
        return getattr(transformers, f"{config.model_type.upper()}EncoderModel").from_pretrained(name_or_path, dtype=torch.float32)
    if not config.is_encoder_decoder or config.model_type in T5_FAMILY:
        raise ValueError(f"--arch bart needs a BART-like encoder-decoder checkpoint; {name_or_path} is '{config.model_type}'")
    return AutoModel.from_pretrained(name_or_path, dtype=torch.float32)


class SentenceT5(nn.Module):
    def __init__(self, backbone, st5_head=False, bucket_tokens=0, mini_batch_size=0):
        super().__init__()
        self.backbone = backbone
        self.bucket_tokens = bucket_tokens  # > 0: encode in length buckets (encode_in_length_buckets)
        self.mini_batch_size = mini_batch_size  # > 0: gradient caching over chunks of this many sentences
        dim = backbone.config.d_model
        self.head = nn.Linear(dim, dim, bias=False) if st5_head else None

    @classmethod
    def from_pretrained(cls, name_or_path, arch="t5", **options):
        """The backbone of ``name_or_path`` for ``arch`` (see load_encoder); ``options`` go to __init__."""
        return cls(load_encoder(name_or_path, arch), **options)

    def forward(self, input_ids, attention_mask):
        """(rows, d) sentence embeddings of a right-padded batch; see encode_in_chunks and
        encode_in_length_buckets for how the rows are grouped (the result does not depend on it)."""
        return encode_in_chunks(self.encode_padded, input_ids, attention_mask, self.mini_batch_size)

    def encode_padded(self, input_ids, attention_mask):
        return encode_in_length_buckets(self.embed, input_ids, attention_mask, self.bucket_tokens)

    def embed(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeddings = mean_pool(hidden, attention_mask)
        if self.head is not None:
            embeddings = F.normalize(self.head(embeddings), dim=-1)
        return embeddings

    def save(self, out_dir, tokenizer, max_len):
        """A Hugging Face model folder that is also a sentence-transformers model folder."""
        self.backbone.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_sentence_transformers_config(out_dir, self.backbone.config.d_model, "mean", max_len, dense=self.head,
                                           dense_activation="identity", normalize=self.head is not None)


# Copied from KoSimCSE/model.py:split_pairs
def split_pairs(embeddings):
    """(u, v) from a (2B, d) batch whose rows [0:B] are first sentences and [B:2B] second ones."""
    batch = embeddings.shape[0] // 2
    return embeddings[:batch], embeddings[batch:]


# Copied from KoSimCSE/model.py:cosine_regression_loss
def cosine_regression_loss(embeddings, scores):
    """SBERT's regression objective (sentence-transformers' CosineSimilarityLoss).

    ``embeddings``: (2B, d), the B first sentences then the B second ones (see split_pairs and
    PairCollator); ``scores``: (B,) gold similarities scaled to 0-1 (KorSTS score / 5). Returns
    mean((cos(u_i, v_i) - score_i)^2) over the B pairs. Under DDP each rank scores its own pairs; the mean
    over equal slices makes DDP's gradient average the gradient of the global batch (no scaling)."""
    u, v = split_pairs(embeddings.float())
    return F.mse_loss(F.cosine_similarity(u, v, dim=-1), scores.float())


# Copied from KoSimCSE/model.py:gather_columns
def gather_columns(embeddings, num_columns):
    """Under torch.distributed, the (num_columns*b, d) local embeddings -> (num_columns*W*b, d) of
    the global batch, column by column (all anchors, then all positives, ...), so that every rank
    scores its anchors against the negatives of all ranks. Only the local slice keeps its gradient
    (as in SimCSE); the caller multiplies the loss by W so that DDP's gradient averaging gives the
    single-process gradient of the global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings
    columns = embeddings.reshape(num_columns, -1, embeddings.shape[-1])
    gathered = [torch.empty_like(columns) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, columns.detach().contiguous())
    gathered[dist.get_rank()] = columns
    return torch.cat(gathered, dim=1).reshape(-1, embeddings.shape[-1])


# Copied from KoSimCSE/model.py:write_sentence_transformers_config
def write_sentence_transformers_config(out_dir, dim, pooling_mode, max_len, dense=None,
                                       dense_activation="tanh", normalize=False):
    """modules.json + module configs in the classic layout that sentence-transformers 2.x to 6.x load:
    0 = the HF model in ``out_dir`` itself, 1_Pooling, [2_Dense (Linear + tanh|identity)], [Normalize]."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    with open(os.path.join(out_dir, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": max_len, "do_lower_case": False}, f, indent=2)
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": dim,
                   "pooling_mode_cls_token": pooling_mode == "cls",
                   "pooling_mode_mean_tokens": pooling_mode == "mean",
                   "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False}, f, indent=2)
    if dense is not None:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        os.makedirs(os.path.join(out_dir, "2_Dense"), exist_ok=True)
        with open(os.path.join(out_dir, "2_Dense", "config.json"), "w") as f:
            json.dump({"in_features": dense.in_features, "out_features": dense.out_features,
                       "bias": dense.bias is not None,
                       "activation_function": {"tanh": "torch.nn.modules.activation.Tanh",
                                              "identity": "torch.nn.modules.linear.Identity"}[dense_activation]}, f, indent=2)
        weights = {"linear.weight": dense.weight.detach().float().cpu().contiguous()}
        if dense.bias is not None:
            weights["linear.bias"] = dense.bias.detach().float().cpu().contiguous()
        save_file(weights, os.path.join(out_dir, "2_Dense", "model.safetensors"))
    if normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out_dir, f"{idx}_Normalize"), exist_ok=True)
    with open(os.path.join(out_dir, "modules.json"), "w") as f:
        json.dump(modules, f, indent=2)

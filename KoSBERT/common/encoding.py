# Copied from KoSimCSE/common/encoding.py (whole file; delete this line to own it)
"""Turning token batches into sentence vectors: pooling, length buckets, gradient caching, the DDP
gather of a contrastive batch, inference encoding (each distinct text once), and the
sentence-transformers config files of a saved folder."""
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .data import TokenizedTexts, pad_batch


def mean_pool(hidden, attention_mask):
    """Average of the token vectors where attention_mask is 1 (padding contributes nothing)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


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


def write_sentence_transformers_config(out_dir, dim, pooling_mode, max_len, dense=None,
                                       dense_activation="tanh", normalize=False, matryoshka_dims=(), prompts=None):
    """modules.json + module configs in the classic layout that sentence-transformers 2.x to 6.x load:
    0 = the HF model in ``out_dir`` itself, 1_Pooling, [2_Dense (Linear + tanh|identity)], [Normalize].
    ``matryoshka_dims`` (a model trained with --matryoshka_dims): written, largest first, to
    config_sentence_transformers.json as "matryoshka_dims", the dimensions it can be truncated to.
    sentence-transformers ignores that key; it loads a folder truncated when the same file holds
    "truncate_dim" (SentenceTransformer._parse_model_config), or with SentenceTransformer(path, truncate_dim=D)."""
    if matryoshka_dims:
        update_st_config(out_dir, matryoshka_dims=sorted(matryoshka_dims, reverse=True))
    if prompts:
        update_st_config(out_dir, prompts=dict(prompts), default_prompt_name=None)
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


def update_st_config(folder, **keys):
    """Merge ``keys`` into ``folder``/config_sentence_transformers.json (the keys already there are kept),
    written atomically. ``prompts={"query": "query: ", "passage": "passage: "}`` is how sentence-transformers
    records asymmetric prefixes: SentenceTransformer(folder).encode(q, prompt_name="query")."""
    path = os.path.join(folder, "config_sentence_transformers.json")
    config = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    config.update(keys)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


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

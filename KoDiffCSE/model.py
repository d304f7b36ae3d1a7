"""KoDiffCSE model: DiffCSE (Chuang et al., 2022) on stock transformers -- unsupervised SimCSE plus a
frozen masked-LM generator and a conditional replaced-token discriminator -- and its losses.

``DiffCSE.forward`` on a batch of B sentences, each twice (dropout makes the two views):
  1. encoder -> raw [CLS] -> projection (training only) -> the sentence vectors z, (2B, d).
  2. the generator (frozen, no gradient) fills the masked views by argmax; replaced = generated !=
     original, on real tokens.
  3. the discriminator (a second copy of the encoder checkpoint) reads the generated tokens conditioned
     on z the way the originals' patched ``BertModel(cls_input=z)`` is: the OUTPUT of its embedding layer
     at position 0 is replaced by z (``DiffCSE.discriminate``), and a Linear(hidden, 2) head scores every
     token original / replaced.
The losses are the free functions below: ``contrastive_loss`` (SimCSE's InfoNCE over z),
``replaced_token_loss`` (the head's cross-entropy) and ``diffcse_loss`` (contrastive + lambda * rtd).
Evaluation and the saved model use the encoder alone, raw [CLS] (``SentenceEncoder``, ``DiffCSE.encoder``).
"""
import json
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from evaluation import load_tokenizer
from run_utils import load_or_exit

PROJECTIONS = ("pooler", "bn_mlp", "mlp")


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


# --- the losses ------------------------------------------------------------------------------------------

# Copied from KoSimCSE/model.py:INFONCE_DIRECTIONS
INFONCE_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


# Copied from KoSimCSE/model.py:HARDNESS_MODES
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


# Copied from KoSimCSE/model.py:contrastive_loss
def contrastive_loss(embeddings, num_columns, temperature, hardness_mode=None, hardness_strength=0.0,
                     directions=("query_to_doc",), partition="joint"):
    """SimCSE's InfoNCE over one batch encoded in a single pass.

    ``embeddings`` is (num_columns*B, d): rows [0:B] are anchors, the rest are candidates (the
    positives, then the hard negatives if any). Logits are cos(anchor_i, candidate_j) / temperature,
    shape (B, (num_columns-1)*B), and the target of anchor i is candidate i (its own positive).

    The keyword options are those of sentence-transformers' MultipleNegativesRankingLoss (scale =
    1 / temperature), with its semantics; their defaults are the plain InfoNCE above, computed as before.
      hardness_mode      None, or which negatives get ``hardness_strength * cos`` (the cosine detached, not
                         divided by the temperature) added to their logit (Lan et al. 2025): in_batch_negatives
                         (the other examples' positives and hard negatives), hard_negatives (the anchor's own
                         hard negatives only; EmbeddingGemma), all_negatives (every candidate but the positive).
      directions         the softmax terms, query_to_doc (always; the one above) plus any of query_to_query
                         (anchor i vs the other anchors), doc_to_query (positive i vs every anchor: the backward
                         InfoNCE) and doc_to_doc (positive i vs the candidates of the other examples). Hardness
                         applies to query_to_doc only.
      partition          joint: one softmax over all the directions' logits; per_direction: one softmax per
                         direction, their log-normalisers averaged (not with query_to_query or doc_to_doc).
    Returns mean over anchors of (log normaliser - positive logit)."""
    batch = embeddings.shape[0] // num_columns
    anchors = F.normalize(embeddings[:batch].float(), dim=-1)
    candidates = F.normalize(embeddings[batch:].float(), dim=-1)
    logits = anchors @ candidates.T / temperature
    hard = hardness_mode is not None and hardness_strength > 0
    if not hard and tuple(directions) == ("query_to_doc",):
        return F.cross_entropy(logits, torch.arange(batch, device=logits.device))
    rows, cols = torch.arange(batch, device=logits.device), torch.arange(logits.shape[1], device=logits.device)
    own = cols[None, :] % batch == rows[:, None]  # the anchor's own positive and hard negatives
    if hard:
        penalised = {"in_batch_negatives": ~own, "hard_negatives": own & (cols[None, :] >= batch),
                     "all_negatives": cols[None, :] != rows[:, None]}[hardness_mode]
        logits = logits + hardness_strength * (anchors @ candidates.T).detach() * penalised
    positives, terms = candidates[:batch], [logits]
    if "query_to_query" in directions:
        terms.append((anchors @ anchors.T / temperature).masked_fill(torch.eye(batch, dtype=torch.bool,
                                                                                device=logits.device), -math.inf))
    if "doc_to_query" in directions:
        terms.append(positives @ anchors.T / temperature)
    if "doc_to_doc" in directions:
        terms.append((positives @ candidates.T / temperature).masked_fill(own, -math.inf))
    if partition == "joint":
        log_normaliser = torch.logsumexp(torch.cat(terms, dim=1), dim=1)
    else:
        log_normaliser = sum(torch.logsumexp(term, dim=1) for term in terms) / len(terms)
    return (log_normaliser - logits[rows, rows]).mean()


def replaced_token_loss(logits, replaced, attention_mask):
    """DiffCSE's replaced-token detection loss: the cross-entropy of the discriminator's per-token scores
    against the replaced labels, averaged over the real tokens of the batch.

    Inputs (N rows of L tokens; N = 2B, both views of every sentence):
      logits          (N, L, 2) float, differentiable: the scores of "original" (class 0) and "replaced"
                      (class 1) for every token (``DiffCSEOutput.rtd_logits``).
      replaced        (N, L) bool, the labels: the generator changed the token (``DiffCSEOutput.replaced``).
      attention_mask  (N, L), 1 on real tokens, 0 on padding; padding counts neither in the sum nor in
                      the mean.
    Returns a float32 scalar. The originals average over every position, padding included (labelled
    original); here padding is left out, so the value does not depend on how far a batch is padded.
    Under torch.distributed it is each process's mean over its own tokens, so DDP's averaging of the
    gradients is right as it is: no scaling by the world size (unlike ``contrastive_loss``)."""
    real = attention_mask.bool()
    return F.cross_entropy(logits[real].float(), replaced[real].long())


@torch.no_grad()
def replaced_token_accuracy(logits, replaced, attention_mask):
    """Share of the real tokens whose replaced / original label the discriminator gets right (the inputs
    of ``replaced_token_loss``); BM-K's "electra acc". A detached scalar, for the training log."""
    real = attention_mask.bool()
    return (logits[real].argmax(-1) == replaced[real]).float().mean()


def diffcse_loss(contrastive, rtd, lambda_weight, world_size=1):
    """DiffCSE's loss, contrastive + lambda_weight * rtd, and the scalar to backpropagate for it.

    Inputs:
      contrastive  ``contrastive_loss`` over the sentence vectors of both views (2 columns). Under
                   torch.distributed they are gathered from every process first (``gather_columns``), so
                   it is the loss of the global batch, differentiable in this process's rows only.
      rtd          ``replaced_token_loss`` over this process's tokens.
    Returns (to_backpropagate, loss), both scalars:
      to_backpropagate = world_size * contrastive + lambda_weight * rtd. DDP averages the gradients of the
                   processes; each holds the contrastive gradient of its own rows only, so that part is
                   multiplied by world_size for the average to be the global batch's gradient, while the
                   per-process RTD means are averaged as they should be.
      loss         = contrastive + lambda_weight * rtd, the value to log. The same number with one process."""
    weighted_rtd = lambda_weight * rtd
    return world_size * contrastive + weighted_rtd, contrastive + weighted_rtd


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


# --- the model -------------------------------------------------------------------------------------------

def projection_head(kind, backbone):
    """The training-only head over [CLS] that gives the sentence vectors z (evaluation uses raw [CLS]):
      pooler  the checkpoint's pooler, dense + tanh: BM-K's KoDiffCSE (its z is the encoder's pooler_output).
      bn_mlp  DiffCSE's ``--batchnorm`` ProjectionMLP: Linear(d, 2d, no bias) -> BatchNorm -> ReLU ->
              Linear(2d, d, no bias) -> BatchNorm(affine=False), batch statistics over the 2B rows.
      mlp     a new Linear + Tanh: SimCSE's MLP, DiffCSE without ``--batchnorm``."""
    dim = backbone.config.hidden_size
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
    if kind == "bn_mlp":
        return nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.BatchNorm1d(2 * dim), nn.ReLU(),
                             nn.Linear(2 * dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
    if kind != "pooler":
        raise ValueError(f"unknown projection {kind!r}; choose from {', '.join(PROJECTIONS)}")
    if getattr(backbone, "pooler", None) is None:
        raise ValueError(f"--projection pooler needs a checkpoint with a pooler; {type(backbone).__name__} has none")
    return nn.Sequential(backbone.pooler.dense, backbone.pooler.activation)


class SentenceEncoder(nn.Module):
    """The part of DiffCSE that is evaluated and saved: the encoder checkpoint's raw [CLS] vector."""

    def __init__(self, backbone, bucket_tokens=0):
        super().__init__()
        self.backbone = backbone
        self.bucket_tokens = bucket_tokens  # > 0: encode in length buckets (encode_in_length_buckets)

    def forward(self, input_ids, attention_mask):
        """(rows, d) raw [CLS] vectors of a right-padded batch (length buckets change nothing but the speed)."""
        return encode_in_length_buckets(self.embed, input_ids, attention_mask, self.bucket_tokens)

    def embed(self, input_ids, attention_mask):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def save(self, out_dir, tokenizer, max_len):
        """The encoder alone, as a Hugging Face + sentence-transformers folder ([CLS] pooling)."""
        self.backbone.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_sentence_transformers_config(out_dir, self.backbone.config.hidden_size, "cls", max_len)


class DiffCSEOutput(NamedTuple):
    """What ``DiffCSE.forward`` returns for N = 2B rows (view 1 of every sentence, then view 2)."""
    embeddings: torch.Tensor  # (N, d) the sentence vectors z, differentiable: contrastive_loss's input
    rtd_logits: torch.Tensor  # (N, L, 2) the discriminator's original / replaced scores per token
    replaced: torch.Tensor  # (N, L) bool: the generator changed the token (never on padding or position 0)


class DiffCSE(nn.Module):
    """Encoder + projection, frozen generator, discriminator + RTD head (see the module docstring).

    encoder, discriminator: two copies of the encoder checkpoint (AutoModel, BERT or RoBERTa family; the
    discriminator is trained too). generator: a masked LM with the encoder's vocabulary, never trained.
    vocabulary: what training_step's masking needs of the tokenizer (``dataloader.masking_vocabulary``),
    kept here so that training_step reaches it through the model (``model.module`` under DDP).
    generator_eval: run the generator in eval mode; the originals leave it in train mode (dropout on),
    so its argmax varies from pass to pass. bucket_tokens: see SentenceEncoder / encode_in_length_buckets.
    """

    def __init__(self, encoder, discriminator, generator, vocabulary, projection="pooler", generator_eval=False,
                 bucket_tokens=0):
        super().__init__()
        self.encoder = SentenceEncoder(encoder, bucket_tokens)
        self.discriminator, self.generator = discriminator, generator
        self.vocabulary, self.generator_eval = vocabulary, generator_eval
        self.generator.requires_grad_(False)
        for backbone in (encoder, discriminator):  # a pooler is unused unless it is the projection:
            if getattr(backbone, "pooler", None) is not None:  # no gradient, and none for DDP to wait for
                backbone.pooler.requires_grad_(backbone is encoder and projection == "pooler")
        self.projection = projection_head(projection, encoder)
        self.rtd_head = nn.Linear(discriminator.config.hidden_size, 2)

    @classmethod
    def from_pretrained(cls, model, generator_name, vocabulary, projection="pooler", **kwargs):
        """Encoder and discriminator from ``model``, the generator from ``generator_name``, in float32."""
        encoder, info = AutoModel.from_pretrained(model, output_loading_info=True, dtype=torch.float32)
        if projection == "pooler" and any(k.startswith("pooler.") for k in info["missing_keys"]):
            warnings.warn(f"--projection pooler: {model} has no trained pooler weights, so the pooler starts "
                          f"from transformers' initialisation (N(0, 0.02), bias 0), as in BM-K's code for such "
                          f"a checkpoint", stacklevel=2)
        return cls(encoder, AutoModel.from_pretrained(model, dtype=torch.float32),
                   AutoModelForMaskedLM.from_pretrained(generator_name, dtype=torch.float32), vocabulary,
                   projection, **kwargs)

    def train(self, mode=True):
        super().train(mode)
        if self.generator_eval:
            self.generator.eval()
        return self

    def forward(self, input_ids, attention_mask, mlm_input_ids):
        """One DiffCSE pass. ``input_ids``, ``attention_mask``: (2B, L), both views of B sentences,
        right-padded, view 1 of every sentence first (as ColumnCollator stacks them); ``mlm_input_ids``:
        the same rows masked for the generator (dataloader.mask_tokens or static_sep_masks)."""
        z = self.projection(self.encoder(input_ids, attention_mask))
        with torch.no_grad():
            generated = self.generator(input_ids=mlm_input_ids, attention_mask=attention_mask).logits.argmax(-1)
        generated[:, 0] = input_ids[:, 0]  # [CLS] stays, as in the originals
        generated = torch.where(attention_mask.bool(), generated, input_ids)  # padding stays padding
        replaced = generated != input_ids
        hidden = self.discriminate(generated, attention_mask, z)
        return DiffCSEOutput(z, self.rtd_head(hidden), replaced)

    def discriminate(self, input_ids, attention_mask, sentence_vectors):
        """The discriminator's last hidden states over ``input_ids``, conditioned on ``sentence_vectors``
        (N, d) as in DiffCSE's and BM-K's patched models (``cls_input``): the output of the embedding
        layer -- word + position + token-type embeddings, LayerNorm, dropout -- has its position 0
        replaced by the sentence vector, so the first layer receives z itself. Done with a forward hook on
        the stock embeddings module, removed again after the call."""
        def put_sentence_vector_first(module, inputs, output):
            return torch.cat([sentence_vectors[:, None].to(output.dtype), output[:, 1:]], dim=1)
        hook = self.discriminator.embeddings.register_forward_hook(put_sentence_vector_first)
        try:
            return self.discriminator(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            hook.remove()


def check_generator(path, generator_name, masking):
    """The generator's token ids go to the discriminator as they are, so the generator ``generator_name``
    must use the tokenizer of the encoder ``path`` and may not predict ids outside its embedding table;
    ``masking`` (--masking) needs a [MASK] or [SEP] token. Checked from the tokenizers and configs alone,
    before any weights are loaded; returns the encoder's tokenizer. Each failure is one clear line."""
    tokenizer = load_or_exit(load_tokenizer, path, "the encoder", "--model")
    generator_tokenizer = load_or_exit(load_tokenizer, generator_name, "the generator", "--generator_name")
    encoder_size = load_or_exit(AutoConfig.from_pretrained, path, "the encoder", "--model").vocab_size
    generator_size = load_or_exit(AutoConfig.from_pretrained, generator_name, "the generator",
                                  "--generator_name").vocab_size
    if generator_tokenizer.get_vocab() != tokenizer.get_vocab() or generator_size > encoder_size:
        raise SystemExit(
            f"error: the generator {generator_name} (tokenizer {len(generator_tokenizer):,} tokens, vocab_size "
            f"{generator_size:,}) does not share the vocabulary of the encoder {path} (tokenizer "
            f"{len(tokenizer):,} tokens, vocab_size {encoder_size:,}); pick a masked-LM generator trained with the "
            f"same tokenizer (e.g. klue/roberta-small for klue/roberta-base)")
    needed = {"dynamic": ("mask_token", "[MASK]"), "static_sep": ("sep_token", "[SEP]")}[masking]
    if getattr(tokenizer, needed[0] + "_id") is None:
        raise SystemExit(f"error: --masking {masking} needs a {needed[1]} token; the tokenizer of {path} has none")
    return tokenizer


# Copied from KoSimCSE/model.py:write_sentence_transformers_config
def write_sentence_transformers_config(out_dir, dim, pooling_mode, max_len, dense=None,
                                       dense_activation="tanh", normalize=False, matryoshka_dims=()):
    """modules.json + module configs in the classic layout that sentence-transformers 2.x to 6.x load:
    0 = the HF model in ``out_dir`` itself, 1_Pooling, [2_Dense (Linear + tanh|identity)], [Normalize].
    ``matryoshka_dims`` (a model trained with --matryoshka_dims): written, largest first, to
    config_sentence_transformers.json as "matryoshka_dims", the dimensions it can be truncated to.
    sentence-transformers ignores that key; it loads a folder truncated when the same file holds
    "truncate_dim" (SentenceTransformer._parse_model_config), or with SentenceTransformer(path, truncate_dim=D)."""
    if matryoshka_dims:
        with open(os.path.join(out_dir, "config_sentence_transformers.json"), "w") as f:
            json.dump({"matryoshka_dims": sorted(matryoshka_dims, reverse=True)}, f, indent=2)
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

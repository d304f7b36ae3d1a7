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

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel

from common.encoding import (encode_in_chunks, encode_in_length_buckets, gather_columns,
                             mean_pool, write_sentence_transformers_config)

T5_FAMILY = ("t5", "mt5", "umt5")
ARCHS = ("t5", "bart")


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
    def __init__(self, backbone, st5_head=False, bucket_tokens=0, mini_batch_size=0, matryoshka_dims=()):
        super().__init__()
        self.backbone = backbone
        self.matryoshka_dims = tuple(matryoshka_dims)  # trained truncations, recorded in the saved folder
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
                                           dense_activation="identity", normalize=self.head is not None,
                                           matryoshka_dims=self.matryoshka_dims)


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


# Copied from KoSimCSE/model.py:angle_similarity
def angle_similarity(u, v):
    """AnglE's similarity of the pairs (u_i, v_i), as sentence-transformers' pairwise_angle_sim (6.x) computes
    it: after L2 normalisation (and a zero column appended when d is odd), dimensions j and j + d/2 are the
    real and imaginary parts of d/2 complex numbers, and the score is |cos(u, v) + sum_j (im(u)_j re(v)_j -
    re(u)_j im(v)_j)|. (B, d), (B, d) -> (B,) float32."""
    u, v = F.normalize(u.float(), dim=-1), F.normalize(v.float(), dim=-1)
    if u.shape[-1] % 2:
        u, v = F.pad(u, (0, 1)), F.pad(v, (0, 1))
    re_u, im_u = u.chunk(2, dim=-1)
    re_v, im_v = v.chunk(2, dim=-1)
    return ((u * v).sum(-1) + (im_u * re_v - re_u * im_v).sum(-1)).abs()


# Copied from KoSimCSE/model.py:pair_ranking_loss
def pair_ranking_loss(similarities, scores, scale):
    """CoSENT's ranking objective over B scored pairs: log(1 + sum of exp(scale * (sim_j - sim_i))) over every
    two pairs i, j of the batch with scores[i] > scores[j] (ties give no term), i.e. a pair with a higher gold
    score should get the higher similarity. ``similarities``, ``scores``: (B,). Only the order of the scores
    matters, so 0-5 or 0-1 gold scores give the same loss."""
    scaled = similarities.float() * scale
    differences = scaled[None, :] - scaled[:, None]  # [i, j] = scale * (sim_j - sim_i)
    ranked = scores[:, None] > scores[None, :]
    return torch.logsumexp(torch.cat([differences.new_zeros(1), differences[ranked]]), dim=0)


# Copied from KoSimCSE/model.py:cosent_loss
def cosent_loss(embeddings, scores, scale=20.0):
    """CoSENT (sentence-transformers' CoSENTLoss, scale 20): pair_ranking_loss of the cosines of the pairs.

    ``embeddings``: (2B, d), the B first sentences then the B second ones (see split_pairs and
    PairCollator); ``scores``: (B,) gold similarities (any scale; only their order counts). The loss ranks
    every pair of the batch against every other, so under DDP it is taken over the gathered global batch
    (see sts_objective)."""
    u, v = split_pairs(embeddings.float())
    return pair_ranking_loss((F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1), scores, scale)


# Copied from KoSimCSE/model.py:angle_loss
def angle_loss(embeddings, scores, scale=20.0):
    """AnglE (sentence-transformers' AnglELoss, scale 20): pair_ranking_loss of the angle_similarity of the
    pairs. Inputs as cosent_loss."""
    u, v = split_pairs(embeddings)
    return pair_ranking_loss(angle_similarity(u, v), scores, scale)


# Copied from KoSimCSE/model.py:STS_LOSSES
STS_LOSSES = {"cosine": cosine_regression_loss, "cosent": cosent_loss, "angle": angle_loss}


# Copied from KoSimCSE/model.py:BATCH_STS_LOSSES
BATCH_STS_LOSSES = ("cosent", "angle")  # losses over the whole batch: gathered under DDP, loss x world


# Copied from KoSimCSE/model.py:sts_objective
def sts_objective(embeddings, scores, kind="cosine", matryoshka_dims=(), matryoshka_weights=None):
    """The STS loss --sts_loss ``kind`` (STS_LOSSES) of a (2B, d) pair batch and its (B,) scores, summed over
    ``matryoshka_dims`` when given (matryoshka_loss). cosine is a mean over the local pairs: under DDP, DDP's
    gradient average is already the global batch's. cosent and angle (BATCH_STS_LOSSES) compare every pair of
    the batch with every other: under torch.distributed the pairs and scores of all ranks are gathered first
    (gather_columns; only the local rows differentiable), and the caller multiplies the loss by the world
    size, as for contrastive_loss, so that the gradient equals the single-process one of the global batch."""
    if kind in BATCH_STS_LOSSES:
        embeddings, scores = gather_columns(embeddings, 2), gather_columns(scores[:, None], 1)[:, 0]
    return matryoshka_loss(lambda e: STS_LOSSES[kind](e, scores), embeddings, matryoshka_dims, matryoshka_weights)


# Copied from KoSimCSE/model.py:truncate_and_normalize
def truncate_and_normalize(embeddings, dim):
    """The first ``dim`` dimensions of each row, L2-normalised (sentence-transformers' matryoshka ``shrink``:
    float16/bfloat16 rows are normalised in float32 and cast back)."""
    if dim > embeddings.shape[-1]:
        raise ValueError(f"matryoshka dimension {dim} exceeds the embedding dimension {embeddings.shape[-1]}")
    truncated = embeddings[..., :dim]
    if truncated.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(truncated.float(), dim=-1).to(truncated.dtype)
    return F.normalize(truncated, dim=-1)


# Copied from KoSimCSE/model.py:matryoshka_loss
def matryoshka_loss(loss_fn, embeddings, dims, weights=None):
    """Matryoshka representation learning as sentence-transformers' MatryoshkaLoss: sum over ``dims`` of
    weight * loss_fn(truncate_and_normalize(embeddings, dim)), every dimension each step, weights 1 by default
    (a sum, not a mean). ``loss_fn``: (rows, dim) embeddings -> scalar loss, the method's loss with its other
    inputs bound. Empty ``dims``: ``loss_fn(embeddings)`` itself, unchanged. The truncations are views of the
    one (rows, d) tensor, so gradient caching (encode_in_chunks) and gather_columns work as they are: gather
    first, then truncate."""
    if not dims:
        return loss_fn(embeddings)
    weights = list(weights) if weights else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dimensions")
    loss = 0.0
    for dim, weight in sorted(zip(dims, weights), key=lambda pair: pair[0], reverse=True):
        loss = loss + weight * loss_fn(truncate_and_normalize(embeddings, dim))
    return loss


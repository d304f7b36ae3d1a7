"""KoSBERT model: a Hugging Face encoder with a pooler (masked mean by default, as SBERT), the two
SBERT objectives, and saving in a layout that both ``transformers.AutoModel`` and
``sentence_transformers.SentenceTransformer`` load.

Objectives (sentence-transformers' SoftmaxLoss and CosineSimilarityLoss):
  softmax     NLI classification: logits = Linear(3d -> 3)([u, v, |u - v|]), cross-entropy against
              the class id. The classifier exists for training only and is not saved.
  regression  STS: MSE(cos(u, v), score / 5).
  anchor      optional, added to either (--anchor_weight): 1 - cos(f(x), f0(x)) on other texts x, f0 the
              frozen starting model, so that tuning for STS moves the embeddings of search text less.

Poolers:
  mean               masked mean over tokens (SBERT/KoSBERT; the default).
  cls_before_pooler  last_hidden_state[:, 0], the raw [CLS] vector.
  pooler             the checkpoint's own pooler (BERT dense+tanh over [CLS]); saved as a Dense.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from common.encoding import (encode_in_chunks, encode_in_length_buckets, gather_columns, mean_pool,
                             write_sentence_transformers_config)

POOLERS = ("mean", "cls_before_pooler", "pooler")


# Copied from KoSimCSE/model.py:split_pairs
def split_pairs(embeddings):
    """(u, v) from a (2B, d) batch whose rows [0:B] are first sentences and [B:2B] second ones."""
    batch = embeddings.shape[0] // 2
    return embeddings[:batch], embeddings[batch:]


class SoftmaxClassifier(nn.Module):
    """SBERT's NLI head: Linear(3d -> num_labels) over concat(u, v, |u - v|). Training only."""

    def __init__(self, dim, num_labels=3):
        super().__init__()
        self.linear = nn.Linear(3 * dim, num_labels)

    def forward(self, u, v):
        return self.linear(torch.cat([u, v, (u - v).abs()], dim=-1))


def softmax_loss(classifier, embeddings, labels):
    """SBERT's classification objective (sentence-transformers' SoftmaxLoss).

    ``embeddings``: (2B, d), the B first sentences then the B second ones (see split_pairs and
    PairCollator); ``labels``: (B,) class ids (contradiction 0, entailment 1, neutral 2). Returns the
    mean cross-entropy of ``classifier(u, v)`` over the B pairs. Under DDP each rank scores its own pairs;
    the mean over equal slices makes DDP's gradient average the gradient of the global batch."""
    u, v = split_pairs(embeddings)
    return F.cross_entropy(classifier(u, v).float(), labels)


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


def anchor_loss(embeddings, reference):
    """Mean cosine distance between each text's embedding and the frozen starting model's (``reference``, no
    gradient): 0 while the model has not moved on these texts. A feature-distillation penalty (as in
    learning-without-forgetting): with the e5 prefixes and (query, passage) texts of the wiki it holds the
    search geometry in place while an STS loss reshapes the rest."""
    return (1 - F.cosine_similarity(embeddings.float(), reference.float(), dim=-1)).mean()


class PairObjective(nn.Module):
    """The encoder and the NLI classifier in one module, so that DistributedDataParallel sees every
    trainable parameter; ``forward(source, ...)`` is (the loss of one batch of that source, the anchor
    distance or None): softmax_loss for "nli" (needs the classifier), sts_objective for "sts": ``sts_loss``
    (--sts_loss; cosine regression by default), summed over ``matryoshka_dims`` when given; with
    ``anchor_input_ids`` (--anchor_file), also anchor_loss of those texts against ``reference``, the frozen
    starting encoder (kept out of the module's parameters: not trained, not checkpointed). A cosent / angle
    loss (BATCH_STS_LOSSES) spans the gathered global batch under DDP: the caller multiplies it by the world
    size (training_step); the anchor distance is a mean over the local texts, as DDP expects."""

    def __init__(self, encoder, classifier=None, sts_loss="cosine", matryoshka_dims=(), matryoshka_weights=None,
                 reference=None):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier
        self.sts_loss, self.matryoshka_dims, self.matryoshka_weights = sts_loss, matryoshka_dims, matryoshka_weights
        self.__dict__["reference"] = reference  # a plain attribute: no gradient, no state_dict entry
        if reference is not None:
            reference.eval().requires_grad_(False)

    def forward(self, source, input_ids, attention_mask, labels, anchor_input_ids=None, anchor_attention_mask=None):
        embeddings = self.encoder(input_ids, attention_mask)
        if source == "nli":
            loss = softmax_loss(self.classifier, embeddings, labels)
        else:
            loss = sts_objective(embeddings, labels, self.sts_loss, self.matryoshka_dims, self.matryoshka_weights)
        if anchor_input_ids is None:
            return loss, None
        self.reference.to(input_ids.device)  # a no-op after the first call
        with torch.no_grad():
            reference = self.reference(anchor_input_ids, anchor_attention_mask)
        return loss, anchor_loss(self.encoder(anchor_input_ids, anchor_attention_mask), reference)


class SentenceEncoder(nn.Module):
    def __init__(self, backbone, pooler="mean", bucket_tokens=0, mini_batch_size=0, matryoshka_dims=()):
        super().__init__()
        self.matryoshka_dims = tuple(matryoshka_dims)  # trained truncations, recorded in the saved folder
        self.bucket_tokens = bucket_tokens  # > 0: encode in length buckets (encode_in_length_buckets)
        self.mini_batch_size = mini_batch_size  # > 0: gradient caching over chunks of this many sentences
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose from {', '.join(POOLERS)}")
        if pooler == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError(f"--pooler pooler needs a checkpoint with a pooler layer; "
                             f"{type(backbone).__name__} has none (use mean or cls_before_pooler)")
        self.backbone, self.pooler = backbone, pooler
        if pooler != "pooler" and getattr(backbone, "pooler", None) is not None:
            backbone.pooler.requires_grad_(False)  # unused: no gradient, and none for DDP to wait for

    @classmethod
    def from_pretrained(cls, name_or_path, pooler="mean", **options):
        """The backbone of ``name_or_path`` in float32; ``options`` go to __init__."""
        backbone, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, dtype=torch.float32)
        if pooler == "pooler" and any(k.startswith("pooler.") for k in info["missing_keys"]):
            # transformers builds a pooler for every BertModel and initialises it randomly when the
            # checkpoint has none (e.g. multilingual-e5-small): refuse instead of pooling with noise.
            raise ValueError(f"--pooler pooler: {name_or_path} has no trained pooler weights, so its pooler "
                             f"would be random (use mean or cls_before_pooler)")
        return cls(backbone, pooler=pooler, **options)

    @property
    def dim(self):
        return self.backbone.config.hidden_size

    def forward(self, input_ids, attention_mask):
        """(rows, d) sentence embeddings of a right-padded batch; see encode_in_chunks and
        encode_in_length_buckets for how the rows are grouped (the result does not depend on it)."""
        return encode_in_chunks(self.encode_padded, input_ids, attention_mask, self.mini_batch_size)

    def encode_padded(self, input_ids, attention_mask):
        return encode_in_length_buckets(self.embed, input_ids, attention_mask, self.bucket_tokens)

    def embed(self, input_ids, attention_mask):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooler == "mean":
            return mean_pool(out.last_hidden_state, attention_mask)
        if self.pooler == "pooler":
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def save(self, out_dir, tokenizer, max_len):
        """Write a Hugging Face model folder that is also a sentence-transformers model folder."""
        self.backbone.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        dense = self.backbone.pooler.dense if self.pooler == "pooler" else None
        write_sentence_transformers_config(out_dir, self.dim, "mean" if self.pooler == "mean" else "cls",
                                           max_len, dense=dense, matryoshka_dims=self.matryoshka_dims)




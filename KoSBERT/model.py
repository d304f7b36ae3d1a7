"""KoSBERT model: a Hugging Face encoder with a pooler (masked mean by default, as SBERT), the two
SBERT objectives, and saving in a layout that both ``transformers.AutoModel`` and
``sentence_transformers.SentenceTransformer`` load.

Objectives (sentence-transformers' SoftmaxLoss and CosineSimilarityLoss):
  softmax     NLI classification: logits = Linear(3d -> 3)([u, v, |u - v|]), cross-entropy against
              the class id. The classifier exists for training only and is not saved.
  regression  STS: MSE(cos(u, v), score / 5).

Poolers:
  mean               masked mean over tokens (SBERT/KoSBERT; the default).
  cls_before_pooler  last_hidden_state[:, 0], the raw [CLS] vector.
  pooler             the checkpoint's own pooler (BERT dense+tanh over [CLS]); saved as a Dense.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from common.encoding import encode_in_chunks, encode_in_length_buckets, mean_pool, write_sentence_transformers_config

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


class PairObjective(nn.Module):
    """The encoder and the NLI classifier in one module, so that DistributedDataParallel sees every
    trainable parameter; ``forward(source, ...)`` is the loss of one batch of that source: softmax_loss
    for "nli" (needs the classifier), cosine_regression_loss for "sts"."""

    def __init__(self, encoder, classifier=None):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, source, input_ids, attention_mask, labels):
        embeddings = self.encoder(input_ids, attention_mask)
        if source == "nli":
            return softmax_loss(self.classifier, embeddings, labels)
        return cosine_regression_loss(embeddings, labels)


class SentenceEncoder(nn.Module):
    def __init__(self, backbone, pooler="mean", bucket_tokens=0, mini_batch_size=0):
        super().__init__()
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
                                           max_len, dense=dense)



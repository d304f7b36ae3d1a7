"""KoSimCSE model: a Hugging Face encoder, a pooler, the SimCSE InfoNCE loss, and saving in a layout
that both ``transformers.AutoModel`` and ``sentence_transformers.SentenceTransformer`` load.

Poolers (names as in SimCSE):
  cls_before_pooler  last_hidden_state[:, 0], the raw [CLS] vector (BM-K's supervised KoSimCSE).
  cls                [CLS] -> a new Linear+Tanh MLP. With ``mlp_only_train`` the MLP is used in
                     training only and evaluation/saved embeddings are the raw [CLS] vector
                     (SimCSE's unsupervised setting); otherwise the MLP is kept and saved.
  mean               masked mean over tokens.
  pooler             the checkpoint's own pooler (BERT dense+tanh over [CLS]; KoSimCSE-SKT).

Length buckets, gradient caching and the sentence-transformers config writer are in common/encoding.py.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from common.encoding import encode_in_chunks, encode_in_length_buckets, mean_pool, write_sentence_transformers_config

POOLERS = ("cls", "cls_before_pooler", "mean", "pooler")


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


def split_pairs(embeddings):
    """(u, v) from a (2B, d) batch whose rows [0:B] are first sentences and [B:2B] second ones."""
    batch = embeddings.shape[0] // 2
    return embeddings[:batch], embeddings[batch:]


def cosine_regression_loss(embeddings, scores):
    """SBERT's regression objective (sentence-transformers' CosineSimilarityLoss).

    ``embeddings``: (2B, d), the B first sentences then the B second ones (see split_pairs and
    PairCollator); ``scores``: (B,) gold similarities scaled to 0-1 (KorSTS score / 5). Returns
    mean((cos(u_i, v_i) - score_i)^2) over the B pairs. Under DDP each rank scores its own pairs; the mean
    over equal slices makes DDP's gradient average the gradient of the global batch (no scaling)."""
    u, v = split_pairs(embeddings.float())
    return F.mse_loss(F.cosine_similarity(u, v, dim=-1), scores.float())


class SentenceEncoder(nn.Module):
    def __init__(self, backbone, pooler="cls_before_pooler", mlp_only_train=False, bucket_tokens=0,
                 mini_batch_size=0):
        super().__init__()
        self.bucket_tokens = bucket_tokens  # > 0: encode in length buckets (encode_in_length_buckets)
        self.mini_batch_size = mini_batch_size  # > 0: gradient caching over chunks of this many sentences
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose from {', '.join(POOLERS)}")
        if pooler == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError(f"--pooler pooler needs a checkpoint with a pooler layer; "
                             f"{type(backbone).__name__} has none (use cls or mean)")
        self.backbone, self.pooler, self.mlp_only_train = backbone, pooler, mlp_only_train
        if pooler != "pooler" and getattr(backbone, "pooler", None) is not None:
            backbone.pooler.requires_grad_(False)  # unused: no gradient, and none for DDP to wait for
        hidden = backbone.config.hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if pooler == "cls" else None

    @classmethod
    def from_pretrained(cls, name_or_path, pooler="cls_before_pooler", **options):
        """The backbone of ``name_or_path`` in float32; ``options`` go to __init__."""
        backbone, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, dtype=torch.float32)
        if pooler == "pooler" and any(k.startswith("pooler.") for k in info["missing_keys"]):
            # transformers builds a pooler for every BertModel and initialises it randomly when the
            # checkpoint has none (e.g. multilingual-e5-small): refuse instead of pooling with noise.
            raise ValueError(f"--pooler pooler: {name_or_path} has no trained pooler weights, so its pooler "
                             f"would be random (use cls, cls_before_pooler or mean)")
        return cls(backbone, pooler=pooler, **options)

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
        cls_vector = out.last_hidden_state[:, 0]
        if self.mlp is not None and (self.training or not self.mlp_only_train):
            return self.mlp(cls_vector)
        return cls_vector

    def head_at_inference(self):
        """The Linear+Tanh applied after pooling at inference, if any (saved as ST's Dense)."""
        if self.pooler == "pooler":
            return self.backbone.pooler.dense
        if self.mlp is not None and not self.mlp_only_train:
            return self.mlp[0]
        return None

    def save(self, out_dir, tokenizer, max_len):
        """Write a Hugging Face model folder that is also a sentence-transformers model folder."""
        self.backbone.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        mode = "mean" if self.pooler == "mean" else "cls"
        dense = self.head_at_inference()
        write_sentence_transformers_config(out_dir, self.backbone.config.hidden_size, mode, max_len,
                                           dense=dense)

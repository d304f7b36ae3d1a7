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

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel

from common.encoding import encode_in_chunks, encode_in_length_buckets, mean_pool, write_sentence_transformers_config

T5_FAMILY = ("t5", "mt5", "umt5")
ARCHS = ("t5", "bart")


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



"""KoDiffCSE model: DiffCSE (Chuang et al., 2022) on stock transformers -- unsupervised SimCSE plus a
frozen masked-LM generator and a conditional replaced-token discriminator -- and its losses.

``DiffCSE.forward`` on a batch of B sentences, each twice (dropout makes the two views):
  1. encoder -> raw [CLS] -> projection (training only) -> the sentence vectors z, (2B, d).
  2. the generator (frozen) fills the masked views by argmax; replaced = generated != original (real tokens).
  3. the discriminator (a second copy of the encoder) reads the generated tokens conditioned on z as the
     originals' patched ``BertModel(cls_input=z)``: the OUTPUT of its embedding layer at position 0 is z
     (``DiffCSE.discriminate``); a Linear(hidden, 2) head scores every token original / replaced.
The losses are the free functions below: ``contrastive_loss`` (SimCSE's InfoNCE over z),
``replaced_token_loss`` (the head's cross-entropy) and ``diffcse_loss`` (contrastive + lambda * rtd).
Evaluation and the saved model use the encoder alone, raw [CLS] (``SentenceEncoder``, ``DiffCSE.encoder``).
"""
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM

from common.encoding import encode_in_length_buckets, write_sentence_transformers_config

PROJECTIONS = ("pooler", "bn_mlp", "mlp")


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


RTD_AVERAGES = ("tokens", "bmk", "diffcse")


def replaced_token_loss(logits, replaced, attention_mask, average="tokens"):
    """DiffCSE's replaced-token detection loss: the cross-entropy of the discriminator's per-token scores
    against the replaced labels, averaged as ``average`` says (--rtd_average):

      tokens   one mean over the real tokens of the batch (padding counts neither in the sum nor in the
               mean), so the value does not depend on how far a batch is padded. The default.
      bmk      BM-K's KoDiffCSE (model/loss.py): one mean per view over all its B x L positions, padding
               included and labelled original, and the two means summed. BM-K pads every sentence to
               --max_len, so the caller pads the batch to --max_len first (training_step does).
      diffcse  DiffCSE (diffcse/models.py): one mean over all N x L positions of the batch as it is padded
               (to its longest sentence), padding included and labelled original.

    Inputs, N = 2B rows (view 1 of every sentence, then view 2) of L tokens: ``logits`` (N, L, 2), the scores
    of original (0) / replaced (1); ``replaced`` (N, L) bool, the labels; ``attention_mask`` (N, L).
    Returns a float32 scalar: under torch.distributed each process's mean over its own rows, which DDP's
    gradient averaging needs as it is (no world-size scaling, unlike ``contrastive_loss``)."""
    real = attention_mask.bool()
    labels = (replaced & real).long()  # padding is "original" where it counts
    if average == "tokens":
        return F.cross_entropy(logits[real].float(), labels[real])
    if average == "diffcse":
        return F.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1))
    if average == "bmk":
        return sum(F.cross_entropy(view.reshape(-1, 2).float(), target.reshape(-1))
                   for view, target in zip(logits.chunk(2), labels.chunk(2)))
    raise ValueError(f"unknown RTD average {average!r}; one of {RTD_AVERAGES}")


@torch.no_grad()
def replaced_token_accuracy(logits, replaced, attention_mask):
    """Share of the real tokens whose replaced / original label the discriminator gets right (the inputs
    of ``replaced_token_loss``); BM-K's "electra acc". A detached scalar, for the training log."""
    real = attention_mask.bool()
    return (logits[real].argmax(-1) == replaced[real]).float().mean()


def diffcse_loss(contrastive, rtd, lambda_weight, world_size=1):
    """DiffCSE's loss: (to_backpropagate, loss to log). ``contrastive``: contrastive_loss over the gathered
    global batch (differentiable in this process's rows only); ``rtd``: replaced_token_loss over this
    process's tokens. DDP averages gradients, so the contrastive part is scaled by world_size there:
    to_backpropagate = world_size * contrastive + lambda_weight * rtd; loss = contrastive + lambda_weight * rtd
    (the same number with one process)."""
    weighted_rtd = lambda_weight * rtd
    return world_size * contrastive + weighted_rtd, contrastive + weighted_rtd


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
        self.backbone, self.bucket_tokens = backbone, bucket_tokens  # > 0: encode in length buckets

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
    encoder, discriminator: two trained copies of the encoder checkpoint (BERT or RoBERTa family); generator:
    a masked LM with its vocabulary, never trained; vocabulary: what training_step's masking needs
    (``dataloader.masking_vocabulary``), reached through the model; generator_eval: the generator in eval
    mode (the originals leave its dropout on, so its argmax varies from pass to pass)."""

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
        """One DiffCSE pass over (2B, L) right-padded rows, view 1 of every sentence first (ColumnCollator's
        order); ``mlm_input_ids``: the same rows masked for the generator (dataloader.py)."""
        z = self.projection(self.encoder(input_ids, attention_mask))
        with torch.no_grad():
            generated = self.generator(input_ids=mlm_input_ids, attention_mask=attention_mask).logits.argmax(-1)
        generated[:, 0] = input_ids[:, 0]  # [CLS] stays, as in the originals
        replaced = (generated != input_ids) & attention_mask.bool()
        # The originals feed id 0 at padding (g_pred * attention_mask). Real tokens never see padding (it is
        # masked out of attention), but the padded positions' own scores count under --rtd_average bmk/diffcse.
        hidden = self.discriminate(generated * attention_mask, attention_mask, z)
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


"""KoDiffCSE: unsupervised SimCSE + a frozen MLM generator + a conditional replaced-token discriminator
(DiffCSE, Chuang et al. 2022), on stock transformers.

Per batch of B sentences (each twice, so dropout gives two views):
  1. encoder -> [CLS] -> projection (training only) -> z1, z2; InfoNCE(z1, z2) / tau over (B, B).
  2. each view's tokens are masked (dynamically, 80/10/10; or BM-K's static [SEP] masking) and the
     frozen generator fills them by argmax; replaced = (generated != original) on real tokens.
  3. the discriminator (a second copy of the encoder checkpoint) reads the generated tokens with its
     FIRST input embedding replaced by the view's sentence vector z -- passed as ``inputs_embeds``,
     so no patched library is needed (DiffCSE's patched BertModel swaps the whole embedding output of
     position 0; here position/type embeddings and LayerNorm are still applied on top of z) -- and a
     Linear(hidden, 2) head predicts replaced vs original for every real token.
  loss = InfoNCE + lambda * CE(replaced), the CE over non-padding tokens only (the original also
  counts padded positions, all labelled "original").
At evaluation and in the saved model the embedding is the encoder's raw [CLS] vector.
"""
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM

PROJECTIONS = ("mlp", "bn_mlp", "pooler")


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


def projection_head(kind, encoder):
    """The training-only projection over [CLS]: a new Linear+Tanh (SimCSE), DiffCSE's BN-MLP, or the
    checkpoint's pretrained pooler (BM-K's KoDiffCSE)."""
    dim = encoder.config.hidden_size
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
    if kind == "bn_mlp":
        return nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.BatchNorm1d(2 * dim), nn.ReLU(),
                             nn.Linear(2 * dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))
    if getattr(encoder, "pooler", None) is None:
        raise ValueError(f"--projection pooler needs a checkpoint with a pooler; {type(encoder).__name__} has none")
    return nn.Sequential(encoder.pooler.dense, encoder.pooler.activation)


class DiffCSE(nn.Module):
    def __init__(self, encoder, discriminator, generator, projection="mlp"):
        super().__init__()
        self.encoder, self.discriminator, self.generator = encoder, discriminator, generator
        self.generator.requires_grad_(False)
        for model in (encoder, discriminator):  # the BERT pooler is unused unless it is the projection
            if getattr(model, "pooler", None) is not None:
                model.pooler.requires_grad_(model is encoder and projection == "pooler")
        self.projection = projection_head(projection, encoder)
        self.rtd_head = nn.Linear(discriminator.config.hidden_size, 2)

    @classmethod
    def from_pretrained(cls, model, generator_name, projection="mlp"):
        encoder, info = AutoModel.from_pretrained(model, output_loading_info=True, dtype=torch.float32)
        if projection == "pooler" and any(k.startswith("pooler.") for k in info["missing_keys"]):
            raise ValueError(f"--projection pooler: {model} has no trained pooler weights (use mlp or bn_mlp)")
        return cls(encoder, AutoModel.from_pretrained(model, dtype=torch.float32),
                   AutoModelForMaskedLM.from_pretrained(generator_name, dtype=torch.float32),
                   projection)

    def train(self, mode=True):
        super().train(mode)
        self.generator.eval()  # frozen: never dropout
        return self

    def forward(self, input_ids, attention_mask, mlm_input_ids=None, temperature=0.05):
        """Raw [CLS] embeddings; with ``mlm_input_ids`` (the masked views), the training losses
        (contrastive, replaced-token CE) and the replaced-token labels."""
        cls_vector = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        if mlm_input_ids is None:
            return cls_vector
        z = self.projection(cls_vector)
        contrastive = contrastive_loss(gather_columns(z, 2), 2, temperature)
        with torch.no_grad():
            generated = self.generator(input_ids=mlm_input_ids, attention_mask=attention_mask).logits.argmax(-1)
        generated[:, 0] = input_ids[:, 0]
        real = attention_mask.bool()
        replaced = (generated != input_ids) & real
        embeds = self.discriminator.get_input_embeddings()(generated)
        embeds = torch.cat([z[:, None].to(embeds.dtype), embeds[:, 1:]], dim=1)
        hidden = self.discriminator(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = self.rtd_head(hidden)
        rtd = F.cross_entropy(logits[real].float(), replaced[real].long())
        accuracy = (logits[real].argmax(-1) == replaced[real].long()).float().mean()
        return contrastive, rtd, replaced, accuracy

    def save(self, out_dir, tokenizer, max_len):
        """The encoder alone, as a Hugging Face + sentence-transformers folder ([CLS] pooling)."""
        self.encoder.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_sentence_transformers_config(out_dir, self.encoder.config.hidden_size, "cls", max_len)


def backward_objective(contrastive, rtd, lambda_weight, world_size=1):
    """The scalar to call backward() on: contrastive + lambda * rtd, arranged for DDP's gradient averaging.

    Under torch.distributed the contrastive loss scores local anchors against the gathered global batch
    with only the local slice differentiable (see gather_columns), so it is multiplied by the world size;
    the replaced-token loss is purely local (each rank's own discriminator pass), so it is not -- DDP's
    averaging then gives lambda times the mean of the per-rank RTD gradients. With one process this is
    exactly ``contrastive + lambda_weight * rtd``."""
    return contrastive * world_size + lambda_weight * rtd


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

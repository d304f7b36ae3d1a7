"""A saved model folder as sentence-transformers reads it (modules.json: Transformer -> Pooling ->
[Dense] -> [Normalize]), so its embeddings are those of ``SentenceTransformer(folder).encode``."""
import json
import os
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel

from .tokenizer import load_tokenizer


def load_backbone(path):
    """The model whose last_hidden_state sentence-transformers pools for this checkpoint: the
    encoder alone for the T5 family (T5EncoderModel, no decoder weights), else AutoModel -- which,
    for BART-like encoder-decoders, returns the decoder states over the right-shifted input. Weights
    are loaded in float32 whatever dtype they were saved in (transformers 5 would otherwise keep it)."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type in ("t5", "mt5", "umt5"):
        model_class = getattr(transformers, f"{config.model_type.upper()}EncoderModel")
        return model_class.from_pretrained(path, dtype=torch.float32)
    return AutoModel.from_pretrained(path, dtype=torch.float32)


ONNX_DIR = "onnx"  # utils/export_onnx.py writes here, in sentence-transformers' ONNX backend layout
BACKENDS = ("torch", "onnx", "onnx-int8")
MAX_RUN_TOKENS = 32_768  # onnx: padded tokens per onnxruntime run (its arena's peak; see OnnxBackbone.forward)


def int8_file_name(isa):
    """sentence-transformers' name of a dynamically quantized export for an instruction set (avx512_vnni, ...)."""
    return f"model_qint8_{isa}.onnx"


def transformer_dir(path):
    """The folder of a saved model's Transformer module (modules.json), else ``path`` itself."""
    modules_file = os.path.join(path, "modules.json")
    if os.path.isfile(modules_file):
        with open(modules_file) as f:
            for module in json.load(f):
                if module["type"].rsplit(".", 1)[-1] == "Transformer":
                    return os.path.join(path, module["path"])
    return path


class OnnxBackbone(nn.Module):
    """The transformer of a folder exported by utils/export_onnx.py, run by onnxruntime on the CPU; called as
    the torch backbone is (input_ids, attention_mask), it returns an object with ``last_hidden_state``.
    ``backend``: onnx (onnx/model.onnx) or onnx-int8 (the onnx/model_qint8_*.onnx there)."""

    def __init__(self, folder, backend, config):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise ValueError(f"--backend {backend} needs onnxruntime: pip install onnxruntime") from None
        onnx_dir = os.path.join(folder, ONNX_DIR)
        present = sorted(os.listdir(onnx_dir)) if os.path.isdir(onnx_dir) else []
        wanted = "model.onnx" if backend == "onnx" else "model_qint8_*.onnx"
        names = [f for f in present if f == "model.onnx"] if backend == "onnx" else [
            f for f in present if f.startswith("model_qint8_")]
        if not names:
            raise ValueError(f"--backend {backend}: {onnx_dir} has no {wanted}; export it first: python "
                             f"utils/export_onnx.py {folder}")
        self.file, self.config = os.path.join(onnx_dir, names[0]), config
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(self.file, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # an int8 file made for instructions this CPU lacks, a damaged file
            raise ValueError(f"onnxruntime cannot run {self.file}: {' '.join(str(e).split())[:300]}") from None

    def forward(self, input_ids, attention_mask):
        # onnxruntime's memory arena keeps its largest run's activations for good (KorQuAD at 512 tokens in one run
        # of 256 rows: 19 GB resident), so a batch runs in pieces of at most MAX_RUN_TOKENS padded tokens
        rows = max(1, MAX_RUN_TOKENS // input_ids.shape[1])
        hidden = [self.session.run(["last_hidden_state"], {"input_ids": input_ids[i:i + rows].cpu().numpy(),
                                                           "attention_mask": attention_mask[i:i + rows].cpu().numpy()})[0]
                  for i in range(0, input_ids.shape[0], rows)]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.concatenate(hidden)))


class FolderEncoder(nn.Module):
    """Embeddings of a saved model folder, computed as sentence-transformers computes them. ``truncate_dim``
    keeps the first D dimensions of the output (after any Normalize, as SentenceTransformer(truncate_dim=D)
    does); None: the folder's own ``truncate_dim`` in config_sentence_transformers.json, if any. ``backend``:
    torch, or the folder's ONNX export run by onnxruntime (onnx: float32, onnx-int8: dynamic int8)."""

    def __init__(self, path, pooling=None, truncate_dim=None, backend="torch"):
        super().__init__()
        module_dir, self.pooling, self.normalize = path, pooling, False
        self.heads = nn.ModuleList()
        modules_file = os.path.join(path, "modules.json")
        if os.path.isfile(modules_file):
            with open(modules_file) as f:
                modules = json.load(f)
            for module in modules:
                kind, sub = module["type"].rsplit(".", 1)[-1], os.path.join(path, module["path"])
                if kind == "Transformer":
                    module_dir = sub
                elif kind == "Pooling":
                    self.pooling = _pooling_mode(os.path.join(sub, "config.json"))
                elif kind == "Dense":
                    self.heads.append(_load_dense(sub))
                elif kind == "Normalize":
                    self.normalize = True
                else:
                    raise ValueError(f"{modules_file}: module type {module['type']} is not supported")
        elif pooling is None:
            raise ValueError(f"{path} has no modules.json, so its pooling is unknown: pass --pooling "
                             f"(cls for [CLS], mean for mean pooling, pooler for pooler_output)")
        try:
            self.tokenizer = load_tokenizer(module_dir)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {module_dir}: {e}") from None
        if backend == "torch":
            self.backbone = load_backbone(module_dir)
        elif self.pooling == "pooler":
            raise ValueError(f"--backend {backend}: the export holds the token embeddings only; pooler pooling needs "
                             f"--backend torch")
        else:
            self.backbone = OnnxBackbone(module_dir, backend, AutoConfig.from_pretrained(module_dir))
        self.max_len = None
        config_file = os.path.join(module_dir, "sentence_bert_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                self.max_len = json.load(f).get("max_seq_length")
        self.truncate_dim, self.prompts = truncate_dim, {}
        st_config = os.path.join(path, "config_sentence_transformers.json")
        if os.path.isfile(st_config):
            with open(st_config) as f:
                config = json.load(f)
            self.prompts = config.get("prompts") or {}  # sentence-transformers' named prompts ("query", "passage")
            if truncate_dim is None:
                self.truncate_dim = config.get("truncate_dim")
        width = getattr(self.backbone.config, "d_model", None) or self.backbone.config.hidden_size
        self.width, self.path = self.heads[-1][0].out_features if len(self.heads) else width, path
        self.set_truncate_dim(self.truncate_dim)
        # {batch key: full-width embeddings}, or None: with a dict, a batch encoded once is not encoded again, so
        # one encoding serves several truncate_dim values (evaluation.py --truncate_dim D1 D2 ...)
        self.cache = None

    def set_truncate_dim(self, dim):
        """Keep the first ``dim`` dimensions from now on (None: all); a dim wider than the model is a ValueError."""
        if dim is not None and not 0 < dim <= self.width:
            raise ValueError(f"truncate_dim {dim}: the embeddings of {self.path} have {self.width} dimensions")
        self.truncate_dim = dim

    def forward(self, input_ids, attention_mask):
        key = None
        if self.cache is not None:  # the exact batch (ids, mask, shape) seen before: its full-width embeddings
            key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes())
            if key in self.cache:
                emb = self.cache[key]
                return emb[:, :self.truncate_dim] if self.truncate_dim else emb
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "pooler":
            emb = out.pooler_output
        else:
            emb = hidden[:, 0]
        for head in self.heads:
            emb = head(emb)
        emb = nn.functional.normalize(emb, dim=-1) if self.normalize else emb
        if key is not None:
            self.cache[key] = emb.detach()
        return emb[:, :self.truncate_dim] if self.truncate_dim else emb


def _pooling_mode(config_file):
    with open(config_file) as f:
        cfg = json.load(f)
    mode = cfg.get("pooling_mode") or ("cls" if cfg.get("pooling_mode_cls_token") else
                                       "mean" if cfg.get("pooling_mode_mean_tokens") else None)
    if mode not in ("cls", "mean"):
        raise ValueError(f"{config_file}: pooling {cfg} is not supported (cls or mean)")
    return mode


def _load_dense(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    linear = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
    weights_file = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights_file):
        from safetensors.torch import load_file
        state = load_file(weights_file)
    else:
        state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    activation = cfg.get("activation_function", "torch.nn.modules.linear.Identity").rsplit(".", 1)[-1]
    if activation not in ("Tanh", "Identity"):
        raise ValueError(f"{folder}: Dense activation {activation} is not supported (Tanh or Identity)")
    return nn.Sequential(linear, nn.Tanh() if activation == "Tanh" else nn.Identity())

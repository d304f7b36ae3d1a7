"""Export a saved model folder's transformer to ONNX, with a dynamically quantized int8 copy, for fast CPU encoding.

    python utils/export_onnx.py output/kosimcse-sup/best_model          # -> best_model/onnx/model.onnx + int8
    python KoSimCSE/evaluation.py --model_dir output/kosimcse-sup/best_model --backend onnx-int8 --task sts

Writes, in the layout sentence-transformers' ONNX backend reads (``SentenceTransformer(folder, backend="onnx",
model_kwargs={"file_name": ...})``):

  <folder>/onnx/model.onnx                     the transformer (the T5 encoder for T5 folders), inputs input_ids and
                                               attention_mask with dynamic batch and sequence axes, output
                                               last_hidden_state (the token embeddings; pooling, Dense and
                                               Normalize stay in the folder's modules, as in the torch model)
  <folder>/onnx/model_qint8_<isa>.onnx         onnxruntime's dynamic int8 quantization of it (int8 weights with a
                                               scale per output channel, activations quantized per batch; the
                                               feed-forward output projections and the attention products stay
                                               float32);
                                               <isa> names the instruction set it was made for, as
                                               sentence-transformers names its files: avx512_vnni, avx512, avx2 or
                                               arm64, the best this CPU has

The export traces a freshly loaded float32 model in eval mode (torch.onnx's TorchScript exporter, opset 17) with
a padded example batch; the result is checked against the torch model on a padded batch of sentences of mixed
lengths before anything is written, and refused unless every sentence's mean-pooled embedding has cosine >=
0.99999 to torch's. (A model that has just been traced is not a fair reference: compare with a fresh one.)
"""
import argparse
import logging
import os
import platform
import re
import sys
import tempfile
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
from common.files import save_atomic  # noqa: E402
from common.folder import ONNX_DIR, int8_file_name, transformer_dir  # noqa: E402

CHECK_SENTENCES = ["한 남자가 음식을 먹는다.", "치타", "그 여자가 아이를 돌본다. 그리고 아주 긴 문장이 여기에 이어진다, 정말로.",
                   "기차 역 승객", "원숭이 한 마리가 드럼을 연주한다."]
MIN_COSINE = 0.99999


def check_packages():
    missing = [name for name in ("onnx", "onnxruntime") if not _importable(name)]
    if missing:
        sys.exit(f"error: utils/export_onnx.py needs {' and '.join(missing)}: pip install onnx onnxruntime")


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def load(folder):
    """(transformer folder, tokenizer, float32 backbone in eval mode) of a saved model folder."""
    from common.folder import load_backbone
    from common.tokenizer import load_tokenizer
    path = transformer_dir(folder)
    return path, load_tokenizer(path), load_backbone(path).eval()


class LastHiddenState(torch.nn.Module):
    """The backbone called with keywords, returning its token embeddings only (what torch.onnx traces)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(tokenizer, backbone, out_file, opset=17):
    example = tokenizer(CHECK_SENTENCES[:2], padding=True, return_tensors="pt")  # padded: the mask path is traced
    # The tracer warns about shape-dependent branches of transformers' mask code; what they could break is what
    # the check after the export measures (cosine to a fresh torch model on a padded batch of other lengths).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHiddenState(backbone).eval(), (example["input_ids"], example["attention_mask"]), out_file,
                          dynamo=False, opset_version=opset, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={name: {0: "batch", 1: "sequence"}
                                        for name in ("input_ids", "attention_mask", "last_hidden_state")})


def cosines(onnx_file, tokenizer, reference):
    """Per-sentence cosine of the mean-pooled token embeddings of ``onnx_file`` and of the torch ``reference``
    on one padded batch of CHECK_SENTENCES."""
    import onnxruntime as ort
    batch = tokenizer(CHECK_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.numpy()
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = session.run(["last_hidden_state"], {"input_ids": batch["input_ids"].numpy(),
                                              "attention_mask": batch["attention_mask"].numpy()})[0]
    mask = batch["attention_mask"].numpy()[..., None]
    a, b = (want * mask).sum(1) / mask.sum(1), (got * mask).sum(1) / mask.sum(1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def instruction_set():
    """The best of sentence-transformers' int8 targets this CPU runs: avx512_vnni, avx512, avx2, arm64."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


LAYER = re.compile(r"/(?:layer|block)\.(\d+)/")  # a MatMul's layer in torch.onnx's node names (BERT/XLM-R, T5)


FFN_OUTPUT = re.compile(r"(?<!/attention)/output/dense/MatMul$|/DenseReluDense/wo/MatMul$")  # BERT/XLM-R, T5


def fp32_nodes(onnx_file, fp32_layers=0):
    """The MatMul nodes int8 leaves in float32: every feed-forward output projection (its input, after the
    activation function, has the widest range), the attention products of two activations (query x key,
    weights x value: no weight to shrink), and all those of the first ``fp32_layers`` layers."""
    import onnx
    graph = onnx.load(onnx_file, load_external_data=False).graph
    weights = {w.name for w in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        layer = LAYER.search(node.name)
        if (not any(x in weights for x in node.input) or FFN_OUTPUT.search(node.name)
                or (layer and int(layer.group(1)) < fp32_layers)):
            keep.append(node.name)
    return keep


def quantize(onnx_file, out_file, fp32_layers=0):
    """onnxruntime's dynamic int8 quantization with per-channel weight scales, leaving fp32_nodes in float32.
    Chosen on KorSTS dev (multilingual-e5-small, cosine Spearman with `query: `, see bench/README.md): every MatMul
    per-channel 80.39; the feed-forward output projections in float32 80.66; the first or last two layers instead
    80.30."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process first is for static quantization
    try:
        quantize_dynamic(onnx_file, out_file, weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=fp32_nodes(onnx_file, fp32_layers))
    finally:
        logging.getLogger().setLevel(level)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a saved model folder (modules.json, or a plain Hugging Face folder)")
    p.add_argument("--no_int8", action="store_true", help="write the float32 model only")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--fp32_layers", type=int, default=0, metavar="N",
                   help="int8: the first N transformer layers also stay in float32 (default: %(default)s)")
    a = p.parse_args(argv)
    if a.fp32_layers < 0:
        p.error(f"--fp32_layers {a.fp32_layers}: must not be negative")
    if not os.path.isdir(a.model_dir):
        p.error(f"{a.model_dir}: no such folder")
    check_packages()
    try:
        _, tokenizer, backbone = load(a.model_dir)
        _, _, reference = load(a.model_dir)  # a fresh model: the traced one is not a fair reference
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load {a.model_dir}: {' '.join(str(e).split())}")
    out_dir = os.path.join(transformer_dir(a.model_dir), ONNX_DIR)  # beside the weights, where the backends look
    try:
        files, cos = build_files(a, tokenizer, backbone, reference, out_dir)
    except OSError as e:  # a full or read-only temporary folder or --model_dir: nothing half-written is left
        sys.exit(f"error: could not write the export of {a.model_dir}: {e.strerror or e}; the model folder is "
                 f"otherwise unchanged")
    for name in files:
        size = os.path.getsize(os.path.join(out_dir, name)) / 2 ** 20
        print(f"{os.path.join(out_dir, name)} ({size:,.1f} MiB)")
    print(f"checked: per-sentence cosine to torch >= {cos.min():.6f} on {len(CHECK_SENTENCES)} padded sentences (fp32)")


def build_files(a, tokenizer, backbone, reference, out_dir):
    """Export, check and quantize in a temporary folder, then move each file atomically into ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "model.onnx")
        export(tokenizer, backbone, fp32, a.opset)
        cos = cosines(fp32, tokenizer, reference)
        if cos.min() < MIN_COSINE:
            sys.exit(f"error: the ONNX export of {a.model_dir} does not reproduce the torch model (per-sentence cosine "
                     f"min {cos.min():.6f} < {MIN_COSINE}); nothing written")
        files = {"model.onnx": fp32}
        if not a.no_int8:
            name = int8_file_name(instruction_set())
            files[name] = os.path.join(tmp, name)
            quantize(fp32, files[name], a.fp32_layers)
        os.makedirs(out_dir, exist_ok=True)
        for name, path in files.items():
            with open(path, "rb") as f:
                data = f.read()
            save_atomic(os.path.join(out_dir, name), lambda out: out.write(data))
    return files, cos


if __name__ == "__main__":
    main()

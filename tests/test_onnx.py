"""utils/export_onnx.py and evaluation.py --backend (issue 36): the exported float32 model gives the torch model's
embeddings on padded batches (cosine >= 0.99999 per sentence), the int8 copy stays close, every task runs through
the same encoder whatever the backend, and a missing export or package is one line."""
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
sys.path.insert(0, os.path.join(ROOT, "utils"))
import export_onnx  # noqa: E402

SENTENCES = ["사과 바나나 포도 딸기 수박 과일 그리고 아주 긴 문장.", "바다", "기차 역 승객 표.", "고양이 강아지 먹이 꼬리 산책 동물 정말.",
             "비"]  # mixed lengths: every batch is padded


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("onnx") / "model")
    shutil.copytree(tiny_bert, folder)
    export_onnx.main([folder])
    return folder


def embeddings(ns, folder, backend):
    encoder = ns.folder.FolderEncoder(folder, pooling="mean", backend=backend).eval()
    return ns.encoding.encode(encoder, encoder.tokenizer, SENTENCES, 24, batch_size=3)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_export_writes_both_files_in_sentence_transformers_layout(exported):
    names = sorted(os.listdir(os.path.join(exported, "onnx")))
    assert names[0] == "model.onnx" and len(names) == 2
    assert names[1] == export_onnx.int8_file_name(export_onnx.instruction_set())
    model = os.path.join(exported, "onnx", "model.onnx")
    kept = export_onnx.fp32_nodes(model)  # what int8 leaves in float32
    assert any(n.endswith("/layer.1/output/dense/MatMul") for n in kept)  # feed-forward output
    assert not any("/attention/output/dense/MatMul" in n or "/intermediate/dense/MatMul" in n for n in kept)
    assert any("/layer.1/attention/self/MatMul" in n for n in kept)  # query x key: two activations
    assert any("/layer.0/intermediate/dense/MatMul" in n for n in export_onnx.fp32_nodes(model, 1))


@pytest.mark.parametrize("folder", ["KoSimCSE", "KoSBERT"])
def test_onnx_embeddings_equal_torch_on_padded_batches(exported, folder):
    from conftest import load_method
    ns = load_method(folder)
    torch_emb = embeddings(ns, exported, "torch")
    assert cosine(torch_emb, embeddings(ns, exported, "onnx")).min() >= 0.99999
    assert cosine(torch_emb, embeddings(ns, exported, "onnx-int8")).min() >= 0.95  # a tiny random model: coarse


def test_a_batch_runs_in_pieces_with_the_same_embeddings(kosimcse, exported, monkeypatch):
    """A batch over MAX_RUN_TOKENS padded tokens runs as several onnxruntime calls (its arena keeps the peak)."""
    whole = embeddings(kosimcse, exported, "onnx")
    monkeypatch.setattr(kosimcse.folder, "MAX_RUN_TOKENS", 8)  # one row a run
    assert cosine(whole, embeddings(kosimcse, exported, "onnx")).min() >= 0.99999


def test_evaluation_tasks_run_on_the_onnx_backend(kosimcse, exported, synthetic_data, capsys):
    ev = kosimcse.evaluation
    common = ["--model_dir", exported, "--pooling", "mean", "--data_dir", synthetic_data, "--device", "cpu",
              "--task", "sts"]
    ev.main(common)
    torch_out = capsys.readouterr().out
    ev.main(common + ["--backend", "onnx"])
    onnx_out = capsys.readouterr().out
    row = lambda out: next(line for line in out.splitlines() if line.startswith("| ") and "korsts-test" in line)
    assert row(onnx_out) == row(torch_out)  # the 8 numbers, to 2 decimals


def test_missing_export_and_bad_device_are_one_line(kosimcse, tiny_bert, capsys):
    ev = kosimcse.evaluation
    with pytest.raises(SystemExit) as e:
        ev.main(["--model_dir", tiny_bert, "--pooling", "mean", "--device", "cpu", "--backend", "onnx"])
    assert "has no model.onnx; export it first: python utils/export_onnx.py" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit):
        ev.parse_args(["--model_dir", tiny_bert, "--backend", "onnx-int8", "--device", "cuda:0"])
    err = capsys.readouterr().err
    assert "--backend onnx-int8 runs on the CPU" in err or "--device cuda:0" in err


def test_a_t5_encoder_exports_exactly(kosimcse, tiny_t5, tmp_path):
    """KoSentenceT5's folders: the T5 encoder alone (T5EncoderModel) is exported, with its relative positions."""
    folder = str(tmp_path / "t5")
    shutil.copytree(tiny_t5, folder)
    export_onnx.main([folder, "--no_int8"])
    assert os.listdir(os.path.join(folder, "onnx")) == ["model.onnx"]
    torch_emb, onnx_emb = (embeddings(kosimcse, folder, backend) for backend in ("torch", "onnx"))
    assert cosine(torch_emb, onnx_emb).min() >= 0.99999


def test_an_export_that_cannot_be_written_is_one_line(tiny_bert, tmp_path, capsys):
    folder = str(tmp_path / "m")
    shutil.copytree(tiny_bert, folder)
    open(os.path.join(folder, "onnx"), "w").close()  # a file where the onnx/ folder must go
    with pytest.raises(SystemExit) as e:
        export_onnx.main([folder, "--no_int8"])
    assert str(e.value).startswith(f"error: could not write the export of {folder}: ") and "\n" not in str(e.value)
    assert os.path.isfile(os.path.join(folder, "onnx"))  # nothing else was touched
    with pytest.raises(SystemExit):
        export_onnx.main([folder, "--fp32_layers", "-1"])
    assert "--fp32_layers -1: must not be negative" in capsys.readouterr().err


"""Saved models are ready to publish: best_model/README.md is a sentence-transformers style model card whose
metrics equal the evaluation JSON, and the folder runs under SentenceTransformer(backend="onnx")."""
import json
import os
import re

import numpy as np
import pytest


@pytest.fixture(scope="module")
def evaluated(kosimcse, tiny_bert, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("card") / "run")
    kosimcse.train.main(["--model", tiny_bert, "--data_dir", synthetic_data, "--output_dir", out, "--mode", "sup",
                         "--train_file", "KorNLI/nli.train.ko.tsv", "--batch_size", "8", "--max_len", "24",
                         "--max_steps", "4", "--eval_steps", "4"])
    best, result = os.path.join(out, "best_model"), os.path.join(out, "eval.json")
    kosimcse.evaluation.main(["--model_dir", best, "--data_dir", synthetic_data, "--dataset", "korsts-test",
                              "korsts-dev", "klue-sts-dev", "--protocol", "standard", "bmk", "--batch_size", "32",
                              "--output_json", result])
    return best, json.load(open(result))


def test_card_front_matter_and_sections(evaluated):
    best, _ = evaluated
    card = open(os.path.join(best, "README.md"), encoding="utf-8").read()
    front, body = card.split("\n---\n", 1)
    assert front.startswith("---\nlanguage:\n- ko\nlibrary_name: sentence-transformers\n"
                            "pipeline_tag: sentence-similarity\n")
    assert "datasets:\n- kakaobrain/kor-nli\n- kakaobrain/kor-sts\n- klue/klue\n" in front
    assert "- name: kosimcse-sup\n" in front and "base_model" not in front  # a local folder is no hub id
    assert "**Pooling: cls**" in body and "last_hidden_state[:, 0]" in body
    assert "python KoSimCSE/train.py \\\n    --model " in body and "--max_steps 4" in body
    assert "SentenceTransformer('path/to/this/folder')" in body and "AutoModel.from_pretrained" in body


def test_card_metrics_equal_the_evaluation_json(evaluated):
    best, rows = evaluated
    card = open(os.path.join(best, "README.md"), encoding="utf-8").read()
    names = {"korsts-test": "KorSTS test", "korsts-dev": "KorSTS dev", "klue-sts-dev": "KLUE-STS dev"}
    assert len(rows) == 6
    for row in rows:
        line = next(l for l in card.splitlines() if l.startswith(f"| {names[row['dataset']]} | {row['protocol']} |"))
        numbers = [float(x) for x in line.strip("|").split("|")[2:]]
        metrics = [row["metrics"]["avg"]] + [row["metrics"][k] for k in (
            "cosine_pearson", "cosine_spearman", "euclidean_pearson", "euclidean_spearman", "manhattan_pearson",
            "manhattan_spearman", "dot_pearson", "dot_spearman")]
        assert numbers == pytest.approx([round(m, 2) for m in metrics], abs=1e-9)
        block = card.split(f"      name: {names[row['dataset']]} ({row['protocol']})\n")[1].split("  - task:")[0]
        values = [float(v) for v in re.findall(r"value: (-?[\d.]+)", block)]
        assert values == pytest.approx([round(m, 4) for m in metrics[1:]], abs=1e-9)
    # the dev row written at training time was replaced by evaluation.py's (same key), not duplicated
    assert card.count("| KorSTS dev | standard |") == 1


def test_sentence_transformers_onnx_backend_equals_torch(evaluated):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.onnxruntime", reason="needs sentence-transformers[onnx] (optimum)")
    from sentence_transformers import SentenceTransformer
    best, _ = evaluated
    sentences = ["사과 바나나 과일.", "기차 역에 승객이 많다.", "고양이가 꼬리를 흔든다."]
    torch_emb = SentenceTransformer(best, device="cpu").encode(sentences)
    onnx_emb = SentenceTransformer(best, device="cpu", backend="onnx").encode(sentences)
    assert np.abs(torch_emb - onnx_emb).max() < 1e-4

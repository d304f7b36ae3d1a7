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


@pytest.mark.slow
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


def card_transformers_code(folder):
    """The card's plain-transformers usage block, pointed at ``folder``, encoding ``SENTENCES``."""
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    block = [b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "from transformers import" in b]
    assert len(block) == 1
    code = block[0].replace("path/to/this/folder", folder)
    assert "['한 남자가 음식을 먹는다.']" in code
    return code.replace("['한 남자가 음식을 먹는다.']", "SENTENCES")


LONG = " ".join(["사과 바나나 포도 딸기 수박 과일"] * 400)  # ~2,400 words: past every position table


@pytest.mark.slow
@pytest.mark.parametrize("source_limit", [4096, int(1e30)])
def test_card_usage_code_runs_on_a_bert_folder_with_a_long_sentence(kosimcse, tiny_bert, synthetic_data, tmp_path,
                                                                    source_limit):
    """The source tokenizer says 4096 (or transformers' 1e30 for "none"): the saved one must say the model's
    max_seq_length, so that truncation=True stops inside the position table (64 for the tiny BERT)."""
    import shutil
    source = str(tmp_path / "source")
    shutil.copytree(tiny_bert, source)
    config_path = os.path.join(source, "tokenizer_config.json")
    config = json.load(open(config_path))
    config["model_max_length"] = source_limit
    json.dump(config, open(config_path, "w"))
    out = str(tmp_path / "run")
    kosimcse.train.main(["--model", source, "--data_dir", synthetic_data, "--output_dir", out, "--mode", "unsup",
                         "--batch_size", "8", "--max_len", "24", "--max_steps", "1", "--eval_steps", "1",
                         "--pooler", "mean", "--device", "cpu"])
    best = os.path.join(out, "best_model")
    max_seq_length = json.load(open(os.path.join(best, "sentence_bert_config.json")))["max_seq_length"]
    assert max_seq_length == 64
    assert json.load(open(os.path.join(best, "tokenizer_config.json")))["model_max_length"] == max_seq_length
    scope = {"SENTENCES": [LONG, "짧은 문장."]}
    exec(card_transformers_code(best), scope)
    assert scope["batch"]["input_ids"].shape == (2, max_seq_length)
    assert tuple(scope["embeddings"].shape) == (2, 32)
    from sentence_transformers import SentenceTransformer  # the same vectors as sentence-transformers
    expected = SentenceTransformer(best, device="cpu").encode([LONG, "짧은 문장."], convert_to_tensor=True)
    assert np.allclose(scope["embeddings"].numpy(), expected.numpy(), atol=1e-5)


def test_card_usage_code_runs_on_a_t5_folder_with_a_long_sentence(kosentencet5, tiny_t5, synthetic_data, tmp_path):
    """T5: the card loads T5EncoderModel (AutoModel builds a T5Model whose call needs decoder inputs), and the
    saved tokenizer stops at the model's 512 (T5 has no position table; its source tokenizer says 1e30)."""
    import shutil
    source = str(tmp_path / "source")
    shutil.copytree(tiny_t5, source)
    config_path = os.path.join(source, "tokenizer_config.json")
    config = json.load(open(config_path))
    config["model_max_length"] = int(1e30)
    json.dump(config, open(config_path, "w"))
    out = str(tmp_path / "run")
    kosentencet5.train.main(["--model", source, "--mode", "sup", "--data_dir", synthetic_data, "--train_file",
                             "KorNLI/nli.train.ko.tsv", "--output_dir", out, "--batch_size", "8", "--max_len", "24",
                             "--max_steps", "1", "--eval_steps", "1", "--device", "cpu"])
    best = os.path.join(out, "best_model")
    code = card_transformers_code(best)
    assert "T5EncoderModel.from_pretrained" in code and "AutoModel" not in code
    max_seq_length = json.load(open(os.path.join(best, "sentence_bert_config.json")))["max_seq_length"]
    assert max_seq_length == 512
    assert json.load(open(os.path.join(best, "tokenizer_config.json")))["model_max_length"] == 512
    scope = {"SENTENCES": [LONG]}
    exec(code, scope)
    assert scope["batch"]["input_ids"].shape == (1, 512)
    assert tuple(scope["embeddings"].shape) == (1, 32)

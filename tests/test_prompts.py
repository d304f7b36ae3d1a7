"""Asymmetric prompts recorded the sentence-transformers way: utils/set_prompts.py writes "prompts" into a saved
folder's config_sentence_transformers.json (keys already there kept), SentenceTransformer(folder).encode(q,
prompt_name="query") equals our encoding with that prefix, and FolderEncoder / evaluation.py pick them up."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_train


@pytest.fixture(scope="module")
def tiny_run(kosimcse, tiny_bert, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prompt-run"))
    return run_train(kosimcse, tiny_bert, synthetic_data, out, "--mode", "sup", "--train_file",
                     "KorNLI/nli.train.ko.tsv", "--max_steps", "2", "--eval_steps", "2", "--pooler", "mean")


def test_write_config_merges_prompts_with_matryoshka(kosimcse, tmp_path):
    kosimcse.encoding.write_sentence_transformers_config(str(tmp_path), 8, "mean", 16, matryoshka_dims=(4, 8),
                                                         prompts={"query": "query: ", "passage": "passage: "})
    config = json.load(open(tmp_path / "config_sentence_transformers.json"))
    assert config == {"matryoshka_dims": [8, 4], "prompts": {"query": "query: ", "passage": "passage: "},
                      "default_prompt_name": None}


@pytest.mark.slow
def test_set_prompts_and_sentence_transformers_prompt_name(kosimcse, tiny_run, capsys):
    from sentence_transformers import SentenceTransformer
    config_file = os.path.join(tiny_run, "config_sentence_transformers.json")
    kept = json.load(open(config_file)) if os.path.isfile(config_file) else {}
    kept["truncate_dim_note"] = "kept"
    json.dump(kept, open(config_file, "w"))
    subprocess.run([sys.executable, os.path.join(ROOT, "utils", "set_prompts.py"), tiny_run, "--query", "query: ",
                    "--passage", "passage: "], check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    config = json.load(open(config_file))
    assert config["prompts"] == {"query": "query: ", "passage": "passage: "} and config["default_prompt_name"] is None
    assert config["truncate_dim_note"] == "kept"
    assert not os.path.exists(config_file + ".tmp")

    texts = ["사과 바나나 과일 정말.", "기차 역 승객 출발 오늘."]
    st = SentenceTransformer(tiny_run, device="cpu")
    encoder = kosimcse.folder.FolderEncoder(tiny_run).eval()
    assert encoder.prompts == {"query": "query: ", "passage": "passage: "}
    for name in ("query", "passage"):
        theirs = st.encode(texts, prompt_name=name, convert_to_numpy=True)
        ours = kosimcse.encoding.encode(encoder, encoder.tokenizer, [f"{name}: " + t for t in texts], 64)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
        plain = kosimcse.encoding.encode(encoder, encoder.tokenizer, texts, 64)
        assert not np.allclose(plain, theirs, atol=1e-5)  # the prompt does change the embedding

    # evaluation.py takes the folder's prompts as the default prefixes
    kosimcse.evaluation.main(["--model_dir", tiny_run, "--task", "search", "--device", "cpu", "--queries", "사과",
                              "--top_k", "1"])
    out = capsys.readouterr().out
    assert "--query_prefix 'query: '" in out and "--passage_prefix 'passage: '" in out

"""Cross-folder robustness: weights load in float32 whatever dtype they were saved in, in every method
folder; bad input to every train.py gives one clear error line and leaves the output folder alone."""
import os
import shutil

import pytest
import torch

from conftest import load_method

FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE")


@pytest.fixture(scope="module")
def methods():
    return {name: load_method(name) for name in FOLDERS}


@pytest.fixture(scope="module")
def bf16_bert(tiny_bert, tmp_path_factory):
    """tiny_bert saved in bfloat16, as some hub checkpoints are (transformers 5 keeps the saved dtype)."""
    from transformers import AutoModel
    out = str(tmp_path_factory.mktemp("bf16-bert"))
    AutoModel.from_pretrained(tiny_bert).to(torch.bfloat16).save_pretrained(out)
    for name in os.listdir(tiny_bert):
        if name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(os.path.join(tiny_bert, name), out)
    return out


def test_bf16_checkpoint_trains_and_evaluates_in_float32(methods, bf16_bert):
    import json
    from transformers import AutoModel
    assert AutoModel.from_pretrained(bf16_bert).dtype == torch.bfloat16  # what we guard against
    assert json.load(open(os.path.join(bf16_bert, "config.json"))).get("dtype") == "bfloat16"
    for name in ("KoSimCSE", "KoSBERT"):
        encoder = methods[name].model.SentenceEncoder.from_pretrained(bf16_bert, pooler="mean")
        assert {p.dtype for p in encoder.parameters()} == {torch.float32}, name
    for name in FOLDERS:
        backbone = methods[name].evaluation.load_backbone(bf16_bert)
        assert {p.dtype for p in backbone.parameters()} == {torch.float32}, name

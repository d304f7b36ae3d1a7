"""utils/real_table.py: every row's command runs end to end (2 training steps, tiny model, synthetic data in the
real layouts), the table reads the results back, and a rerun runs nothing again."""
import contextlib
import io
import json
import os
import shutil
import sys

from conftest import ROOT, write_synthetic_data

sys.path.insert(0, os.path.join(ROOT, "utils"))
import real_table as rt  # noqa: E402


def test_two_step_table_end_to_end_and_resumes(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = write_synthetic_data(str(tmp_path / "data"), n_nli=60, n_sts=60, n_wiki=300)
    os.makedirs(os.path.join(data, "KLUE-NLI"))
    shutil.copy(os.path.join(data, "KorNLI", "nli.train.ko.tsv"), os.path.join(data, "KLUE-NLI", "klue_nli_train.tsv"))
    out = str(tmp_path / "table")
    monkeypatch.setattr(rt, "TRUNCATE", {"kosimcse-sup": (16, 8, 64)})  # 64: wider than the tiny model, skipped
    argv = ["--model", tiny_bert, "--data_dir", data, "--out", out, "--rows", "kosimcse-sup", "kosbert-sts",
            "st-sts", "--seeds", "1", "--max_steps", "2", "--no_retrieval", "--no-bf16"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rt.main(argv)
    text = printed.getvalue()
    assert "failed" not in text, text
    with open(os.path.join(out, "real_table.json")) as f:
        rows = json.load(f)["rows"]
    for row in ("kosimcse-sup", "kosbert-sts", "st-sts"):
        metrics = rows[row]["metrics"]
        assert rows[row]["seeds"] == [1], row
        assert -100 <= metrics["korsts-test/standard/cosine_spearman"]["mean"] <= 100
        assert metrics["train_seconds"]["mean"] > 0
    truncated = rows["kosimcse-sup"]["metrics"]  # one STS pass scored at 16 and 8 dimensions
    assert {"sts-dim16/korsts-test/cosine_spearman", "sts-dim8/korsts-test/cosine_spearman"} <= truncated.keys()
    assert not any("dim64" in key for key in truncated)
    assert truncated["sts-dim8/korsts-test/cosine_spearman"]["n"] == 1
    with open(os.path.join(out, "kosimcse-sup", "seed-1", "best_model", "training.json")) as f:
        info = json.load(f)
    assert info["decontamination"]["mode"] == "drop"  # every table row trains decontaminated
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        rt.main(argv)
    assert ": train" not in again.getvalue() and ".json" not in again.getvalue().split("| row |")[0]

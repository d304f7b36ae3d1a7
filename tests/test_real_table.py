"""utils/real_table.py: every row's command runs end to end (2 training steps, tiny model, synthetic data in the
real layouts), the table reads the results back, and a rerun runs nothing again."""
import contextlib
import io
import json
import os
import shutil
import sys

import pytest

from conftest import ROOT, write_synthetic_data

sys.path.insert(0, os.path.join(ROOT, "utils"))
import real_table as rt  # noqa: E402


@pytest.mark.slow
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
        # a time only when the machine was otherwise idle (a busy machine's run is listed as contended)
        assert metrics["train_seconds"]["mean"] > 0 if "train_seconds" in metrics else rows[row]["contended_seeds"] == [1]
    truncated = rows["kosimcse-sup"]["metrics"]  # one STS pass scored at 16 and 8 dimensions
    assert {"sts-dim16/korsts-test/cosine_spearman", "sts-dim8/korsts-test/cosine_spearman"} <= truncated.keys()
    assert not any("dim64" in key for key in truncated)
    assert truncated["sts-dim8/korsts-test/cosine_spearman"]["n"] == 1
    with open(os.path.join(out, "kosimcse-sup", "seed-1", "best_model", "training.json")) as f:
        info = json.load(f)
    assert info["decontamination"]["mode"] == "drop"  # every table row trains decontaminated
    with open(os.path.join(out, "kosimcse-sup", "seed-1", "wall.json")) as f:
        wall = json.load(f)
    assert wall["train_seconds"] > 0 and "other_cpu_seconds" in wall
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        rt.main(argv)
    assert ": train" not in again.getvalue() and ".json" not in again.getvalue().split("| row |")[0]


def test_time_column_leaves_out_runs_that_shared_the_cpu(tmp_path):
    """A run during which other processes took >= 10 % of its wall time in CPU keeps its scores but not its time."""
    import argparse
    out = tmp_path / "table"
    for seed, other in ((1, 5.0), (2, 50.0), (3, None)):
        run = out / "kosbert-sts" / f"seed-{seed}"
        run.mkdir(parents=True)
        metrics = {"cosine_spearman": 80.0 + seed, "avg": 70.0}
        (run / "sts.json").write_text(json.dumps([{"dataset": "korsts-test", "protocol": "standard", "metrics": metrics}]))
        (run / "wall.json").write_text(json.dumps({"train_seconds": 100.0 * seed, "other_cpu_seconds": other}))
    a = argparse.Namespace(out=str(out), model=str(tmp_path))
    entry = rt.collect(a, ["kosbert-sts"], [1, 2, 3])["kosbert-sts"]
    assert entry["seeds"] == [1, 2, 3] and entry["contended_seeds"] == [2]
    assert entry["metrics"]["korsts-test/standard/cosine_spearman"]["mean"] == 82.0
    assert entry["metrics"]["train_seconds"]["mean"] == 200.0  # seeds 1 and 3: (100 + 300) / 2
    assert "seed 2 shared the CPU: left out" in rt.markdown({"kosbert-sts": entry}, argparse.Namespace(
        model="m", data_dir="d", bf16=True))


@pytest.mark.slow
def test_run_logged_counts_other_processes_cpu(tmp_path):
    """run_logged's third figure: CPU seconds the rest of the machine used while the command ran (a process
    burning CPU beside a sleeping command shows; the command's own CPU is not counted)."""
    import subprocess
    burn = "import time\nt = time.time()\nwhile time.time() - t < {}: pass"
    burner = subprocess.Popen([sys.executable, "-c", burn.format(3)])
    try:
        code, seconds, other = rt.run_logged([sys.executable, "-c", "import time; time.sleep(2)"], str(tmp_path / "log"))
    finally:
        burner.wait()
    assert code == 0 and seconds >= 2
    if other is not None:  # Linux: the burner had at least a third of a core for 2 s, even on a loaded machine
        assert other >= 0.6


def test_truncated_table_pivots_first_seed_by_width(tmp_path):
    """The truncated table: one line per width, the full width's STS taken from the first seed (not the mean of
    three seeds, which the truncated widths do not have), retrieval at each width from the one retrieval.json."""
    import argparse
    out = tmp_path / "table"
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 384}))

    def sts(value, dim=None):
        return [{"dataset": d, "protocol": "standard", "truncate_dim": dim,
                 "metrics": {"cosine_spearman": value + i, "avg": 70.0}} for i, d in enumerate(rt.STS_SETS)]
    for seed, value in ((1, 80.0), (2, 90.0)):
        run = out / "kosimcse-sup" / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "sts.json").write_text(json.dumps(sts(value)))
    run = out / "kosimcse-sup" / "seed-1"
    (run / "sts-dims.json").write_text(json.dumps(sts(70.0, 128) + sts(60.0, 64)))
    (run / "retrieval.json").write_text(json.dumps([
        {"dataset": d, "truncate_dim": w, "metrics": {"ndcg_at_10": w / 1000 + i / 100}}
        for w in (384, 128, 64) for i, d in enumerate(rt.RETRIEVAL_SETS)]))
    a = argparse.Namespace(out=str(out), model=str(tmp_path), data_dir="d", bf16=True)
    table = rt.collect(a, ["kosimcse-sup"], [1, 2, 3])
    assert table["kosimcse-sup"]["metrics"]["korsts-test/standard/cosine_spearman"]["mean"] == 85.0
    text = rt.markdown(table, a)
    assert "| kosimcse-sup | full | 80.00 | 81.00 | 38.40 | 39.40 |" in text
    assert "| kosimcse-sup | 128 | 70.00 | 71.00 | 12.80 | 13.80 |" in text
    assert "| kosimcse-sup | 64 | 60.00 | 61.00 | 6.40 | 7.40 |" in text


def test_choose_alpha_keeps_retrieval_then_takes_the_best_sts():
    base = {"korsts-dev": 80.0, "ict-dev": 50.0}
    dev = {0.3: {"korsts-dev": 82.0, "ict-dev": 51.0}, 0.5: {"korsts-dev": 83.0, "ict-dev": 50.0},
           0.7: {"korsts-dev": 84.0, "ict-dev": 49.9}}
    assert rt.choose_alpha(dev, base) == 0.5  # 0.7 has the best STS dev but loses retrieval dev
    assert rt.choose_alpha(dev, {"korsts-dev": 80.0, "ict-dev": 60.0}) == 0.3  # none keeps it: the best retrieval


@pytest.mark.slow
def test_merged_row_chooses_alpha_on_dev(tiny_bert, tmp_path, monkeypatch):
    """The prompts row trains 2 steps, the merged row merges it at every grid alpha, scores them on KorSTS dev and
    the ICT dev split built from the wiki, keeps the chosen one, and the table shows it."""
    monkeypatch.chdir(ROOT)
    data = write_synthetic_data(str(tmp_path / "data"), n_nli=60, n_sts=60, n_wiki=400)  # with wiki/wiki_corpus.txt
    monkeypatch.setattr(rt, "MERGE_GRID", (0.5, 1.0))
    monkeypatch.setattr(rt, "ICT_FLAGS", ["--dev_queries", "4", "--dev_corpus", "8", "--block", "40", "--dev_share",
                                          "0.3", "--min_cohesion", "0", "--window", "3"])
    out = str(tmp_path / "table")
    argv = ["--model", tiny_bert, "--data_dir", data, "--out", out, "--rows", "kosbert-sts-cosent-prompts",
            "kosbert-sts-cosent-prompts-merged", "--seeds", "1", "--max_steps", "2", "--no_retrieval", "--no-bf16"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rt.main(argv)
    assert "failed" not in printed.getvalue() and "error" not in printed.getvalue(), printed.getvalue()
    for seed in (1,):
        run = os.path.join(out, "kosbert-sts-cosent-prompts-merged", f"seed-{seed}")
        selection = json.load(open(os.path.join(run, "selection.json")))
        assert selection["alpha"] in (0.5, 1.0) and set(selection["dev"]) == {"0.5", "1"}
        assert selection["alpha"] == rt.choose_alpha({float(a): s for a, s in selection["dev"].items()},
                                                     selection["backbone"])
        info = json.load(open(os.path.join(run, "best_model", "training.json")))
        assert info["merge"]["alpha"] == selection["alpha"]
        assert json.load(open(os.path.join(run, "sts.json")))[0]["prefix"] == "query: "  # the folder's prompt
        assert not os.path.exists(os.path.join(run, "merges"))
    rows = json.load(open(os.path.join(out, "real_table.json")))["rows"]
    assert rows["kosbert-sts-cosent-prompts-merged"]["seeds"] == [1]
    assert rows["kosbert-sts-cosent-prompts"]["sts_prefix"] == "query: "
    assert "(alpha " in open(os.path.join(out, "real_table.md")).read()


def test_merge_into_adds_rerun_rows_to_an_earlier_table(tmp_path):
    """--merge_into: the rows of this run replace or join an earlier real_table.json, the others are kept."""
    out = tmp_path / "table"
    run = out / "kosbert-sts" / "seed-1"
    run.mkdir(parents=True)
    (run / "sts.json").write_text(json.dumps([{"dataset": "korsts-test", "protocol": "standard", "prefix": "query: ",
                                               "metrics": {"cosine_spearman": 81.0, "avg": 70.0}}]))
    earlier = tmp_path / "bench" / "real_table.json"
    earlier.parent.mkdir()
    old = {"zero-shot": {"description": "z", "seeds": [1], "metrics": {}},
           "kosbert-sts": {"description": "old", "seeds": [1], "metrics": {}}}
    earlier.write_text(json.dumps({"model": "m", "rows": old}))
    with contextlib.redirect_stdout(io.StringIO()):
        rt.main(["--model", str(tmp_path), "--out", str(out), "--rows", "kosbert-sts", "--seeds", "1", "--table_only",
                 "--merge_into", str(earlier)])
    rows = json.load(open(earlier))["rows"]
    assert list(rows) == ["zero-shot", "kosbert-sts"] and rows["zero-shot"] == old["zero-shot"]
    assert rows["kosbert-sts"]["metrics"]["korsts-test/standard/cosine_spearman"]["mean"] == 81.0
    text = (tmp_path / "bench" / "real_table.md").read_text()
    assert "| zero-shot: z |" in text and "'query: '" in text


def test_repeated_seeds_and_damaged_results_are_refused(tmp_path, capsys):
    """--seeds 1 1 would count seed 1 twice in the mean (and print "1,1 ± 0.00"); a per-run JSON that is not
    JSON used to be skipped, dropping that result from the table without a word."""
    with pytest.raises(SystemExit) as e:
        rt.main(["--model", str(tmp_path), "--out", str(tmp_path), "--seeds", "1", "1", "--table_only"])
    assert e.value.code == 2 and "--seeds 1 1: a seed given twice" in capsys.readouterr().err
    run = tmp_path / "table" / "kosbert-sts" / "seed-1"
    run.mkdir(parents=True)
    (run / "sts.json").write_text('[{"dataset": "korsts-test", "metr')
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        rt.main(["--model", str(tmp_path), "--out", str(tmp_path / "table"), "--rows", "kosbert-sts", "--seeds", "1",
                 "--table_only"])
    assert str(e.value).startswith(f"error: {run / 'sts.json'}: cannot be read (") and "\n" not in str(e.value)


def test_a_killed_evaluation_leaves_no_result_that_passes_for_finished(tmp_path):
    """evaluation.py writes each finished set to --output_json as it goes; run_into gives it a .partial path and
    renames it into place only when the command succeeds, so a killed one is redone on the next run."""
    final = str(tmp_path / "retrieval.json")
    write_then = lambda code: [sys.executable, "-c", f"import sys; open(sys.argv[1], 'w').write('[]'); sys.exit({code})",
                               final]
    code, _, _ = rt.run_into(write_then(1), final, str(tmp_path / "eval.log"))
    assert code == 1 and not os.path.exists(final) and os.path.isfile(final + ".partial")
    code, _, _ = rt.run_into(write_then(0), final, str(tmp_path / "eval.log"))
    assert code == 0 and open(final).read() == "[]" and not os.path.exists(final + ".partial")

"""utils/: the results table and the training-curve plot."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "utils"))
import plot_training  # noqa: E402
import results_table  # noqa: E402


def test_results_table_gathers_rows_in_paper_order(tmp_path):
    metrics = {k: float(i) for i, k in enumerate(results_table.METRICS)}
    metrics["avg"] = 3.5
    row = {"model": "m", "dataset": "korsts-test", "protocol": "bmk", "n_pairs": 1379, "batch_size": 256, "metrics": metrics}
    os.makedirs(tmp_path / "a")
    (tmp_path / "a" / "r.json").write_text(json.dumps([row, dict(row, dataset="korsts-dev")]))
    (tmp_path / "other.json").write_text(json.dumps({"not": "a row"}))
    rows = [r for r in results_table.load_rows([str(tmp_path)]) if r["dataset"] == "korsts-test"]
    lines = results_table.table(rows).splitlines()
    assert lines[0].startswith("| model | dataset | protocol | pairs | AVG | cosP | cosS | eucP")
    assert lines[2] == "| m | korsts-test | bmk (batch 256) | 1379 | 3.50 | 0.00 | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | 6.00 | 7.00 |"


def test_training_curve_png(tmp_path):
    dev = {"cosine_spearman": 70.0, "max_spearman": 71.0}
    lines = [{"step": s, "loss": 3.0 / s} for s in range(1, 11)] + [{"step": 5, "dev": dev}, {"step": 10, "dev": dev}]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    losses, points = plot_training.read_log(str(tmp_path / "train_log.jsonl"))
    assert len(losses) == 10 and [p[0] for p in points] == [5, 10]
    out = plot_training.plot(str(tmp_path))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out) > 5000


def test_results_table_prints_skipped_runs(tmp_path, capsys, monkeypatch):
    (tmp_path / "kodiffcse.skipped").write_text("kodiffcse: skipped: needs a generator, set DIFFCSE_GENERATOR\n")
    monkeypatch.setattr(sys, "argv", ["results_table.py", str(tmp_path)])
    results_table.main()
    assert capsys.readouterr().out.splitlines()[-1] == "| kodiffcse: skipped: needs a generator, set DIFFCSE_GENERATOR |"

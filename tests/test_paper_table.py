"""utils/paper_table.py, data/published_results.csv and the row presets: the published numbers parse and
each names a preset, every preset parses with its folder's train.parse_args, the table maths (mean ± std,
difference) on fake result files, and the commands --dry_run prints."""
import contextlib
import glob
import io
import json
import math
import os
import shlex
import shutil
import sys

import pytest

from conftest import ROOT, load_method, write_synthetic_data

sys.path.insert(0, os.path.join(ROOT, "utils"))
import paper_table as pt  # noqa: E402

# Presets another branch writes (KoDiffCSE's): allowed to be missing here, named explicitly.
PENDING_PRESETS = {"KoDiffCSE/presets/bmk-roberta.args", "KoDiffCSE/presets/diffcse-bert.args"}
# The flags main adds in parallel (the brief's list); a preset may fail to parse here only on these.
BRIEF_NEW_FLAGS = {"--sts_file", "--sts_batch_size", "--sts_epochs", "--sts_lr", "--dev_protocol", "--max_grad_norm",
                   "--eval_steps", "--fp16", "--bf16"}
BRIEF_NEW_MODES = {"multitask", "sup_sts"}
PARSED_FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5")
UNPUBLISHED_ROWS = {"diffcse-bert"}


def test_the_new_flag_lists_are_the_briefs():
    assert set(pt.NEW_FLAGS) == BRIEF_NEW_FLAGS and set(pt.NEW_MODES) == BRIEF_NEW_MODES


# --- the published numbers -------------------------------------------------------------------------

def test_published_results_parse_and_name_their_presets():
    published = pt.read_published()
    assert len(published) == 26  # rows; 34 (row, dataset) entries
    pending = set()
    for row_id, entries in published.items():
        assert len({e["dataset"] for e in entries}) == len(entries), row_id  # one entry per dataset
        folder = {e["folder"] for e in entries}
        assert len(folder) == 1 and folder <= set(pt.FOLDERS), row_id
        preset = f"{entries[0]['folder']}/presets/{row_id}.args"
        if not os.path.isfile(os.path.join(ROOT, preset)):
            if all(e["note"].startswith(pt.NOT_REPRODUCIBLE) for e in entries):  # cited, no recipe: no preset
                continue
            assert preset in PENDING_PRESETS, f"{row_id}: no preset {preset}"
            pending.add(preset)
        for e in entries:
            assert e["table"] in pt.TABLES and e["dataset"] in pt.DATASETS and e["protocol"] in pt.PROTOCOLS, e
            assert e["source"], row_id
            numbers = [e[k] for k in pt.METRICS if e[k] is not None]
            assert numbers and all(0 < v < 100 for v in numbers), row_id
            if e["avg"] is not None and len(numbers) == 8:
                mean = sum(numbers) / 8
                if row_id == "bmk-kosentencebart":  # the one printed AVG that is not the mean of its 8 numbers
                    assert (e["avg"], round(mean, 2)) == (77.14, 77.21) and "77.21" in e["note"]
                else:
                    assert abs(mean - e["avg"]) <= 0.011, (row_id, e["dataset"], mean, e["avg"])
    assert pending <= PENDING_PRESETS


def test_published_numbers_spot_checks():
    published = pt.read_published()
    first = {row_id: entries[0] for row_id, entries in published.items()}
    assert (first["bmk-kosimcse-roberta-multitask"]["avg"], first["bmk-kosimcse-roberta-multitask"]["cosine_spearman"]) \
        == (85.77, 86.12)
    assert first["bmk-kosbert-bert"]["protocol"] == "standard" and first["bmk-kosimcse-bert"]["protocol"] == "bmk"
    for row_id in ("kosentencebert-etri-nli", "kosentencebert-etri-sts", "kosentencebert-etri-nli-sts"):
        # KoSentenceBERT-ETRI@0e0574b README: "Seed 고정, test set"; its scripts end on tune_test.tsv
        assert [e["dataset"] for e in published[row_id]] == ["korsts-test"], row_id
    assert published["kosentencebert-etri-nli-sts"][0]["cosine_spearman"] == 80.42
    ham = {row_id: published[row_id][0] for row_id in ("bmk-kosroberta-base-ham", "bmk-kosroberta-large-ham")}
    assert [(e["table"], e["dataset"], e["cosine_spearman"], e["avg"]) for e in ham.values()] == [
        ("BM-K unsup", "korsts-test", 48.96, None), ("BM-K unsup", "korsts-test", 51.35, None)]
    kr = {e["dataset"]: e for e in published["kr-bert-simcse-unsup"]}
    assert kr["korsts-test"]["cosine_spearman"] == 73.25 and kr["klue-sts-dev"]["cosine_pearson"] == 74.45
    assert kr["korsts-test"]["avg"] is None
    ko = {e["dataset"]: e for e in published["simcse-ko-bert-sup"]}
    assert ko["korsts-test"]["avg"] == 85.98 and ko["klue-sts-dev"]["avg"] == 83.96


def test_rows_are_discovered_once_each():
    rows = pt.discover_rows()
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids))
    published = pt.read_published()
    assert set(published) <= set(ids)
    for r in rows:
        # DiffCSE's English BERT recipe (KoDiffCSE/presets/diffcse-bert.args, another branch) has no Korean number
        assert r.published or r.id in UNPUBLISHED_ROWS, f"{r.id}: no published numbers for {r.published_id}"
        if r.preset:
            with open(r.preset, encoding="utf-8") as f:
                first = f.readline()
            assert first.startswith(("# Row:", "# Published row:")), f"{r.preset}: no header comment"
    by_id = {r.id: r for r in rows}
    assert by_id["bmk-kosimcse-bert-multitask-seq"].published_id == "bmk-kosimcse-bert-multitask"
    assert by_id["kosentencebert-etri-sts"].stand_in and "stand-in backbone" in by_id["kosentencebert-etri-sts"].labels()
    kinds = {i: by_id[i].kind for i in ("bmk-kosentencet5", "bmk-kosentencebart", "bmk-kosimcse-skt", "bmk-kosbert-skt",
                                        "bmk-roberta", "bmk-kosimcse-bert")}
    assert kinds == {"bmk-kosentencet5": "t5", "bmk-kosentencebart": "bart", "bmk-kosimcse-skt": "skt",
                     "bmk-kosbert-skt": "skt", "bmk-roberta": "diffcse", "bmk-kosimcse-bert": "pretrained"}
    # BM-K's per-batch test batch: his --batch_size (T5 64), the marked 256 for the multitask rows
    assert (by_id["bmk-kosentencet5"].bmk_batch, by_id["bmk-kosimcse-bert"].bmk_batch,
            by_id["bmk-kosimcse-bert-multitask"].bmk_batch, by_id["bmk-kosbert-bert"].bmk_batch) == (64, 256, 256, 256)


# --- every preset parses ---------------------------------------------------------------------------

def presets():
    return sorted(p for folder in PARSED_FOLDERS for p in glob.glob(os.path.join(ROOT, folder, "presets", "*.args")))


@pytest.fixture(scope="module")
def methods():
    return {folder: load_method(folder) for folder in PARSED_FOLDERS}


def parse(train, argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return train.parse_args(argv), None
    except SystemExit:
        return None, err.getvalue().strip().splitlines()[-1]


def new_features_in(error):
    """The brief's new flags / modes an argparse error complains about, or None if it is about anything else."""
    if "unrecognized arguments:" in error:
        flags = [t for t in error.split("unrecognized arguments:", 1)[1].split() if t.startswith("--")]
        return flags if flags and set(flags) <= BRIEF_NEW_FLAGS else None
    if "argument --mode: invalid choice:" in error:
        mode = error.split("invalid choice:", 1)[1].split()[0].strip("'\"")
        return [f"--mode {mode}"] if mode in BRIEF_NEW_MODES else None
    return None


@pytest.mark.parametrize("path", presets(), ids=lambda p: os.path.relpath(p, ROOT))
def test_preset_parses(methods, path, monkeypatch):
    """train.parse_args(["@" + path]) of the preset's folder. --device cuda is added (and CUDA pretended, as
    --device is checked against the machine) so that presets with --fp16 (the originals' apex/AMP setting)
    parse on a CPU machine; parsing never touches the device. A
    preset may fail only on the flags main adds in parallel: then the rest of it must parse (those flags
    dropped, the new modes read as sup), and the test is skipped until main's flags are here."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    train = methods[os.path.basename(os.path.dirname(os.path.dirname(path)))].train
    args, error = parse(train, ["@" + path, "--device", "cuda"])
    tokens = pt.preset_tokens(path)
    if args is not None:
        model = pt.flag_values(tokens, "--model")
        assert not model or args.model == model[0]
        return
    missing = new_features_in(error)
    assert missing, f"{os.path.relpath(path, ROOT)}: {error}"
    rest = pt.drop_flags(tokens, BRIEF_NEW_FLAGS)
    rest = [{"multitask": "sup", "sup_sts": "sup"}.get(t, t) for t in rest]
    args, error = parse(train, rest + ["--device", "cuda"])  # argparse names one problem at a time: all dropped
    assert args is not None, f"{os.path.relpath(path, ROOT)} (without main's new flags): {error}"
    pytest.skip(f"needs main's {', '.join(missing)}")


# --- the table maths -------------------------------------------------------------------------------

def test_mean_std_by_hand():
    assert pt.mean_std([]) == (None, None, 0)
    assert pt.mean_std([80.0]) == (80.0, None, 1)
    mean, std, n = pt.mean_std([1.0, 2.0, 4.0])
    assert n == 3 and math.isclose(mean, 7 / 3) and math.isclose(std, math.sqrt(7 / 3))  # sample std (n - 1)


def fake_results(run_dir, values):
    """results.json as evaluation.py writes it: korsts-test under both protocols, klue-sts-dev standard."""
    os.makedirs(run_dir, exist_ok=True)
    rows = []
    for dataset, protocol, shift in (("korsts-test", "bmk", 0.0), ("korsts-test", "standard", -1.0),
                                     ("klue-sts-dev", "standard", -5.0)):
        metrics = {k: values + shift for k in pt.METRICS}
        metrics["cosine_spearman"] = values + shift + 0.5
        metrics["avg"] = sum(metrics[k] for k in pt.METRICS) / 8
        rows.append({"dataset": dataset, "protocol": protocol, "metrics": metrics})
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(rows, f)


def test_table_maths_on_fake_results(tmp_path):
    """Seeds 1-3 at 80, 82, 84: mean 82, std 2; minus BM-K's published 83.37 AVG / 83.58 cosS (bmk)."""
    args = pt.parse_args(["--rows", "bmk-kosimcse-bert", "--out", str(tmp_path)])
    plan = pt.Plan(args)
    row = pt.select_rows(pt.discover_rows(), ["bmk-kosimcse-bert"])[0]
    for seed, value in zip((1, 2, 3), (80.0, 82.0, 84.0)):
        fake_results(plan.run_dir(row, seed), value)
    [entry] = pt.summarize([row], plan, [1, 2, 3])
    test = entry["datasets"]["korsts-test"]
    bmk = test["ours"]["bmk"]
    assert bmk["n"] == 3
    assert math.isclose(bmk["mean"]["cosine_pearson"], 82.0) and math.isclose(bmk["std"]["cosine_pearson"], 2.0)
    assert math.isclose(bmk["mean"]["cosine_spearman"], 82.5) and math.isclose(bmk["std"]["cosine_spearman"], 2.0)
    assert math.isclose(bmk["mean"]["avg"], 82.0625)  # (7 x 82 + 82.5) / 8
    assert math.isclose(test["ours"]["standard"]["mean"]["cosine_pearson"], 81.0)
    assert test["published"]["protocol"] == "bmk" and test["diff"]["protocol"] == "bmk"
    assert math.isclose(test["diff"]["metrics"]["avg"], 82.0625 - 83.37)
    assert math.isclose(test["diff"]["metrics"]["cosine_spearman"], 82.5 - 83.58)
    klue = entry["datasets"]["klue-sts-dev"]
    assert klue["published"] is None and klue["diff"] is None and "bmk" not in klue["ours"]
    assert math.isclose(klue["ours"]["standard"]["mean"]["cosine_pearson"], 77.0)

    status = {("bmk-kosimcse-bert", s): "done" for s in (1, 2, 3)}
    text = pt.markdown([entry], [1, 2, 3], status)
    assert "| published (bmk) | 83.37 | 83.22 | 83.58 |" in text
    assert "| ours bmk (n=3) | 82.06 ± 2.00 | 82.00 ± 2.00 | 82.50 ± 2.00 |" in text
    assert "| Δ bmk | -1.31 | -1.22 | -1.08 |" in text

    [proxy] = pt.summarize([row], plan, [1, 2, 3], proxy="/tmp/model")
    assert proxy["labels"][0] == "proxy" and proxy["datasets"]["korsts-test"]["diff"] is None
    text = pt.markdown([proxy], [1, 2, 3], status, proxy="/tmp/model", max_steps=10)
    assert "NOT comparable" in text and "published (bmk), reference only" in text and "Δ" not in text
    assert "| proxy bmk (n=3) |" in text


def test_one_seed_has_no_std_and_missing_runs_are_reported(tmp_path):
    args = pt.parse_args(["--rows", "bmk-kosbert-bert", "--out", str(tmp_path)])
    plan = pt.Plan(args)
    row = pt.select_rows(pt.discover_rows(), ["bmk-kosbert-bert"])[0]
    fake_results(plan.run_dir(row, 1), 80.0)
    [entry] = pt.summarize([row], plan, [1, 2])
    standard = entry["datasets"]["korsts-test"]["ours"]["standard"]
    assert standard["n"] == 1 and standard["std"]["avg"] is None
    assert math.isclose(entry["datasets"]["korsts-test"]["diff"]["metrics"]["cosine_spearman"], 79.5 - 82.25)
    text = pt.markdown([entry], [1, 2], {("bmk-kosbert-bert", 1): "done", ("bmk-kosbert-bert", 2): "failed (train)"})
    assert "| ours standard (n=1) | 79.06 | 79.00 | 79.50 |" in text and "bmk-kosbert-bert seed 2: failed (train)" in text


# --- the commands ----------------------------------------------------------------------------------

def dry_run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pt.main(argv + ["--dry_run"]) == 0
    return out.getvalue().splitlines()


def commands(lines):
    """The printed command lines, without the interpreter."""
    return [shlex.split(line)[1:] for line in lines if not line.startswith("#")]


def test_dry_run_prints_the_train_and_eval_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, data = str(tmp_path / "paper"), str(tmp_path / "data")
    lines = dry_run(["--rows", "bmk-kosimcse-bert", "bmk-kosbert-bert", "--seeds", "1", "2",
                     "--data_dir", data, "--out", out])
    run = lambda row, seed: f"{out}/{row}/seed-{seed}"  # noqa: E731
    expected = []
    for row, folder, batch in (("bmk-kosimcse-bert", "KoSimCSE", "256"), ("bmk-kosbert-bert", "KoSBERT", "256")):
        for seed in (1, 2):
            expected.append([f"{folder}/train.py", f"@{folder}/presets/{row}.args", "--seed", str(seed),
                             "--data_dir", data, "--output_dir", run(row, seed), "--overwrite_output_dir"])
            expected.append([f"{folder}/evaluation.py", "--model_dir", f"{run(row, seed)}/best_model",
                             "--data_dir", data, "--dataset", "korsts-test", "korsts-dev", "klue-sts-dev",
                             "--protocol", "standard", "bmk", "--batch_size", batch,
                             "--output_json", f"{run(row, seed)}/results.json"])
    assert commands(lines) == expected
    assert lines[0] == "# [1/4] bmk-kosimcse-bert seed 1: new"


def test_dry_run_resumes_a_crashed_table(tmp_path, monkeypatch):
    """results exist -> skipped; training finished -> evaluate only; killed mid-training -> --resume."""
    monkeypatch.chdir(ROOT)
    out = str(tmp_path / "paper")
    runs = {seed: os.path.join(out, "bmk-kosentencet5", f"seed-{seed}") for seed in (1, 2, 3, 4)}
    fake_results(runs[1], 80.0)
    os.makedirs(runs[2])
    open(os.path.join(runs[2], "trained.json"), "w").close()
    os.makedirs(os.path.join(runs[3], "checkpoint"))
    for name in ("checkpoint/state.pt", "args.json"):
        open(os.path.join(runs[3], name), "w").close()
    lines = dry_run(["--rows", "bmk-kosentencet5", "--seeds", "1", "2", "3", "4", "--data_dir", "data", "--out", out])
    assert "# [1/4] bmk-kosentencet5 seed 1: results exist, skipped" in lines
    assert "# [2/4] bmk-kosentencet5 seed 2: trained" in lines and "# [3/4] bmk-kosentencet5 seed 3: interrupted" in lines
    cmds = commands(lines)
    assert [c[0] for c in cmds] == ["KoSentenceT5/evaluation.py", "KoSentenceT5/train.py", "KoSentenceT5/evaluation.py",
                                    "KoSentenceT5/train.py", "KoSentenceT5/evaluation.py"]
    assert cmds[1] == ["KoSentenceT5/train.py", "--resume", runs[3]]
    assert cmds[2][cmds[2].index("--batch_size") + 1] == "64"  # BM-K's T5 test batch
    assert cmds[3][1] == "@KoSentenceT5/presets/bmk-kosentencet5.args"


@pytest.mark.slow
def test_proxy_dry_run_uses_tiny_models_and_the_public_nli_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, data = str(tmp_path / "proxy"), str(tmp_path / "data")  # no KorNLI train files there
    lines = dry_run(["--rows", "bmk-kosentencebart", "bmk-kosimcse-bert-multitask", "--seeds", "1", "--data_dir", data,
                     "--out", out, "--proxy", "/models/me5", "--max_steps", "7", "--device", "cpu"])
    [train, evaluate] = commands(lines)[:2]
    assert train[0] == "KoSentenceT5/train.py"
    tail = train[train.index("--overwrite_output_dir") + 1:]
    assert tail == ["--model", f"{out}/_proxy_models/bart", "--max_steps", "7", "--eval_steps", "7",
                    "--max_train_samples", "2000", "--dev_file", pt.PROXY_DEV, "--batch_size", "16",
                    "--train_file", *pt.PROXY_NLI, "--device", "cpu"]
    assert evaluate[evaluate.index("--dataset") + 1] == "korsts-test" and "klue-sts-dev" not in evaluate
    flags, _ = pt.supported("KoSentenceT5")
    if "--dev_protocol" in flags:  # nothing to drop: the preset file is passed as it is
        assert train[1] == "@KoSentenceT5/presets/bmk-kosentencebart.args"
    assert evaluate[-2:] == ["--device", "cpu"]
    _, modes = pt.supported("KoSimCSE")
    multitask = [line for line in lines if "bmk-kosimcse-bert-multitask seed 1" in line]
    if "multitask" not in modes:
        assert multitask == ["# [2/2] bmk-kosimcse-bert-multitask seed 1: not run (this tree's KoSimCSE/train.py lacks "
                             "--mode multitask (added on main))"]


@pytest.mark.slow
def test_proxy_run_end_to_end_on_a_tiny_t5(tmp_path, monkeypatch):
    """--proxy on the T5 row (no local pretrained T5): a tiny T5 is built from the data's wiki lines, trained,
    evaluated, and the table labels the row "proxy, wiring only" without a difference; a rerun skips it."""
    monkeypatch.chdir(ROOT)
    data = write_synthetic_data(str(tmp_path / "data"), n_nli=40, n_sts=40, n_wiki=300)
    os.makedirs(os.path.join(data, "KLUE-NLI"), exist_ok=True)
    shutil.copy(os.path.join(data, "KorNLI", "nli.train.ko.tsv"), os.path.join(data, "KLUE-NLI", "klue_nli_train.tsv"))
    out = str(tmp_path / "proxy")
    argv = ["--rows", "bmk-kosentencet5", "--seeds", "1", "--data_dir", data, "--out", out, "--proxy", "no-bert-needed",
            "--max_steps", "2", "--device", "cpu"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pt.main(argv) == 0, printed.getvalue()
    assert "[1/1] bmk-kosentencet5 seed 1: train ok" in printed.getvalue()
    with open(os.path.join(out, "paper_table.json")) as f:
        [row] = json.load(f)["rows"]
    assert row["labels"][0] == "proxy, wiring only" and "stand-in backbone" in row["labels"]
    test = row["datasets"]["korsts-test"]
    assert test["ours"]["standard"]["n"] == 1 and test["ours"]["bmk"]["n"] == 1 and test["diff"] is None
    with open(os.path.join(out, "bmk-kosentencet5", "seed-1", "trained.json")) as f:
        command = json.load(f)["command"]
    last = lambda flag: command[len(command) - command[::-1].index(flag)]  # noqa: E731 (the value that wins)
    assert last("--model") == os.path.join(out, "_proxy_models", "t5")
    assert last("--train_file") == "KLUE-NLI/klue_nli_train.tsv"  # a training split, never an evaluation one
    with open(os.path.join(out, "paper_table.md"), encoding="utf-8") as f:
        assert "PROXY run" in f.read()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pt.main(argv) == 0
    assert "[1/1] bmk-kosentencet5 seed 1: results exist, skipped" in printed.getvalue()


def test_list_and_unknown_rows(capsys):
    assert pt.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for r in pt.discover_rows():
        assert r.id in listed
    with pytest.raises(SystemExit, match="unknown row"):
        pt.main(["--rows", "no-such-row", "--dry_run"])
    assert [r.id for r in pt.select_rows(pt.discover_rows(), ["KoSBERT/bmk-kosbert-skt"])] == ["bmk-kosbert-skt"]
    assert all(r.preset for r in pt.select_rows(pt.discover_rows(), ["all"]))


def test_cited_rows_without_a_recipe_are_listed_not_run(tmp_path, capsys, monkeypatch):
    """BM-K's KoSRoBERTa-base/large† (cited from Ham et al. 2020): no preset, marked not reproducible in
    --list, the dry run and the table; "all" leaves them out, naming one runs nothing and does not crash."""
    monkeypatch.chdir(ROOT)
    by_id = {r.id: r for r in pt.discover_rows()}
    row = by_id["bmk-kosroberta-base-ham"]
    assert row.preset is None and row.not_reproducible and row.table == "BM-K unsup"
    assert not by_id["bmk-kosimcse-bert"].not_reproducible
    assert row.id not in [r.id for r in pt.select_rows(list(by_id.values()), ["all"])]
    assert pt.main(["--list"]) == 0
    assert any(line.startswith("bmk-kosroberta-large-ham") and "(not reproducible)" in line
               for line in capsys.readouterr().out.splitlines())
    lines = dry_run(["--rows", "bmk-kosroberta-base-ham", "--seeds", "1", "--out", str(tmp_path)])
    assert lines[0] == "# [1/1] bmk-kosroberta-base-ham seed 1: not run (not reproducible: no recipe published)"
    assert commands(lines) == []
    plan = pt.Plan(pt.parse_args(["--out", str(tmp_path)]))
    [entry] = pt.summarize([row], plan, [1])
    text = pt.markdown([entry], [1], {(row.id, 1): "not run: not reproducible"})
    assert "**bmk-kosroberta-base-ham** (not reproducible: no recipe)" in text and "| 48.96 |" in text

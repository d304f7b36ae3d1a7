"""Reliability, second round (issue 35), flags and mining: each case a command a careful user could type, and
what it must give: a refusal in one line before anything loads, a warning, or a run that works.

Classes: 5. mining that would destroy its input or cannot mine; 6. flags that cannot act in the chosen mode,
non-finite and out-of-range numbers; 8. degenerate input (a NUL byte in an index corpus).
"""
import os
import re

import pytest

from conftest import load_method


@pytest.fixture(scope="module")
def methods():
    return {name: load_method(name) for name in ("KoSimCSE", "KoSBERT", "KoSentenceT5")}


# (folder, flags, the one line's pattern); every case is refused by the parser (exit 2)
REFUSED = {
    "sts_loss_in_sup": ("KoSimCSE", ["--mode", "sup", "--sts_loss", "cosent"],
                        r"--sts_loss does nothing with --mode sup \(it is read by --mode multitask, sup_sts, pairs_sts\)"),
    "schedule_in_sup": ("KoSimCSE", ["--mode", "sup", "--multitask_schedule", "paired"],
                        r"--multitask_schedule does nothing with --mode sup"),
    "passage_len_in_unsup": ("KoSimCSE", ["--mode", "unsup", "--passage_max_len", "128"],
                             r"--passage_max_len does nothing with --mode unsup"),
    "sts_lr_in_multitask": ("KoSentenceT5", ["--mode", "multitask", "--sts_lr", "1e-5"],
                            r"--sts_lr does nothing with --mode multitask"),
    "sts_loss_in_nli": ("KoSBERT", ["--mode", "nli", "--sts_loss", "cosent"], r"--sts_loss does nothing with --mode nli"),
    "epochs_in_sts": ("KoSBERT", ["--mode", "sts", "--epochs", "3"],
                      r"--epochs does nothing with --mode sts \(it is read by --mode multitask\)"),
    "hardness_nan": ("KoSimCSE", ["--hardness_mode", "in_batch_negatives", "--hardness_strength", "nan"],
                     r"--hardness_strength nan: must be a finite number"),
    "hardness_inf": ("KoSimCSE", ["--hardness_strength", "inf"], r"--hardness_strength inf: must be a finite number"),
    "lr_nan": ("KoSBERT", ["--lr", "nan"], r"--lr nan: must be a finite number"),
    "warmup_inf": ("KoSentenceT5", ["--warmup_ratio", "inf"], r"--warmup_ratio inf: must be a finite number"),
    "matryoshka_twice": ("KoSimCSE", ["--matryoshka_dims", "64", "64"], r"--matryoshka_dims 64 64: a dimension given twice"),
    "matryoshka_negative_weight": ("KoSimCSE", ["--matryoshka_dims", "64", "32", "--matryoshka_weights", "1", "-1"],
                                   r"--matryoshka_weights 1.0 -1.0: each must be a finite number >= 0"),
    "matryoshka_nan_weight": ("KoSBERT", ["--mode", "sts", "--matryoshka_dims", "64", "32", "--matryoshka_weights",
                                          "nan", "1"], r"--matryoshka_weights nan 1.0: each must be a finite number"),
    "matryoshka_zero_weights": ("KoSimCSE", ["--matryoshka_dims", "64", "--matryoshka_weights", "0"],
                                r"--matryoshka_weights are all 0"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_flags_that_cannot_act_are_refused_in_one_line(methods, capsys, case, tmp_path):
    folder, flags, pattern = REFUSED[case]
    with pytest.raises(SystemExit) as e:
        methods[folder].train.parse_args(["--model", "x", "--device", "cpu", "--output_dir", str(tmp_path / "o"),
                                          *flags])
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(pattern, errors[0]), errors


def test_a_preset_carrying_an_idle_flag_warns_and_runs(methods, capsys, tmp_path):
    """presets/multitask.args sets --sts_file; with --mode sup after it, that flag cannot act: a warning (a
    published preset may carry it), not a refusal; typed flags of the mode's own still parse."""
    preset = os.path.join(methods["KoSimCSE"].path, "presets", "multitask.args")
    args = methods["KoSimCSE"].train.parse_args(["@" + preset, "--mode", "sup", "--model", "x", "--device", "cpu",
                                                 "--output_dir", str(tmp_path / "o")])
    assert args.mode == "sup"
    err = capsys.readouterr().err
    assert "warning: --sts_file does nothing with --mode sup" in err and "set by a preset file, ignored" in err


def test_kosentencet5_multitask_takes_its_schedule(methods, tmp_path):
    """--mode multitask read --multitask_schedule, which KoSentenceT5 did not define (AttributeError at start)."""
    t5 = methods["KoSentenceT5"].train
    for schedule in ("proportional", "paired"):
        args = t5.parse_args(["--model", "x", "--mode", "multitask", "--multitask_schedule", schedule, "--device", "cpu",
                              "--output_dir", str(tmp_path / "o")])
        (stage,) = t5.stages(args)
        assert stage.sources == ("sup", "sts") and stage.schedule == schedule


def mine_flags(tmp_path, *extra):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n사과 바나나\t과일 사과\n바다 파도\t해변 모래\n", encoding="utf-8")
    return ["--model_dir", "x", "--task", "mine", "--pairs_file", str(pairs), "--output_file",
            str(tmp_path / "out.tsv"), *extra]


MINE_REFUSED = {
    "output_is_pairs": (lambda t: ["--output_file", str(t / "pairs.tsv")], r"--output_file .*pairs\.tsv is the --pairs_file"),
    "output_is_corpus": (lambda t: ["--corpus_file", str(t / "out.tsv")], r"--output_file .*out\.tsv is the --corpus_file"),
    "margin_nan": (lambda t: ["--relative_margin", "nan"], r"--relative_margin nan: must be a finite number"),
    "margin_negative": (lambda t: ["--absolute_margin", "-0.1"], r"--absolute_margin -0.1: must not be negative"),
    "min_above_max": (lambda t: ["--min_score", "0.9", "--max_score", "0.5"], r"--min_score 0.9 is above --max_score 0.5"),
    "empty_rank_window": (lambda t: ["--range_min", "5", "--range_max", "5"], r"--range_max 5 must be above --range_min 5"),
}


@pytest.mark.parametrize("case", sorted(MINE_REFUSED))
def test_mining_flags_that_cannot_work_are_refused(methods, tmp_path, capsys, case):
    extra, pattern = MINE_REFUSED[case]
    with pytest.raises(SystemExit) as e:
        methods["KoSimCSE"].evaluation.parse_args(mine_flags(tmp_path, *extra(tmp_path)))
    assert e.value.code == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert re.search(pattern, line), line
    assert "사과 바나나" in (tmp_path / "pairs.tsv").read_text(encoding="utf-8")  # the input is untouched


def test_mining_a_blank_corpus_is_one_line_and_no_corpus_is_said(methods, tiny_bert, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    ev = methods["KoSimCSE"].evaluation
    model = ["--model_dir", tiny_bert, "--pooling", "mean", "--device", "cpu", "--max_len", "8"]
    with pytest.raises(methods["KoSimCSE"].data.DataError) as e:  # evaluation.py prints it as one error line
        ev.main(model + mine_flags(tmp_path, "--corpus_file", str(blank))[2:])
    assert str(e.value) == f"{blank}: no non-blank line to mine negatives from"
    ev.main(model + mine_flags(tmp_path)[2:])
    assert "mine: no --corpus_file, so the corpus is the pairs' 2 distinct positives" in capsys.readouterr().out
    assert (tmp_path / "out.tsv").read_text(encoding="utf-8").startswith("anchor\tpositive\tnegative")


def test_a_nul_byte_in_an_index_corpus_is_refused_with_its_line(methods, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("사과 바나나\n바다\x00파도\n".encode("utf-8"))
    with pytest.raises(methods["KoSimCSE"].data.DataError, match=rf"{corpus}:2: NUL byte in the text"):
        methods["KoSimCSE"].index.corpus_offsets(str(corpus))
    assert corpus.read_bytes().count(b"\x00") == 1  # the file is left as it was


def test_repeated_training_examples_are_counted_and_refused_above_half(methods):
    data = methods["KoSimCSE"].data
    said = []
    data.check_duplicates(["가", "나", "다"], "f.txt", said.append)
    assert said == []
    data.check_duplicates(["가", "나", "가", "다"], "f.txt", said.append)
    assert said == ["f.txt: 1 of 4 training examples (25.0%) repeat an earlier one"]
    with pytest.raises(data.DataError, match=r"f\.txt: 3 of 4 training examples \(75.0%\) repeat an earlier one, above "
                                             r"the 50% this toolkit trains on; deduplicate the data"):
        data.check_duplicates([("가", "나")] * 4, "f.txt", said.append)


def test_a_file_of_one_sentence_copied_is_refused_before_training(methods, tiny_bert, tmp_path):
    """unsup on 300 copies of one sentence: every in-batch negative would be the anchor itself."""
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("사과 바나나 포도.\n" * 300, encoding="utf-8")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        methods["KoSimCSE"].train.main(["--model", tiny_bert, "--mode", "unsup", "--train_file", str(wiki),
                                        "--output_dir", str(out), "--device", "cpu", "--max_steps", "1"])
    assert str(e.value) == (f"error: {wiki}: 299 of 300 training examples (99.7%) repeat an earlier one, above the "
                            f"50% this toolkit trains on; deduplicate the data")
    assert not (out / "best_model").exists()

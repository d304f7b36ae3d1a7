"""Cross-folder robustness: weights load in float32 whatever dtype they were saved in, in every method
folder; bad input to every train.py gives one clear error line and leaves the output folder alone."""
import os
import shutil

import pytest
import torch

from conftest import load_method, readers

FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE")


@pytest.fixture(scope="module")
def methods():
    return {name: load_method(name) for name in FOLDERS}


def saved_in_bf16(source, out):
    """``source`` (a model folder) saved again in bfloat16, as some hub checkpoints are."""
    from transformers import AutoConfig
    import transformers
    architecture = AutoConfig.from_pretrained(source).architectures[0]
    getattr(transformers, architecture).from_pretrained(source).to(torch.bfloat16).save_pretrained(out)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "spiece")):
            shutil.copy(os.path.join(source, name), out)
    return out


@pytest.mark.slow
def test_bf16_checkpoints_load_in_float32(methods, tiny_bert, tiny_t5, generator, tmp_path):
    """transformers 5 keeps a checkpoint's saved dtype: every folder's training and evaluation loaders
    must still give float32 weights (autocast is what --bf16 is for)."""
    import json
    from transformers import AutoModel, AutoTokenizer
    bert = saved_in_bf16(tiny_bert, str(tmp_path / "bert"))
    t5 = saved_in_bf16(tiny_t5, str(tmp_path / "t5"))
    mlm = saved_in_bf16(generator, str(tmp_path / "generator"))
    assert json.load(open(os.path.join(bert, "config.json"))).get("dtype") == "bfloat16"
    assert AutoModel.from_pretrained(bert).dtype == torch.bfloat16  # what we guard against
    trained = {"KoSimCSE": methods["KoSimCSE"].model.SentenceEncoder.from_pretrained(bert, pooler="mean"),
               "KoSBERT": methods["KoSBERT"].model.SentenceEncoder.from_pretrained(bert),
               "KoSentenceT5": methods["KoSentenceT5"].model.SentenceT5.from_pretrained(t5),
               "KoDiffCSE": methods["KoDiffCSE"].model.DiffCSE.from_pretrained(
                   bert, mlm, methods["KoDiffCSE"].dataloader.masking_vocabulary(AutoTokenizer.from_pretrained(bert)))}
    for name, model in trained.items():
        assert {p.dtype for p in model.parameters()} == {torch.float32}, name
    for name in FOLDERS:
        for folder in (bert, t5):
            backbone = methods[name].folder.load_backbone(folder)
            assert {p.dtype for p in backbone.parameters()} == {torch.float32}, (name, folder)


# ---------------------------------------------------------------------------------------------------
# Bad input through each folder's train.py: one test per case, each run over the four folders. The
# output folder holds an earlier run and --overwrite_output_dir is given, so "nothing written over" is
# checked too: the error must come before the earlier run is cleared.

STS_HEADER = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
NLI_HEADER = "sentence1\tsentence2\tgold_label\n"


@pytest.fixture(scope="module")
def models(tiny_bert, tiny_t5, generator):
    return {"bert": tiny_bert, "t5": tiny_t5, "generator": generator}


def cli(folder, models, data, out):
    """A 2-step run of ``folder``'s train.py on the synthetic data; later flags override these."""
    model = models["t5"] if folder == "KoSentenceT5" else models["bert"]
    task = {"KoSimCSE": ["--mode", "sup", "--train_file", "KorNLI/nli.train.ko.tsv"],
            "KoSBERT": ["--mode", "nli", "--train_file", "KorNLI/nli.train.ko.tsv"],
            "KoSentenceT5": ["--mode", "sup", "--train_file", "KorNLI/nli.train.ko.tsv"],
            "KoDiffCSE": ["--generator_name", models["generator"], "--train_file", "wiki/wiki_corpus.txt"]}[folder]
    return ["--model", model, *task, "--data_dir", data, "--output_dir", out, "--batch_size", "8", "--max_len",
            "24", "--max_steps", "2", "--eval_steps", "2", "--device", "cpu"]


def earlier_run(out):
    """An output folder holding a finished run; returns a snapshot to compare against."""
    os.makedirs(os.path.join(out, "best_model"))
    files = {"args.json": "{}", "train_log.jsonl": '{"step": 1}\n', "best_model/model.safetensors": "weights"}
    for name, text in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    return files


def assert_untouched(out, files):
    assert sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs) == sorted(files)
    for name, text in files.items():
        assert open(os.path.join(out, name)).read() == text, name


def fails(methods, folder, argv, out, *fragments):
    """train.main(argv) exits non-zero with one error line holding every fragment; ``out`` untouched."""
    files = earlier_run(out)
    with pytest.raises(SystemExit) as err:
        methods[folder].train.main(argv + ["--overwrite_output_dir"])
    message = str(err.value.code)
    assert err.value.code not in (0, None) and message.startswith("error: "), message
    first = message.splitlines()[0]
    for fragment in fragments:
        assert fragment in first, (fragment, message)
    assert_untouched(out, files)
    return message


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("folder", FOLDERS)
def test_missing_file(methods, models, synthetic_data, tmp_path, folder):
    missing = str(tmp_path / "nope.tsv")
    fails(methods, folder, cli(folder, models, synthetic_data, str(tmp_path / "out")) + ["--train_file", missing],
          str(tmp_path / "out"), f"{missing}: file not found")


@pytest.mark.parametrize("folder", FOLDERS)
def test_empty_file(methods, models, synthetic_data, tmp_path, folder):
    empty = write(tmp_path / "empty.tsv", "")
    out = str(tmp_path / "out")
    fails(methods, folder, cli(folder, models, synthetic_data, out) + ["--dev_file", empty], out,
          f"{empty}: file is empty")


@pytest.mark.parametrize("folder", FOLDERS)
def test_wrong_column_count(methods, models, synthetic_data, tmp_path, folder):
    bad = write(tmp_path / "dev.tsv", STS_HEADER + "main\tf\t2016\t1\t3.8\t하나 둘\t셋 넷\nmain\tf\t2016\t2\t3.8\t하나\n")
    out = str(tmp_path / "out")
    fails(methods, folder, cli(folder, models, synthetic_data, out) + ["--dev_file", bad], out,
          f"{bad}:3: expected 7 tab-separated fields")


@pytest.mark.parametrize("folder", FOLDERS)
def test_non_utf8_bytes(methods, models, synthetic_data, tmp_path, folder):
    first = NLI_HEADER if folder != "KoDiffCSE" else "좋은 문장.\n"  # KoDiffCSE trains on plain sentences
    second = "caf\xe9\tx\tentailment\n" if folder != "KoDiffCSE" else "caf\xe9\n"
    bad = write(tmp_path / "latin1.tsv", first.encode() + second.encode("latin-1"))
    out = str(tmp_path / "out")
    fails(methods, folder, cli(folder, models, synthetic_data, out) + ["--train_file", bad], out,
          f"{bad}:2: not valid UTF-8")


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("score, problem", [("abc", "is not a number"), ("5.5", "is outside 0-5")])
def test_bad_score(methods, models, synthetic_data, tmp_path, folder, score, problem):
    bad = write(tmp_path / "dev.tsv", STS_HEADER + f"main\tf\t2016\t1\t{score}\t하나 둘\t셋 넷\n")
    out = str(tmp_path / "out")
    fails(methods, folder, cli(folder, models, synthetic_data, out) + ["--dev_file", bad], out,
          f"{bad}:2: score '{score}' {problem}")


@pytest.mark.parametrize("folder", ["KoSimCSE", "KoSBERT", "KoSentenceT5"])  # KoDiffCSE reads no NLI
def test_unknown_nli_label(methods, models, synthetic_data, tmp_path, folder):
    bad = write(tmp_path / "nli.tsv", NLI_HEADER + "사과.\t과일.\tentailment\n사과.\t바다.\tmaybe\n")
    out = str(tmp_path / "out")
    fails(methods, folder, cli(folder, models, synthetic_data, out) + ["--train_file", bad], out,
          f"{bad}:3: unknown NLI label 'maybe'")


@pytest.mark.parametrize("folder", FOLDERS)
def test_model_folder_without_tokenizer(methods, models, synthetic_data, tmp_path, folder):
    bare = tmp_path / "bare"
    bare.mkdir()
    source = models["t5"] if folder == "KoSentenceT5" else models["bert"]
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(source, name), bare)
    out = str(tmp_path / "out")
    fails(methods, folder, cli(folder, models, synthetic_data, out) + ["--model", str(bare)], out,
          "cannot load", f"'{bare}'", "no tokenizer files")


@pytest.mark.parametrize("folder", FOLDERS)
def test_output_folder_with_a_different_run(methods, models, synthetic_data, tmp_path, folder):
    out = str(tmp_path / "out")
    files = earlier_run(out)
    with pytest.raises(SystemExit, match=r"already holds a run .*--overwrite_output_dir"):
        methods[folder].train.main(cli(folder, models, synthetic_data, out))
    assert_untouched(out, files)


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_long_sentences_are_truncated_counted_and_reported(methods, models, synthetic_data, tmp_path, folder,
                                                           capsys):
    long = " ".join(["사과 바나나 포도"] * 20) + "."
    if folder == "KoDiffCSE":  # distinct lines: a file of repeated examples is refused (check_duplicates)
        train = write(tmp_path / "wiki.txt", "".join(f"{i} {s}\n" for i, s in enumerate(
            ["사과 바나나.", long, "바다 파도.", "기차 역."] * 4)))
    else:
        train = write(tmp_path / "nli.tsv", NLI_HEADER + "".join(
            f"{i} {p}\t{p} 과일.\tentailment\n{i} {p}\t기차 역.\tcontradiction\n"
            for i, p in enumerate(["사과 바나나.", long] * 8)))
    out = str(tmp_path / "out")
    methods[folder].train.main(cli(folder, models, synthetic_data, out) + ["--train_file", train])
    captured = capsys.readouterr()
    report = [line for line in (captured.out + captured.err).splitlines() if "were truncated" in line]
    assert report and "longer than --max_len 24 tokens" in report[0], captured.err[-2000:]
    assert os.path.isfile(os.path.join(out, "best_model", "model.safetensors"))


@pytest.mark.parametrize("folder", FOLDERS)
def test_quoted_fields_are_read_verbatim(methods, tmp_path, folder):
    """KorNLU TSVs hold raw quotes (quoting off): every folder's readers keep them as they are."""
    dl = readers(methods[folder])
    sts = write(tmp_path / "sts.tsv", STS_HEADER + 'main\tf\t2016\t1\t3.8\t"슈퍼맨" 셔츠를 입은 개\t"more posh 라는 말\n')
    assert dl.read_sts(sts) == [('"슈퍼맨" 셔츠를 입은 개', '"more posh 라는 말', 3.8)]
    if hasattr(dl, "read_nli"):
        nli = write(tmp_path / "nli.tsv", NLI_HEADER + '"P\t"E 라는\tentailment\nP"\tC"\tcontradiction\n')
        rows, _ = dl.read_nli(nli)
        assert [r[:2] for r in rows] == [('"P', '"E 라는'), ('P"', 'C"')]

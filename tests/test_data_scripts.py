"""data/: download.sh (offline, with a stand-in curl), check_data.py and build_wiki_corpus.py."""
import itertools
import os
import subprocess
import sys

import pytest

from conftest import ROOT

DATA = os.path.join(ROOT, "data")
sys.path.insert(0, DATA)
import build_wiki_corpus  # noqa: E402
import check_data  # noqa: E402


@pytest.mark.slow
def test_check_data_counts_real_files(shared_data):
    lines, problems = check_data.check(shared_data)
    assert problems == 0, lines
    assert "ok       KorSTS/sts-train.tsv: 5,749 rows" in lines
    assert "ok       KorNLI/xnli.dev.ko.tsv: 2,490 rows" in lines  # pandas' default quoting reads 1,571
    _, problems = check_data.check(shared_data, require_all=True)
    assert problems == 2  # the KorNLI train files are not available offline


def test_check_data_flags_wrong_count_and_columns(tmp_path):
    os.makedirs(tmp_path / "KorSTS")
    (tmp_path / "KorSTS" / "sts-test.tsv").write_text("h\t" * 6 + "h\n" + "a\t" * 6 + "a\n")
    (tmp_path / "KorSTS" / "sts-dev.tsv").write_text("h\t" * 6 + "h\n" + "a\ta\n")
    lines, problems = check_data.check(str(tmp_path))
    assert problems == 2
    assert "BAD      KorSTS/sts-test.tsv: 1 rows (published: 1,379)" in lines
    assert any("sts-dev.tsv:2: 2 tab-separated fields, expected 7" in line for line in lines)


FAKE_CURL = """#!/usr/bin/env bash
# Stand-in for curl: serves the file of $FAKE_SOURCE with the URL's base name; fails like curl -f otherwise.
out=""; url=""
while [ $# -gt 0 ]; do case "$1" in -o) out=$2; shift 2;; --retry|--retry-delay) shift 2;; -*) shift;; *) url=$1; shift;; esac; done
src=$(find -L "$FAKE_SOURCE" -name "$(basename "$url")" -type f | head -n 1)
if [ -n "$src" ]; then cp "$src" "$out"; exit 0; fi
echo "curl: (22) The requested URL returned error: 404" >&2; exit 22
"""


@pytest.mark.slow
def test_download_script_verifies_resumes_and_stops_clearly(shared_data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(FAKE_CURL)
    (bin_dir / "curl").chmod(0o755)
    # The source: the shared data, plus KLUE-NLI train as KLUE publishes it (JSON), made from the shared TSV.
    import json
    source = tmp_path / "source"
    source.mkdir()
    for name in os.listdir(shared_data):
        (source / name).symlink_to(os.path.join(shared_data, name))
    with open(os.path.join(shared_data, "KLUE-NLI", "klue_nli_train.tsv"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    (source / "klue-nli-v1.1_train.json").write_text(json.dumps(
        [{"premise": a, "hypothesis": b, "gold_label": c} for a, b, c in rows], ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SOURCE=str(source), PY=sys.executable)
    dest = tmp_path / "data"
    run = lambda: subprocess.run(["bash", os.path.join(DATA, "download.sh"), "--no-wiki", str(dest)],
                                 env=env, capture_output=True, text=True, timeout=120)
    first = run()
    # Every public small file is fetched and checksum-verified; the KorNLI train file is not
    # served here, so the script stops with curl's error and a non-zero status.
    assert first.returncode != 0
    assert first.stdout.count("fetch   ") == 14 and "KorNLI/snli_1.0_train.ko.tsv" in first.stdout
    for rel in ("KorSTS/sts-dev.tsv", "KLUE-STS/klue_sts_train.csv", "KLUE-NLI/klue-nli-v1.1_dev.json",
                "KLUE-NLI/klue_nli_train.tsv", "KorQuAD/KorQuAD_v1.0_dev.json", "AutoRAG/qa_v4.parquet"):
        assert open(dest / rel, "rb").read() == open(os.path.join(shared_data, rel), "rb").read()
    assert "24,998 pairs" in first.stdout
    second = run()  # re-run: the verified files are skipped, not fetched again
    assert second.stdout.count("ok      ") == 13 and second.stdout.count("fetch   ") == 1
    # A corrupted file is detected and replaced.
    with open(dest / "KorSTS" / "sts-test.tsv", "a") as f:
        f.write("x")
    third = run()
    assert "fetch   KorSTS/sts-test.tsv" in third.stdout
    assert open(dest / "KorSTS" / "sts-test.tsv", "rb").read() == open(os.path.join(shared_data, "KorSTS/sts-test.tsv"), "rb").read()


def test_build_wiki_corpus_rules(tmp_path):
    src = tmp_path / "text" / "AA"
    src.mkdir(parents=True)
    (src / "wiki_00").write_text(
        '<doc id="1" url="u" title="지미 카터">\n지미 카터\n\n'
        "지미 카터는 미국의 39대 대통령이다. B. F. Skinner는 1.5배 큰 심리학자였다고 한다. 짧다.\n"
        '그는 "평화가 중요하다." 라고 말했다고 전해진다. <ref>주석이 있는 문장입니다.</ref>\n'
        "This line has no Hangul at all and is long enough.\n"
        "지미 카터는 미국의 39대 대통령이다.\n</doc>\n", encoding="utf-8")
    out = tmp_path / "wiki.txt"
    subprocess.run([sys.executable, os.path.join(DATA, "build_wiki_corpus.py"), str(tmp_path / "text"), str(out),
                    "--size", "4"], check=True, capture_output=True)
    got = out.read_text(encoding="utf-8").splitlines()
    assert got == ["지미 카터는 미국의 39대 대통령이다.", "B. F. Skinner는 1.5배 큰 심리학자였다고 한다.",
                   '그는 "평화가 중요하다."', "라고 말했다고 전해진다."]


def test_reference_wiki_lines_satisfy_the_rules(shared_data):
    path = os.path.join(shared_data, "wiki", "wiki_corpus.txt")
    for line in itertools.islice(open(path, encoding="utf-8"), 50_000):
        sentence = line.rstrip("\n")
        assert build_wiki_corpus.keep(sentence) and build_wiki_corpus.SPLIT.split(sentence) == [sentence], sentence


def test_klue_nli_json_to_tsv_checks_its_counts(tmp_path):
    """data/klue_nli_to_tsv.py: the official JSON in KorNLI's TSV layout, refused unless it has KLUE-NLI train's
    24,998 pairs and label counts; on the shared TSV, JSON -> TSV gives back the same bytes."""
    import json
    import subprocess
    import sys
    script = os.path.join(ROOT, "data", "klue_nli_to_tsv.py")
    small = tmp_path / "small.json"
    small.write_text(json.dumps([{"premise": " 전제 ", "hypothesis": "가설", "gold_label": "entailment"}]))
    out = subprocess.run([sys.executable, script, str(small), str(tmp_path / "small.tsv")], capture_output=True, text=True)
    assert out.returncode == 1 and "KLUE-NLI train has 24,998" in out.stderr and not (tmp_path / "small.tsv").exists()
    shared = os.path.join(ROOT, "..", "shared", "data", "KLUE-NLI", "klue_nli_train.tsv")
    if os.path.isfile(shared):
        with open(shared, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
        full = tmp_path / "train.json"
        full.write_text(json.dumps([{"premise": a, "hypothesis": b, "gold_label": c} for a, b, c in rows],
                                   ensure_ascii=False), encoding="utf-8")
        subprocess.run([sys.executable, script, str(full), str(tmp_path / "train.tsv")], check=True, capture_output=True)
        assert (tmp_path / "train.tsv").read_bytes() == open(shared, "rb").read()

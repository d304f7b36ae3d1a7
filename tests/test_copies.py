"""The copies between method folders match their origins, and the checker catches every kind of drift."""
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "utils"))
import check_copies  # noqa: E402


@pytest.mark.slow
def test_method_folders_copies_are_in_sync():
    problems = check_copies.check(ROOT)
    assert problems == [], "\n".join(problems)


def test_every_method_folder_has_common_as_whole_file_copies():
    """The top level of a folder is its method; everything shared is a first-line-marked copy in common/."""
    whole = {os.path.relpath(c, ROOT): os.path.relpath(o, ROOT) for c, o in check_copies.find_whole_copies(ROOT).items()}
    origin_files = sorted(f for f in os.listdir(os.path.join(ROOT, "KoSimCSE", "common")) if f.endswith(".py"))
    for folder in ("KoSBERT", "KoSentenceT5", "KoDiffCSE"):
        for file in origin_files:
            assert whole[f"{folder}/common/{file}"] == f"KoSimCSE/common/{file}"
        assert whole[f"{folder}/evaluation.py"] == "KoSimCSE/evaluation.py"


def test_each_method_reads_in_one_sitting():
    """A method folder's top level (train, model, dataloader, evaluation) stays at most 900 lines, and no
    shared run-plumbing file in common/ grows past 350: a reader can name what each file does."""
    for folder in ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE"):
        lines = sum(len(open(os.path.join(ROOT, folder, f"{name}.py"), encoding="utf-8").read().splitlines())
                    for name in ("train", "model", "dataloader", "evaluation"))
        assert lines <= 900, f"{folder}: {lines} lines at the top level"
    for name in ("flags", "checkpoint", "stages", "dev", "run"):
        path = os.path.join(ROOT, "KoSimCSE", "common", f"{name}.py")
        assert len(open(path, encoding="utf-8").read().splitlines()) <= 350, path


def test_every_method_folder_shares_the_loop():
    """fit / train / main are checked copies of KoSimCSE's in every other method folder."""
    marked = {(os.path.relpath(path, ROOT), name) for path, _, _, name in check_copies.find_copies(ROOT)}
    for folder in ("KoSBERT", "KoSentenceT5", "KoDiffCSE"):
        for name in ("fit", "train", "main"):
            assert (f"{folder}/train.py", name) in marked, (folder, name)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_detects_and_fixes_drifted_definitions(tmp_path):
    write(tmp_path / "KoSimCSE" / "evaluation.py", "def f(x):\n    return x + 1\n\n\ndef g():\n    return 2\n")
    write(tmp_path / "KoOther" / "evaluation.py",
          "import os\n\n\n# Copied from KoSimCSE/evaluation.py:g\ndef g():\n    return 2\n\n\n"
          "# Copied from KoSimCSE/evaluation.py:f\ndef f(x):\n    return x + 2  # drifted\n\n\n"
          "# Copied from KoSimCSE/evaluation.py:h\ndef h():\n    pass\n")
    problems = check_copies.check(str(tmp_path))
    assert len(problems) == 2
    assert "KoOther/evaluation.py:9: f differs from KoSimCSE/evaluation.py" in problems[0]
    assert "has no top-level h" in problems[1]
    check_copies.check(str(tmp_path), fix=True)
    fixed = (tmp_path / "KoOther" / "evaluation.py").read_text()
    assert "return x + 1\n" in fixed and "drifted" not in fixed and fixed.startswith("import os\n")
    assert len(check_copies.check(str(tmp_path))) == 1  # only the missing origin is left


def test_checker_guards_the_constants_a_copied_function_reads(tmp_path):
    write(tmp_path / "KoSimCSE" / "data.py", 'SPLITS = {"a": 1}\nOTHER = 3\n\n\ndef get(k):\n    return SPLITS[k]\n')
    copy = tmp_path / "KoOther" / "data.py"
    write(copy, 'SPLITS = {"a": 2}\nOTHER = 4\n\n\n# Copied from KoSimCSE/data.py:get\ndef get(k):\n    return SPLITS[k]\n')
    problems = check_copies.check(str(tmp_path))
    assert problems == ["KoOther/data.py:5: the constant SPLITS that get reads differs from KoSimCSE/data.py"]
    check_copies.check(str(tmp_path), fix=True)
    assert copy.read_text().startswith('SPLITS = {"a": 1}\nOTHER = 4\n')  # OTHER is not read: left alone
    write(copy, '# Copied from KoSimCSE/data.py:get\ndef get(k):\n    return SPLITS[k]\n')
    assert "reads the constant SPLITS, which KoOther/data.py does not define" in check_copies.check(
        str(tmp_path))[0]


def test_checker_whole_file_copies_and_unresolvable_markers(tmp_path):
    marker = "# Copied from KoSimCSE/common/flags.py (whole file; delete this line to own it)\n"
    write(tmp_path / "KoSimCSE" / "common" / "flags.py", '"""Doc."""\nX = 1\n')
    write(tmp_path / "KoOther" / "common" / "flags.py", marker + '"""Doc, edited."""\nX = 1\n')
    write(tmp_path / "KoOther" / "train.py", "# Copied from KoSimCSE/common/flags.py:Cls.method\ndef method():\n"
                                             "    pass\n\n\n# Copied from KoSimCSE/missing.py:f\ndef f():\n    pass\n\n\n"
                                             "# Copied from KoSimCSE/common/flags.py:X\n\nX = 1\n")
    problems = check_copies.check(str(tmp_path))
    assert problems[0].startswith("KoOther/common/flags.py: differs from KoSimCSE/common/flags.py "
                                  "(a whole-file copy): if you edited the origin, run `python utils/check_copies.py "
                                  "--fix`; if you edited the copy, delete its marker line to own it")
    assert "`Cls.method` is a nested name" in problems[1]
    assert "origin file KoSimCSE/missing.py does not exist" in problems[2]
    assert "the marker must sit right above the definition of X" in problems[3]
    check_copies.check(str(tmp_path), fix=True)
    assert (tmp_path / "KoOther" / "common" / "flags.py").read_text() == marker + '"""Doc."""\nX = 1\n'


def test_a_copied_call_without_its_import_fails(tmp_path):
    """--fix copies an edited origin's definition; if it now calls something the copy's file lacks, the check
    fails instead of passing a file that would raise NameError (or ImportError) where it lands."""
    write(tmp_path / "KoSimCSE" / "model.py", "def penalty():\n    return 0\n")
    write(tmp_path / "KoSimCSE" / "train.py", "from model import penalty\n\n\ndef step(x):\n    return x + penalty()\n")
    write(tmp_path / "KoOther" / "model.py", "def other():\n    return 1\n")
    copy = tmp_path / "KoOther" / "train.py"
    write(copy, "# Copied from KoSimCSE/train.py:step\ndef step(x):\n    return x\n")
    check_copies.check(str(tmp_path), fix=True)
    assert "return x + penalty()" in copy.read_text()
    assert check_copies.check(str(tmp_path)) == ["KoOther/train.py:3: undefined name 'penalty'"]
    write(copy, "from model import penalty\n\n\n# Copied from KoSimCSE/train.py:step\ndef step(x):\n    return x + penalty()\n")
    assert check_copies.check(str(tmp_path)) == [
        "KoOther/train.py:1: imports penalty from model, which does not define it"]
    write(tmp_path / "KoOther" / "model.py", "def penalty():\n    return 1\n")
    assert check_copies.check(str(tmp_path)) == []


def test_deleting_the_marker_owns_the_file(tmp_path):
    """A researcher diverges a copy by deleting its first line: the edit is then kept, by the check and by --fix."""
    write(tmp_path / "KoSimCSE" / "common" / "sts.py", "SCALE = 100\n")
    copy = tmp_path / "KoOther" / "common" / "sts.py"
    write(copy, "# Copied from KoSimCSE/common/sts.py (whole file; delete this line to own it)\nSCALE = 1\n")
    assert len(check_copies.check(str(tmp_path))) == 1
    write(copy, "SCALE = 1\n")  # the marker deleted: KoOther owns its sts.py
    assert check_copies.check(str(tmp_path), fix=True) == []
    assert copy.read_text() == "SCALE = 1\n"


def test_unguarded_lists_cross_folder_repeats_the_checker_does_not_guard(tmp_path, monkeypatch):
    body = "".join(f"    x{i} = {i}\n" for i in range(8))
    write(tmp_path / "KoSimCSE" / "a.py", f"def f():\n{body}\n\ndef g():\n{body}")
    write(tmp_path / "KoSBERT" / "a.py", f"# Copied from KoSimCSE/a.py:f\ndef f():\n{body}\n\ndef h():\n{body}")
    report = ("2 pairs\nD1 KoSBERT/a.py:2-10 ~ KoSimCSE/a.py:1-9\n"  # the marked copy of f: guarded
              "D2 KoSBERT/a.py:13-21 ~ KoSimCSE/a.py:12-20\n")     # h repeats g unmarked
    assert check_copies.unguarded_pairs(report, str(tmp_path)) == ["D2 KoSBERT/a.py:13-21 ~ KoSimCSE/a.py:12-20"]


def test_without_pyflakes_the_checker_says_what_to_install():
    """One line naming the install command, not a ModuleNotFoundError traceback."""
    import subprocess
    script = os.path.join(ROOT, "utils", "check_copies.py")
    hide = ("import runpy, sys; sys.modules['pyflakes'] = None; sys.argv = [sys.argv[1]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hide, script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "error: utils/check_copies.py needs pyflakes: pip install -r requirements-dev.txt"

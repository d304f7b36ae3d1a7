"""The "Copied from" blocks of the method folders match their origins, and the checker catches drift."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "utils"))
import check_copies  # noqa: E402


def test_method_folders_copies_are_in_sync():
    problems = check_copies.check(ROOT)
    assert problems == [], "\n".join(problems) + "\nrun: python utils/check_copies.py --fix"


def test_checker_detects_and_fixes_drift(tmp_path):
    origin = tmp_path / "KoSimCSE"
    copy = tmp_path / "KoOther"
    origin.mkdir()
    copy.mkdir()
    (origin / "evaluation.py").write_text("def f(x):\n    return x + 1\n\n\ndef g():\n    return 2\n")
    (copy / "evaluation.py").write_text(
        "import os\n\n\n# Copied from KoSimCSE/evaluation.py:g\ndef g():\n    return 2\n\n\n"
        "# Copied from KoSimCSE/evaluation.py:f\ndef f(x):\n    return x + 2  # drifted\n\n\n"
        "# Copied from KoSimCSE/evaluation.py:h\ndef h():\n    pass\n")
    problems = check_copies.check(str(tmp_path))
    assert len(problems) == 2
    assert "KoOther/evaluation.py:9: f differs from KoSimCSE/evaluation.py" in problems[0]
    assert "has no top-level h" in problems[1]
    check_copies.check(str(tmp_path), fix=True)
    fixed = (copy / "evaluation.py").read_text()
    assert "return x + 1\n" in fixed and "drifted" not in fixed and fixed.startswith("import os\n")
    assert len(check_copies.check(str(tmp_path))) == 1  # only the missing origin is left

"""README.md is the landing page: short, and its one hand-kept results table agrees with the generated one.

The numbers of README's "## Results" table are copied by hand from bench/real_table.json (what
utils/real_table.py writes); a row re-run without updating README would leave it stale, so every cell is
compared with the JSON, formatted as utils/real_table.py formats bench/real_table.md.
"""
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "utils"))
import real_table as rt  # noqa: E402

COLUMNS = {  # README column -> (real_table.json metric, scale)
    "KorSTS test": ("korsts-test/standard/cosine_spearman", 1),
    "KLUE-STS dev": ("klue-sts-dev/standard/cosine_spearman", 1),
    "KorQuAD": ("retrieval/korquad-dev/ndcg_at_10", 100),
    "AutoRAG": ("retrieval/autorag/ndcg_at_10", 100),
}


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def results_table(readme):
    """(header cells, [row cells]) of the first table under "## Results"."""
    section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return cells[0], [c for c in cells[2:]]


def test_readme_is_a_landing_page():
    """At most 200 lines; a heading per job, in the order a newcomer needs them; commands in code blocks;
    every relative link points at a file or folder that exists."""
    readme = read("README.md")
    assert len(readme.splitlines()) <= 200
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings[:6] == ["Train", "Evaluate", "Search and index", "Use a saved model", "Results",
                            "Reproducing the papers' tables"]
    assert readme.splitlines()[2:6] == [
        "```bash",
        "pip install -r requirements.txt && bash run_example.sh    # main job: every method, train -> evaluate -> "
        "search, KorSTS table",
        "bash .ci/run                                              # tests (installs requirements-dev, runs python "
        "-m pytest -q tests)",
        "```"]
    for doc in ("README.md", "docs/training.md", "docs/evaluation.md", "docs/reliability.md", "docs/results.md"):
        folder = os.path.dirname(os.path.join(ROOT, doc))
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", read(doc)):
            if "://" not in target:
                assert os.path.exists(os.path.join(folder, target)), f"{doc}: broken link {target}"


def mismatches(readme, table):
    """The cells of README's results table that differ from ``table`` (real_table.json's rows)."""
    header, rows = results_table(readme)
    assert header[:2] == ["row", "STS prefix"] and header[2:] == list(COLUMNS)
    assert len(rows) >= 4
    wrong = []
    for cells in rows:
        name = re.match(r"`([^`]+)`", cells[0])
        if not name or name.group(1) not in table:
            wrong.append(f"{cells[0]}: not a row of bench/real_table.json")
            continue
        entry = table[name.group(1)]
        prefix = repr(entry["sts_prefix"]) if entry.get("sts_prefix") else "none"
        expected = [prefix] + [rt.fmt(entry["metrics"].get(key), scale) for key, scale in COLUMNS.values()]
        wrong += [f"{name.group(1)} {column}: README {cell}, bench/real_table.json {want}"
                  for column, cell, want in zip(header[1:], cells[1:], expected) if cell != want]
    return wrong


def test_readme_results_equal_real_table_json():
    assert mismatches(read("README.md"), json.loads(read("bench/real_table.json"))["rows"]) == []


def test_a_stale_readme_number_is_caught():
    """The comparison is not vacuous: a README whose first number was not updated after a re-run fails."""
    readme, table = read("README.md"), json.loads(read("bench/real_table.json"))["rows"]
    first = next(row for row in table if f"| `{row}`" in readme)
    rerun = json.loads(json.dumps(table))
    rerun[first]["metrics"]["korsts-test/standard/cosine_spearman"]["mean"] += 0.5
    assert [m.split(":")[0] for m in mismatches(readme, rerun)] == [f"{first} KorSTS test"]

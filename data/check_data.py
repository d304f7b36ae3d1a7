"""Check a data folder: which files are present, and whether each has the published row count.

    python data/check_data.py [DATA_DIR] [--require-all] [--no-wiki]

Rows are counted the way the training scripts read them: KorNLU TSVs split on tabs with quoting
off (a CSV reader with default quoting loses rows there), KLUE CSVs with RFC-4180 quoting, JSON as
arrays. Exit status 1 if a present file has the wrong count or too few/many columns, or (with
--require-all) if a file is missing.
"""
import argparse
import csv
import json
import os
import sys

# path: (published rows, kind)
EXPECTED = {
    "KorNLI/snli_1.0_train.ko.tsv": (550_152, "tsv3"),
    "KorNLI/multinli.train.ko.tsv": (392_702, "tsv3"),
    "KorNLI/xnli.dev.ko.tsv": (2_490, "tsv3"),
    "KorNLI/xnli.test.ko.tsv": (5_010, "tsv3"),
    "KorSTS/sts-train.tsv": (5_749, "tsv7"),
    "KorSTS/sts-dev.tsv": (1_500, "tsv7"),
    "KorSTS/sts-test.tsv": (1_379, "tsv7"),
    "KLUE-STS/klue-sts-v1.1_dev.json": (519, "json"),
    "KLUE-STS/klue_sts_train.csv": (11_668, "csv3"),
    "KLUE-STS/klue_sts_val.csv": (519, "csv3"),
    "KLUE-NLI/klue-nli-v1.1_dev.json": (3_000, "json"),
    "KLUE-NLI/klue_nli_train.tsv": (24_998, "tsv3"),
    "KorQuAD/KorQuAD_v1.0_dev.json": (140, "json-data"),  # articles (5,774 questions)
    "wiki/wiki_corpus.txt": (1_000_000, "lines"),
}


def count_rows(path, kind):
    """Number of data rows; raises ValueError naming the line of a row with the wrong column count."""
    if kind.startswith("tsv"):
        width, n = int(kind[3:]), 0
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != width:
                    raise ValueError(f"{path}:{lineno}: {len(fields)} tab-separated fields, expected {width}")
                n += lineno > 1  # the header row
        return n
    if kind == "csv3":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        bad = [i for i, r in enumerate(rows, 1) if len(r) != 3]
        if bad:
            raise ValueError(f"{path}: record {bad[0]} has {len(rows[bad[0] - 1])} fields, expected 3")
        return len(rows) - 1
    if kind == "json":
        with open(path, encoding="utf-8") as f:
            return len(json.load(f))
    if kind == "json-data":
        with open(path, encoding="utf-8") as f:
            return len(json.load(f)["data"])
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def check(data_dir, require_all=False, wiki=True):
    """Printable report lines and the number of problems."""
    lines, problems = [], 0
    for rel, (want, kind) in EXPECTED.items():
        if rel.startswith("wiki/") and not wiki:
            continue
        path = os.path.join(data_dir, rel)
        if not os.path.isfile(path):
            lines.append(f"missing  {rel}")
            problems += require_all
            continue
        try:
            got = count_rows(path, kind)
        except (ValueError, UnicodeDecodeError) as e:
            lines.append(f"BAD      {rel}: {e}")
            problems += 1
            continue
        ok = got == want
        problems += not ok
        lines.append(f"{'ok' if ok else 'BAD':8} {rel}: {got:,} rows" + ("" if ok else f" (published: {want:,})"))
    return lines, problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--require-all", action="store_true", help="a missing file is an error")
    p.add_argument("--no-wiki", action="store_true", help="do not expect wiki/wiki_corpus.txt")
    args = p.parse_args()
    lines, problems = check(args.data_dir, args.require_all, wiki=not args.no_wiki)
    print("\n".join(lines))
    print(f"{problems} problem(s) in {args.data_dir}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

"""KLUE-NLI train, official JSON -> the KorNLI TSV layout every reader here takes, checked by counts.

    python data/klue_nli_to_tsv.py klue-nli-v1.1_train.json KLUE-NLI/klue_nli_train.tsv

The official ``klue-nli-v1.1_train.json`` (KLUE-benchmark/KLUE) is a JSON array of {guid, source, premise,
hypothesis, gold_label, ...}. Written: a header ``sentence1<TAB>sentence2<TAB>gold_label`` and one row per
pair, premise and hypothesis stripped, no quoting -- the layout of KorNLI's snli_1.0_train.ko.tsv. The
result must have KLUE-NLI train's 24,998 pairs with its label counts (entailment 8,561, contradiction
8,489, neutral 7,948); anything else is refused, and nothing is written.
"""
import collections
import json
import os
import sys

ROWS = 24_998
LABELS = {"entailment": 8_561, "contradiction": 8_489, "neutral": 7_948}


def convert(src, dst):
    with open(src, encoding="utf-8") as f:
        items = json.load(f)
    rows = []
    for i, item in enumerate(items):
        try:
            premise, hypothesis, label = item["premise"].strip(), item["hypothesis"].strip(), item["gold_label"]
        except (KeyError, TypeError, AttributeError) as e:
            sys.exit(f"error: {src}: item {i}: missing or bad field {e}")
        if "\t" in premise + hypothesis or "\n" in premise + hypothesis:
            sys.exit(f"error: {src}: item {i}: a tab or newline inside a sentence")
        rows.append((premise, hypothesis, label))
    counts = dict(collections.Counter(label for _, _, label in rows))
    if len(rows) != ROWS or counts != LABELS:
        sys.exit(f"error: {src}: {len(rows):,} pairs with labels {counts}; KLUE-NLI train has {ROWS:,} with {LABELS}")
    tmp = dst + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("sentence1\tsentence2\tgold_label\n")
        f.writelines(f"{p}\t{h}\t{label}\n" for p, h, label in rows)
    os.replace(tmp, dst)
    print(f"{dst}: {len(rows):,} pairs ({', '.join(f'{k} {v:,}' for k, v in counts.items())})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(sys.argv[1], sys.argv[2])

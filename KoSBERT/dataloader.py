"""Readers for the Korean STS/NLI files and the tokenised sentence-pair datasets KoSBERT trains on.

Formats (see data/README.md):
  * KorNLU TSVs (KorSTS ``sts-*.tsv``, KorNLI ``*.ko.tsv``): tab-separated with a header row and
    **no quoting** -- many fields start with a raw ``"`` that a CSV reader would swallow.
  * KLUE-STS: the official dev JSON or the CSV export (ordinary RFC-4180 quoting).
  * KLUE-NLI: the official JSON.

Every reader stops on a malformed row with a ``DataError`` whose message names the file, the line
and the problem; nothing is dropped or altered silently. The readers are in common/data.py.

KoSBERT trains on sentence *pairs*:
  nli  (premise, hypothesis, class id) with BM-K's label ids ``LABEL_IDS`` (contradiction 0,
       entailment 1, neutral 2), for the softmax classification objective;
  sts  (sentence1, sentence2, score / 5) for the cosine-regression objective.
"""
from common.data import DataError, check_duplicates, read_nli

LABEL_IDS = {"contradiction": 0, "entailment": 1, "neutral": 2}  # BM-K's training_nli.py


def load_nli_pairs(paths, log=print):
    """(premise, hypothesis, class id) rows of every NLI file; rows with the label ``-`` are skipped."""
    pairs = []
    for path in paths:
        rows, unlabeled = read_nli(path)
        note = f", {unlabeled:,} rows without a gold label skipped" if unlabeled else ""
        log(f"{path}: {len(rows):,} labelled NLI pairs{note}")
        pairs += [(premise, hypothesis, LABEL_IDS[label]) for premise, hypothesis, label in rows]
    if not pairs:
        raise DataError(f"{', '.join(paths)}: no labelled NLI pairs")
    check_duplicates([(premise, hypothesis) for premise, hypothesis, _ in pairs], ", ".join(paths), log)
    return pairs



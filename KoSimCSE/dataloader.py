"""SimCSE's training sets: NLI triplets (premise, entailment, contradiction) for sup, each wiki
sentence twice (two dropout views) for unsup, and (query, passage[, negative]) rows for pairs, tokenised
once. The file readers, the batch plan and the collators are in common/data.py."""
import os
import random

import torch

from common.data import (DataError, TokenizedTexts, check_duplicates, read_nli, read_pairs, read_sentences,
                         read_triplets)
from common.retrieval import read_beir_pairs

def nli_to_triplets(rows):
    """SimCSE's rule: one (premise, entailment, contradiction) per premise that has both.

    The first entailment and the first contradiction hypothesis seen for a premise are used, in file
    order; neutral pairs are not used.
    """
    slots = {}
    for premise, hypothesis, label in rows:
        slot = slots.setdefault(premise, [None, None])
        if label == "entailment" and slot[0] is None:
            slot[0] = hypothesis
        elif label == "contradiction" and slot[1] is None:
            slot[1] = hypothesis
    return [(p, e, c) for p, (e, c) in slots.items() if e is not None and c is not None]


def load_triplets(paths, log=print):
    triplets = []
    for path in paths:
        mined = read_triplets(path)  # an anchor/positive/negative TSV (--task mine): every row is a triplet
        if mined is not None:
            log(f"{path}: {len(mined):,} triplets (anchor, positive, negative rows)")
            triplets.extend(mined)
            continue
        rows, unlabeled = read_nli(path)
        found = nli_to_triplets(rows)
        note = f", {unlabeled:,} rows without a gold label skipped" if unlabeled else ""
        log(f"{path}: {len(found):,} triplets from {len(rows):,} labelled rows{note}")
        triplets.extend(found)
    if not triplets:
        raise DataError(f"{', '.join(paths)}: no premise has both an entailment and a contradiction hypothesis")
    return triplets


def load_pairs(paths, log=print):
    """(anchor, positive[, negative]) rows of anchor/positive[/negative] TSVs (data/make_ict.py, evaluation.py
    --task mine) and BEIR folders (qrels/train.tsv); every file must have the same columns."""
    rows, columns = [], None
    for path in paths:
        if os.path.isdir(path):
            found = read_beir_pairs(path)
            log(f"{path}: {len(found):,} (query, passage) pairs from qrels/train.tsv")
        else:
            found = read_pairs(path)
            log(f"{path}: {len(found):,} {'(anchor, positive, negative)' if len(found[0]) == 3 else '(anchor, positive)'}"
                f" rows")
        if columns is not None and len(found[0]) != columns:
            raise DataError(f"{path}: {len(found[0])} columns, but {paths[0]} has {columns}: pairs training takes "
                            f"files of one layout (with a negative in every row, or in none)")
        columns = len(found[0])
        rows.extend(found)
    return rows


class PairsDataset(torch.utils.data.Dataset):
    """Item i is (anchor ids, positive ids[, negative ids]): anchors (queries) and passages tokenised apart, each
    with its own prefix and length limit."""

    def __init__(self, anchors, passages, num_columns):
        self.anchors, self.passages, self.num_columns = anchors, passages, num_columns

    def __len__(self):
        return len(self.anchors)

    def __getitem__(self, i):
        k = self.num_columns - 1
        return (self.anchors[i],) + tuple(self.passages[i * k + j] for j in range(k))


class ContrastiveDataset(torch.utils.data.Dataset):
    """Item i is a tuple of token-id arrays, one per column.

    ``views=1``: the ``num_columns`` consecutive rows i*k .. i*k+k-1 (sup: anchor, positive, hard negative).
    ``views=2`` (with num_columns=1): row i twice (unsup: dropout makes the two views differ)."""

    def __init__(self, tokenized, num_columns, views=1):
        self.tokenized, self.num_columns, self.views = tokenized, num_columns, views

    def __len__(self):
        return len(self.tokenized) // self.num_columns

    def __getitem__(self, i):
        k = self.num_columns
        return tuple(self.tokenized[i * k + j] for j in range(k)) * self.views


def build_contrastive_dataset(kind, paths, tokenizer, max_len, max_samples=None, seed=42, log=print, prefix="",
                              passage_prefix="", passage_max_len=None):
    """The training set of SimCSE, tokenised once. kind "sup": NLI triplets by SimCSE's rule (entailment =
    positive, contradiction = hard negative); "unsup": sentence-per-line files, each sentence twice; "pairs":
    (query, passage[, negative passage]) rows (load_pairs), the queries with ``prefix`` and ``max_len``, the
    passages with ``passage_prefix`` and ``passage_max_len``. ``max_samples``: a seeded random subset of triplets
    / sentences / pairs; ``prefix`` (--query_prefix) goes before every sentence of sup and unsup too (NLI and
    wiki sentences are symmetric text)."""
    if kind == "pairs":
        rows = load_pairs(paths, log=log)
        check_duplicates([tuple(r[:2]) for r in rows], " ".join(paths), log)
        if max_samples is not None and max_samples < len(rows):
            rows = random.Random(seed).sample(rows, max_samples)
            log(f"using {len(rows):,} pairs (--max_train_samples)")
        anchors = TokenizedTexts(tokenizer, [r[0] for r in rows], max_len, desc="tokenize queries", prefix=prefix)
        passages = TokenizedTexts(tokenizer, [s for r in rows for s in r[1:]], passage_max_len or max_len,
                                  desc="tokenize passages", prefix=passage_prefix)
        for what, tokenized, limit in (("queries", anchors, max_len), ("passages", passages, passage_max_len)):
            if tokenized.num_truncated:
                log(f"{tokenized.num_truncated:,} of {len(tokenized):,} {what} were longer than {limit} tokens and "
                    f"were truncated")
        return PairsDataset(anchors, passages, len(rows[0]))
    if kind == "sup":
        rows = load_triplets(paths, log=log)
        check_duplicates([tuple(r) for r in rows], " ".join(paths), log)
        if max_samples is not None and max_samples < len(rows):
            rows = random.Random(seed).sample(rows, max_samples)
            log(f"using {len(rows):,} triplets (--max_train_samples)")
        texts = [s for triplet in rows for s in triplet]
    else:
        texts = [s for path in paths for s in read_sentences(path, max_samples, seed, log=log)]
        check_duplicates(texts, " ".join(paths), log)
    tokenized = TokenizedTexts(tokenizer, texts, max_len, desc=f"tokenize {kind}", prefix=prefix)
    if tokenized.num_truncated:
        log(f"{tokenized.num_truncated:,} of {len(tokenized):,} training sentences were longer than "
            f"--max_len {max_len} tokens and were truncated")
    return ContrastiveDataset(tokenized, 3) if kind == "sup" else ContrastiveDataset(tokenized, 1, views=2)

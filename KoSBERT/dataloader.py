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
import os
import random

import torch

from common.data import DataError, check_duplicates, pad_batch, read_nli, read_pairs
from common.retrieval import read_beir_pairs

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




def load_anchor_texts(path, count, seed, log=print):
    """``count`` (query, passage) pairs of --anchor_file drawn by ``seed`` (all of them if fewer): the pairs TSV
    (anchor<TAB>positive[...], data/make_ict.py) or BEIR folder that KoSimCSE's pairs training reads. Their
    texts keep the starting model's embeddings (model.anchor_loss): queries with --query_prefix, passages with
    --passage_prefix."""
    rows = read_beir_pairs(path) if os.path.isdir(path) else read_pairs(path)
    if count < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), count))]
    log(f"{path}: {len(rows):,} (query, passage) pairs as anchor texts")
    return [r[0] for r in rows], [r[1] for r in rows]


class AnchoredPairs(torch.utils.data.Dataset):
    """A PairDataset whose item i also carries one anchor text (token ids): of the queries and passages of
    --anchor_file, tokenised apart (each with its prefix and length limit) and taken in a seeded order, so that
    each training batch of B pairs brings B anchor texts, the same ones wherever a run is resumed or sliced."""

    def __init__(self, pairs, queries, passages, seed):
        self.pairs, self.texts = pairs, (queries, passages)
        total = len(queries) + len(passages)
        self.order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        j = self.order[i % len(self.order)]
        queries, passages = self.texts
        return (*self.pairs[i], queries[j] if j < len(queries) else passages[j - len(queries)])


class AnchorCollator:
    """PairCollator's batch plus ``anchor_input_ids`` / ``anchor_attention_mask``: the items' anchor texts."""

    def __init__(self, pair_collator, pad_id):
        self.pair_collator, self.pad_id = pair_collator, pad_id

    def __call__(self, batch):
        out = self.pair_collator([item[:3] for item in batch])
        anchors = pad_batch([item[3] for item in batch], self.pad_id)
        out["anchor_input_ids"], out["anchor_attention_mask"] = anchors["input_ids"], anchors["attention_mask"]
        return out

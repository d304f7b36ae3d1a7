"""Hard-negative mining for (anchor, positive) pairs, with the candidate filters of sentence-transformers'
``util.mine_hard_negatives`` (6.x, sampling_strategy="top", output_format="triplet"), searched exactly
(faiss IndexFlatIP over L2-normalised rows = cosine), written as triplets KoSimCSE/train.py --mode sup reads.

The semantics follow sentence-transformers step by step:
  * corpus = the given corpus plus every positive, exact duplicates removed (first occurrence kept);
    without a corpus, the positives alone. Anchors are deduplicated; an anchor with several positives
    has all of them excluded from its candidates, and its margins use its lowest positive score.
  * candidates: the top ``range_max + max_positives + 1`` corpus texts by cosine to the anchor; the
    anchor's own text and its positives (by exact text, so no exact duplicate of a positive survives) are
    excluded.
  * absolute_margin m: a candidate is dropped when score + m > positive score.
  * relative_margin r: dropped when score > positive - |positive| * r.
  * max_score / min_score: dropped above / below.
  * then, among the surviving candidates in score order, ranks range_min .. range_max-1 are kept and the
    first ``num_negatives`` of them are the negatives (the rank range counts survivors, as in
    sentence-transformers, where filtered candidates get -inf before its top-k).
  * range_max default: range_min + num_negatives + max_positives, or range_min + 10 * num_negatives +
    max_positives when a margin or max_score is set.
Triplets come out per distinct anchor (first-seen order), per positive, negatives in descending score.
"""
import math
import os
import sys

import numpy as np

from .data import DataError, iter_lines, read_nli, read_tsv
from .encoding import encode
from .index import build_faiss_index

TRIPLET_HEADER = ("anchor", "positive", "negative")


def read_pairs(path):
    """(anchor, positive) pairs of a file: a KorNLI TSV (sentence1, sentence2, gold_label) or KLUE-NLI JSON
    gives its (premise, entailment hypothesis) pairs; any other TSV with a header gives its ``anchor`` and
    ``positive`` columns, or else its first two columns."""
    if path.endswith(".json"):
        return [(p, h) for p, h, label in read_nli(path)[0] if label == "entailment"]
    header = None
    for _, line in iter_lines(path):
        header = line.split("\t")
        break
    if {"sentence1", "sentence2", "gold_label"} <= set(header):
        return [(p, h) for p, h, label in read_nli(path)[0] if label == "entailment"]
    if len(header) < 2:
        raise DataError(f"{path}:1: expected a header of at least two tab-separated columns (anchor, positive), "
                        f"or KorNLI's sentence1, sentence2, gold_label")
    columns = ["anchor", "positive"] if {"anchor", "positive"} <= set(header) else header[:2]
    pairs = []
    for lineno, (anchor, positive) in read_tsv(path, columns):
        if not anchor.strip() or not positive.strip():
            raise DataError(f"{path}:{lineno}: empty {'anchor' if not anchor.strip() else 'positive'}")
        pairs.append((anchor, positive))
    return pairs


def _normalize(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def default_range_max(range_min, num_negatives, max_positives, filtered):
    """sentence-transformers' range_max when none is given (``filtered``: a margin or max_score is set)."""
    return range_min + (10 * num_negatives if filtered else num_negatives) + max_positives


def mine_from_embeddings(anchors, positives, corpus, embed_queries, embed_corpus, range_min=0, range_max=None,
                         absolute_margin=None, relative_margin=None, max_score=None, min_score=None,
                         num_negatives=1):
    """(triplets [(anchor, positive, negative, positive score, negative score)], counts) for the pairs
    ``zip(anchors, positives)`` against ``corpus`` (None: the positives). ``embed_queries(texts)`` and
    ``embed_corpus(texts)`` return one row per text (any norm: rows are L2-normalised here)."""
    if len(anchors) != len(positives) or not anchors:
        raise ValueError("mining needs a non-empty list of (anchor, positive) pairs")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    corpus = list(dict.fromkeys((list(positives) if corpus is None else list(corpus)) + list(positives)))
    corpus_idx = {t: i for i, t in enumerate(corpus)}
    queries = list(dict.fromkeys(anchors))
    query_idx = {q: i for i, q in enumerate(queries)}
    positive_ids = [[] for _ in queries]
    for a, p in zip(anchors, positives):
        if corpus_idx[p] not in positive_ids[query_idx[a]]:
            positive_ids[query_idx[a]].append(corpus_idx[p])
    max_positives = max(len(p) for p in positive_ids)
    filtered = absolute_margin is not None or relative_margin is not None or max_score is not None
    if range_max is None:
        range_max = default_range_max(range_min, num_negatives, max_positives, filtered)
    if range_min < 0 or range_min >= range_max:
        raise ValueError(f"need 0 <= range_min < range_max, got range_min={range_min}, range_max={range_max}")
    if num_negatives > range_max - range_min:
        raise ValueError(f"cannot mine {num_negatives} negatives from ranks {range_min}..{range_max - 1}")

    query_emb, corpus_emb = _normalize(embed_queries(queries)), _normalize(embed_corpus(corpus))
    candidate_count = range_max + max_positives + 1
    index, _ = build_faiss_index(corpus_emb, "flat")
    k = min(candidate_count, len(corpus))
    scores, ids = index.search(np.ascontiguousarray(query_emb), k)
    scores = scores.astype(np.float64)
    scores[ids < 0] = -np.inf
    counts = {"pairs": len(anchors), "anchors": len(queries), "corpus": len(corpus), "range_min": range_min,
              "range_max": range_max, "candidates": int(np.isfinite(scores).sum())}

    excluded = np.zeros_like(scores, dtype=bool)
    for q, query in enumerate(queries):
        own = corpus_idx.get(query, -2)
        excluded[q] = (ids[q] == own) | np.isin(ids[q], positive_ids[q])
    excluded &= np.isfinite(scores)
    counts["dropped_positive_or_anchor"] = int(excluded.sum())
    scores[excluded] = -np.inf

    # each anchor's lowest positive score (sentence-transformers' "harder positive" for the margins)
    pos_score = {}
    for q in range(len(queries)):
        for c in positive_ids[q]:
            pos_score[(q, c)] = float(query_emb[q] @ corpus_emb[c])
    min_pos = np.array([min(pos_score[(q, c)] for c in positive_ids[q]) for q in range(len(queries))])[:, None]
    filters = []
    if absolute_margin is not None:
        filters.append(("absolute_margin", scores + absolute_margin > min_pos))
    if relative_margin is not None:
        filters.append(("relative_margin", scores > min_pos - np.abs(min_pos) * relative_margin))
    if max_score is not None:
        filters.append(("max_score", scores > max_score))
    if min_score is not None:
        filters.append(("min_score", scores < min_score))
    for name, removed in filters:  # in sentence-transformers' order, each counting what it removes itself
        removed &= np.isfinite(scores)
        counts[f"dropped_{name}"] = int(removed.sum())
        scores[removed] = -np.inf

    triplets, short, outside = [], 0, 0
    for q, query in enumerate(queries):
        order = np.argsort(-scores[q], kind="stable")[:range_max][range_min:][:num_negatives]
        chosen = [(int(ids[q, j]), float(scores[q, j])) for j in order if np.isfinite(scores[q, j])]
        short += len(chosen) < num_negatives
        outside += int(np.isfinite(scores[q]).sum()) - len(chosen)  # survivors outside the rank range / count
        for c in positive_ids[q]:
            for neg, s in chosen:
                triplets.append((query, corpus[c], corpus[neg], pos_score[(q, c)], s))
    counts["dropped_outside_ranks_or_num_negatives"] = outside
    counts["anchors_short_of_negatives"] = short
    counts["triplets"] = len(triplets)
    return triplets, counts


def write_triplets(path, triplets):
    """A headed TSV ``anchor<TAB>positive<TAB>negative`` (one row per triplet), atomically; tabs and
    newlines inside a text are replaced by spaces, as the file has no quoting."""
    clean = lambda s: " ".join(s.replace("\t", " ").splitlines())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\t".join(TRIPLET_HEADER) + "\n")
        for a, p, n, *_ in triplets:
            f.write(f"{clean(a)}\t{clean(p)}\t{clean(n)}\n")
    os.replace(path + ".tmp", path)


def format_counts(counts):
    keys = [k for k in counts if k.startswith("dropped_")]
    return (f"{counts['pairs']:,} pairs ({counts['anchors']:,} distinct anchors), corpus {counts['corpus']:,} texts, "
            f"ranks {counts['range_min']}..{counts['range_max'] - 1}: {counts['candidates']:,} candidates; dropped: "
            + ", ".join(f"{k[8:]} {counts[k]:,}" for k in keys)
            + f"; {counts['triplets']:,} triplets mined, {counts['anchors_short_of_negatives']:,} anchors got fewer "
              f"negatives than asked")


def add_mining_args(parser):
    """evaluation.py's --task mine flags."""
    p = parser
    p.add_argument("--pairs_file", default=None, help="mine: KorNLI TSV / KLUE-NLI JSON (premise, entailment "
                   "hypothesis pairs) or a headed TSV of anchor, positive columns")
    p.add_argument("--output_file", default=None, help="mine: the triplet TSV to write")
    p.add_argument("--range_min", type=int, default=0, help="mine: skip the first N surviving candidates (default: 0)")
    p.add_argument("--range_max", type=int, default=None, help="mine: consider surviving candidates of rank < N "
                   "(default, as sentence-transformers: range_min + num_negatives + max positives per anchor, with "
                   "10 x num_negatives when a margin or --max_score is set)")
    p.add_argument("--absolute_margin", type=float, default=None, help="mine: drop a candidate when score + M > the "
                   "positive's score")
    p.add_argument("--relative_margin", type=float, default=None, help="mine: drop a candidate when score > "
                   "positive - |positive| * M")
    p.add_argument("--max_score", type=float, default=None, help="mine: drop candidates scoring above this")
    p.add_argument("--min_score", type=float, default=None, help="mine: drop candidates scoring below this")
    p.add_argument("--num_negatives", type=int, default=1, help="mine: negatives per (anchor, positive), each its "
                   "own triplet row (default: %(default)s, SimCSE's one hard negative)")


def check_mining_args(parser, args):
    """The --task mine flags no mining can use, refused with parser.error before anything loads: an output
    that is one of the inputs (it would be overwritten), non-finite or negative margins and scores, a
    minimum score above the maximum, an empty rank window."""
    p = parser
    output = os.path.realpath(args.output_file)
    for flag in ("pairs_file", "corpus_file"):
        given = getattr(args, flag)
        if given and os.path.realpath(given) == output:
            p.error(f"--output_file {args.output_file} is the --{flag}: mining would overwrite its input; write "
                    f"the triplets elsewhere")
    for flag in ("absolute_margin", "relative_margin", "max_score", "min_score"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            p.error(f"--{flag} {value}: must be a finite number")
        if value is not None and flag.endswith("margin") and value < 0:
            p.error(f"--{flag} {value}: must not be negative (a candidate scoring above the positive is not a "
                    f"negative)")
    if args.min_score is not None and args.max_score is not None and args.min_score > args.max_score:
        p.error(f"--min_score {args.min_score} is above --max_score {args.max_score}: no candidate can pass")
    if args.range_min < 0:
        p.error(f"--range_min {args.range_min}: must not be negative")
    if args.range_max is not None and args.range_max <= args.range_min:
        p.error(f"--range_max {args.range_max} must be above --range_min {args.range_min}: no rank to mine from")


def run_mine(args, encoder, max_len):
    pairs = read_pairs(args.pairs_file)
    if not pairs:
        raise DataError(f"{args.pairs_file}: no (anchor, positive) pairs")
    corpus = [l.strip() for _, l in iter_lines(args.corpus_file)] if args.corpus_file else None
    if corpus is not None and not corpus:
        raise DataError(f"{args.corpus_file}: no non-blank line to mine negatives from")
    if corpus is None:
        print(f"mine: no --corpus_file, so the corpus is the pairs' {len({p for _, p in pairs}):,} distinct positives "
              f"(as sentence-transformers' mine_hard_negatives without a corpus)")
    embed = lambda prefix: lambda texts: encode(encoder, encoder.tokenizer, [prefix + t for t in texts], max_len,
                                                args.batch_size, args.device)
    try:
        triplets, counts = mine_from_embeddings(
            [a for a, _ in pairs], [p for _, p in pairs], corpus, embed(args.query_prefix or ""),
            embed(args.passage_prefix or ""), args.range_min, args.range_max, args.absolute_margin,
            args.relative_margin, args.max_score, args.min_score, args.num_negatives)
    except ValueError as e:
        sys.exit(f"error: --task mine: {e}")
    write_triplets(args.output_file, triplets)
    print(f"mine: {format_counts(counts)} -> {args.output_file}")

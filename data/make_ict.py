"""Inverse Cloze Task pairs from a sentence-per-line corpus in document order (Lee, Chang, Toutanova 2019):

    python data/make_ict.py --corpus ../shared/data/wiki/wiki_corpus.txt --data_dir ../shared/data --out data/ict

A window of --window consecutive lines is a passage; one of its lines, at a seeded random position, is the
query; the passage is the window without that line (with it, in document order, in --keep_query of the training
pairs, 10 % as in the paper, so that the model still learns that a passage holding the query is relevant;
never in the dev split). Writes, each file atomically:

  OUT/train.tsv          anchor<TAB>positive: the training pairs (KoSimCSE --mode pairs reads it)
  OUT/dev/               a BEIR folder for model selection: queries.jsonl, corpus.jsonl (the dev queries'
                         passages plus other dev windows as distractors), qrels/dev.tsv
  OUT/ict.json           the counts below, the flags and the corpus fingerprint

Deterministic: the same corpus and flags give the same bytes. Train and dev never share a line: the corpus is cut
into blocks of --block lines, a seeded --dev_share of the blocks is dev, and a window lies inside one block.

Article boundaries. The corpus has no article markers, so some windows span two articles (the query is then
partly unrelated to its passage). Estimated here from the corpus itself: the character-bigram Jaccard similarity
of lines d apart, above its level for random pairs, falls with d as the chance that both lines are in one article
falls; its decay over d = 1..10 bounds the per-gap boundary rate from above (within-article similarity also decays
with distance, so the bound is loose). Windows are kept only where every adjacent pair of lines shares at least
--min_cohesion of its character bigrams; a boundary gap passes that filter about as often as two random lines do,
so the share of boundary gaps among the kept ones is at most P(random pair passes) / P(adjacent pair passes) x the
bound. Both estimates, before and after the filter, go into ict.json.

Decontamination: a window is dropped when any of its lines equals an evaluation sentence (KorSTS, KLUE, XNLI,
KorQuAD, AutoRAG, after normalisation) or shares a 20-character run with a KorQuAD context or question or an
AutoRAG page or query (the training guard's passage-level check, KoSimCSE/common/decontaminate.py); counts in
ict.json. Evaluation sets absent from --data_dir cannot be checked and are named there and on stdout.
"""
import argparse
import json
import os
import random
import sys

import numpy as np
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "KoSimCSE"))
from common.checkpoint import file_fingerprint  # noqa: E402
from common.data import DataError, iter_lines  # noqa: E402
from common.decontaminate import (EVALUATION_SETS, MIN_CHARS, NGRAM, NgramIndex, evaluation_index, normalize,  # noqa: E402
                                  read_evaluation_sets)
from common.files import save_atomic, save_json_atomic  # noqa: E402


def read_corpus(path):
    """The corpus as a list of lines in file order; a blank line is kept as "" (a window never spans it)."""
    lines, last = [], 0
    for lineno, line in iter_lines(path):  # bad UTF-8 or a NUL byte: one line naming the file and line
        lines += [""] * (lineno - last - 1)
        lines.append(line.strip())
        last = lineno
    if not any(lines):
        raise DataError(f"{path}: no text")
    return lines


def bigrams(text):
    key = normalize(text)
    return {key[i:i + 2] for i in range(len(key) - 1)}


def jaccard(a, b):
    return len(a & b) / len(a | b) if a and b else 0.0


def gap_cohesion(lines):
    """cohesion[i] = the bigram Jaccard of lines i and i + 1 (0 across a blank line)."""
    out = np.zeros(max(len(lines) - 1, 0), dtype=np.float32)
    previous = bigrams(lines[0]) if lines else set()
    for i in tqdm(range(len(lines) - 1), desc="cohesion", unit_scale=True, mininterval=2, disable=len(lines) < 100_000):
        current = bigrams(lines[i + 1])
        out[i] = jaccard(previous, current)
        previous = current
    return out


def boundary_estimate(lines, cohesion, min_cohesion, window, seed, sample=100_000, max_distance=10):
    """The article-boundary estimates of the module docstring, from the first ``sample`` lines."""
    rng = random.Random(seed)
    n = min(len(lines), sample)
    grams = [bigrams(s) for s in lines[:n]]
    if n < 2 * max_distance + 2:
        return {"lines_sampled": n, "note": "too few lines to estimate"}
    pairs = [(rng.randrange(n), rng.randrange(n)) for _ in range(20_000)]
    random_sims = np.array([jaccard(grams[i], grams[j]) for i, j in pairs])
    base = random_sims.mean()
    excess = [np.mean([jaccard(grams[i], grams[i + d]) for i in range(0, n - d, 3)]) - base
              for d in (1, max_distance)]
    rate = 1 - (excess[1] / excess[0]) ** (1 / (max_distance - 1)) if excess[0] > 0 and excess[1] > 0 else 1.0
    adjacent_pass = float((cohesion[:n - 1] >= min_cohesion).mean())
    random_pass = float((random_sims >= min_cohesion).mean())
    kept_rate = min(1.0, rate * random_pass / adjacent_pass) if adjacent_pass else 1.0
    gaps = window - 1
    return {"lines_sampled": n, "boundary_rate_per_gap_at_most": round(float(rate), 4),
            "windows_crossing_at_most_unfiltered": round(1 - (1 - float(rate)) ** gaps, 4),
            "adjacent_gaps_passing_filter": round(adjacent_pass, 4), "random_pairs_passing_filter": round(random_pass, 4),
            "boundary_rate_per_kept_gap_at_most": round(kept_rate, 4),
            "windows_crossing_at_most_filtered": round(1 - (1 - kept_rate) ** gaps, 4)}


def contaminated_lines(lines, data_dir, log=print):
    """(bool array: line i equals an evaluation sentence or shares a 20-character run with a retrieval set's
    passage or query, {evaluation set: lines}, sets that could not be checked)."""
    texts = read_evaluation_sets(data_dir, log)
    (index, _), runs = evaluation_index(texts), NgramIndex(texts)
    missing = [name for name, (rel, _) in EVALUATION_SETS.items() if not os.path.isfile(os.path.join(data_dir, rel))]
    bad = np.zeros(len(lines), dtype=bool)
    counts = {}
    for i, line in enumerate(tqdm(lines, desc="decontaminate", unit_scale=True, mininterval=2,
                                  disable=len(lines) < 100_000)):
        if not line:
            continue
        key = normalize(line)
        names = set(index.get(key, ())) if len(key) >= MIN_CHARS else set()
        names |= runs.sets_of(key)
        if names:
            bad[i] = True
            for name in names:
                counts[name] = counts.get(name, 0) + 1
    return bad, counts, missing


def candidate_windows(lines, cohesion, bad, window, block, min_cohesion):
    """Start lines of non-overlapping windows (scanned in order) that lie in one block, have no blank or
    contaminated line, and pass the cohesion filter at every gap; also how many were refused for what."""
    starts, refused = [], {"blank_or_block_edge": 0, "contaminated": 0, "cohesion": 0}
    i, n = 0, len(lines)
    while i + window <= n:
        span = range(i, i + window)
        if i // block != (i + window - 1) // block or not all(lines[j] for j in span):
            refused["blank_or_block_edge"] += 1
            i += 1
            continue
        if bad[i:i + window].any():
            refused["contaminated"] += 1
            i += 1
            continue
        if (cohesion[i:i + window - 1] < min_cohesion).any():
            refused["cohesion"] += 1
            i += 1
            continue
        starts.append(i)
        i += window
    return starts, refused


def build(a, log=print):
    lines = read_corpus(a.corpus)
    log(f"{a.corpus}: {sum(1 for s in lines if s):,} lines")
    cohesion = gap_cohesion(lines)
    bad, contamination, missing = contaminated_lines(lines, a.data_dir, log)
    if missing:
        log(f"warning: not checked for contamination (absent from {a.data_dir}): {', '.join(missing)}")
    starts, refused = candidate_windows(lines, cohesion, bad, a.window, a.block, a.min_cohesion)
    rng = random.Random(a.seed)
    blocks = sorted({s // a.block for s in starts})
    dev_blocks = set(rng.sample(blocks, max(1, round(len(blocks) * a.dev_share)))) if blocks else set()
    train = [s for s in starts if s // a.block not in dev_blocks]
    dev = [s for s in starts if s // a.block in dev_blocks]
    rng.shuffle(train)
    rng.shuffle(dev)
    if len(dev) < a.dev_queries + 1 or not train:
        raise SystemExit(f"error: {len(train):,} training and {len(dev):,} dev windows pass the filters; --dev_queries "
                         f"{a.dev_queries} needs more (a longer corpus, a larger --dev_share or a lower --min_cohesion)")
    train = train[:a.train_pairs] if a.train_pairs else train

    def example(start, keep):
        position = rng.randrange(a.window)
        query = lines[start + position]
        passage = [lines[start + j] for j in range(a.window) if keep or j != position]
        return query, " ".join(passage)

    kept = [rng.random() < a.keep_query for _ in train]
    pairs = [example(s, keep) for s, keep in zip(train, kept)]
    queries = dev[:a.dev_queries]
    distractors = dev[a.dev_queries:a.dev_queries + max(0, a.dev_corpus - a.dev_queries)]
    dev_examples = [example(s, False) for s in queries]
    os.makedirs(os.path.join(a.out, "dev", "qrels"), exist_ok=True)

    def lines_of(rows):
        return lambda f: f.write("".join(rows).encode("utf-8"))

    save_atomic(os.path.join(a.out, "train.tsv"), lines_of(["anchor\tpositive\n"] + [
        f"{q}\t{p}\n" for q, p in pairs]))
    save_atomic(os.path.join(a.out, "dev", "queries.jsonl"), lines_of([
        json.dumps({"_id": f"q{s}", "text": q}, ensure_ascii=False) + "\n" for s, (q, _) in zip(queries, dev_examples)]))
    corpus = [(f"d{s}", p) for s, (_, p) in zip(queries, dev_examples)]
    corpus += [(f"d{s}", example(s, False)[1]) for s in distractors]  # one line out, as the positives
    save_atomic(os.path.join(a.out, "dev", "corpus.jsonl"), lines_of([
        json.dumps({"_id": d, "title": "", "text": t}, ensure_ascii=False) + "\n" for d, t in sorted(corpus)]))
    save_atomic(os.path.join(a.out, "dev", "qrels", "dev.tsv"), lines_of(["query-id\tcorpus-id\tscore\n"] + [
        f"q{s}\td{s}\t1\n" for s in queries]))
    stats = {"corpus": os.path.abspath(a.corpus), "corpus_fingerprint": file_fingerprint(a.corpus),
             "flags": {k: v for k, v in vars(a).items() if k not in ("corpus", "out", "data_dir")},
             "lines": len(lines), "windows_kept": len(starts), "windows_refused": refused,
             "train_pairs": len(pairs), "train_pairs_with_query_kept": sum(kept),
             "dev_queries": len(queries), "dev_corpus": len(corpus),
             "contaminated_lines": int(bad.sum()), "contaminated_lines_by_set": dict(sorted(contamination.items())),
             "contamination_check": {"ngram_characters": NGRAM, "not_checked": missing},
             "article_boundaries": boundary_estimate(lines, cohesion, a.min_cohesion, a.window, a.seed)}
    save_json_atomic(os.path.join(a.out, "ict.json"), stats)
    log(json.dumps({k: stats[k] for k in ("windows_kept", "windows_refused", "train_pairs", "dev_queries",
                                          "dev_corpus", "contaminated_lines", "contaminated_lines_by_set",
                                          "article_boundaries")}, ensure_ascii=False, indent=1))
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="sentence-per-line text in document order")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"), help="the evaluation sets to decontaminate against")
    p.add_argument("--out", default=os.path.join(ROOT, "data", "ict"))
    p.add_argument("--window", type=int, default=4, help="lines per window (the query's line included)")
    p.add_argument("--keep_query", type=float, default=0.1, help="share of training passages that keep the query")
    p.add_argument("--min_cohesion", type=float, default=0.02,
                   help="least character-bigram Jaccard of every adjacent pair of lines in a window")
    p.add_argument("--train_pairs", type=int, default=0, help="at most this many training pairs (0: all windows)")
    p.add_argument("--dev_queries", type=int, default=1000)
    p.add_argument("--dev_corpus", type=int, default=4000, help="dev passages: the queries' own plus distractors")
    p.add_argument("--dev_share", type=float, default=0.05, help="share of the blocks that are dev")
    p.add_argument("--block", type=int, default=1000, help="lines per block of the train/dev split")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.window < 2:
        p.error(f"--window {a.window}: a window needs the query line and at least one more")
    for name in ("keep_query", "min_cohesion", "dev_share"):
        value = getattr(a, name)
        if not 0.0 <= value <= 1.0:
            p.error(f"--{name} {value}: must be between 0 and 1")
    for name in ("dev_queries", "dev_corpus", "block"):
        if getattr(a, name) < 1:
            p.error(f"--{name} {getattr(a, name)}: must be positive")
    if a.train_pairs < 0:
        p.error(f"--train_pairs {a.train_pairs}: must not be negative")
    if a.block < a.window:
        p.error(f"--block {a.block} is shorter than --window {a.window}")
    try:
        build(a)
    except DataError as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    except OSError as e:  # a full disk or a read-only --out: the files written before are whole (atomic writes)
        sys.exit(f"error: cannot write {e.filename or a.out}: {e.strerror or e}")


if __name__ == "__main__":
    main()

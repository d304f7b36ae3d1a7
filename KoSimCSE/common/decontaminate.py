"""The decontamination guard: no training sentence may be an evaluation sentence.

Before a run trains, every sentence of its training files is compared with every evaluation set found
under --data_dir (EVALUATION_SETS: KorSTS dev/test, KLUE-STS dev, KLUE-NLI dev, XNLI test -- the split
MTEB's KorNLI task scores on -- and the queries and passages of the two retrieval sets). Two sentences
match when they are equal after ``normalize``: Unicode NFKC, case folded, and every character that is
not a letter or a digit (whitespace, punctuation, symbols) removed, so "한 남자가 기타를 친다." and
"한 남자가  기타를 친다" match. A sentence that normalises to fewer than MIN_CHARS characters is never
counted (one word such as "네" is no leak).

Passage level: the retrieval sets' passages are whole Wikipedia paragraphs (KorQuAD) and document pages
(AutoRAG), which a training sentence taken from the same source contains without equalling. So a training
sentence also counts when it shares a run of NGRAM normalised characters with a KorQuAD context or question or
an AutoRAG page or query (the "ngram" count of those sets). NGRAM = 20 (about six Korean words): on the first
300k wiki sentences 1,631 share a 13-character run with the two sets, 864 a 20-character run, 719 a 30-character
run; KorSTS train shares no 20-character run with them, KLUE-NLI train 3 distinct sentences.

--decontaminate decides what a run does with the overlap it reports (per evaluation set, printed and
written into training.json and the model card):
  warn  (default) train on the data as given. Published recipes stay reproducible: KorNLI's SNLI part and
        KorSTS both come from Flickr30k captions and share sentences, and BM-K's rows trained on them.
  drop  train without the rows that hold a matching sentence: filtered copies of the training files are
        written to <output_dir>/decontaminated/ and used instead (their paths are in training.json).
  fail  stop with one line naming the evaluation set, before anything is loaded.
"""
import csv
import json
import os
import re
import unicodedata

from .data import PAIR_HEADERS, DataError, iter_lines, not_a_file, read_nli, read_pairs, read_sts, resolve_path
from .retrieval import read_beir_pairs

MODES = ("warn", "drop", "fail")
MIN_CHARS = 5
NGRAM = 20  # characters of normalised text: the passage-level check (see the module docstring)
PASSAGE_SETS = ("KorQuAD dev", "AutoRAG")  # the sets checked at the passage level
# name -> (path under --data_dir, kind); a set whose file is absent is skipped (and said so).
EVALUATION_SETS = {
    "KorSTS dev": ("KorSTS/sts-dev.tsv", "sts"),
    "KorSTS test": ("KorSTS/sts-test.tsv", "sts"),
    "KLUE-STS dev": ("KLUE-STS/klue-sts-v1.1_dev.json", "sts"),
    "KLUE-NLI dev": ("KLUE-NLI/klue-nli-v1.1_dev.json", "nli"),
    "XNLI test": ("KorNLI/xnli.test.ko.tsv", "nli"),
    "KorQuAD dev": ("KorQuAD/KorQuAD_v1.0_dev.json", "korquad"),
    "AutoRAG": ("AutoRAG/qa_v4.parquet", "autorag"),
}
_NOT_ALNUM = re.compile(r"[\W_]+")


def normalize(sentence):
    """NFKC, case folded, letters and digits only (see the module docstring)."""
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", sentence).casefold())


def _korquad(path):
    """The contexts and questions of a KorQuAD 1.0 file; a file of another shape is a DataError."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)["data"]
        texts = [text for article in data for paragraph in article["paragraphs"]
                 for text in [paragraph["context"]] + [qa["question"] for qa in paragraph["qas"]]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a KorQuAD 1.0 file ({type(e).__name__}: {e}; expected {{\"data\": [{{"
                        f"\"paragraphs\": [{{\"context\", \"qas\": [{{\"question\"}}]}}]}}]}})") from None
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{path}: not a KorQuAD 1.0 file (a context or question is not a string)")
    return texts


def _autorag(path):
    import pyarrow.parquet as pq
    yield from pq.read_table(path, columns=["query"]).column("query").to_pylist()
    corpus = os.path.join(os.path.dirname(path), "ocr_corpus_v3.parquet")
    if os.path.isfile(corpus):
        yield from pq.read_table(corpus, columns=["contents"]).column("contents").to_pylist()


def sentences(path, kind):
    """The sentences of a file: both sides of every STS or NLI row, each line of a text file, the
    questions and paragraphs of KorQuAD, the queries and pages of AutoRAG."""
    if kind == "sts":
        return [s for a, b, _ in read_sts(path) for s in (a, b)]
    if kind == "nli":
        return [s for a, b, _ in read_nli(path)[0] for s in (a, b)]
    if kind == "pairs":
        return [s for row in read_pairs(path) for s in row]
    if kind == "beir":
        return [s for row in read_beir_pairs(path) for s in row]
    if kind == "korquad":
        return list(_korquad(path))
    if kind == "autorag":
        return list(_autorag(path))
    return [line.strip() for _, line in iter_lines(path) if line.strip()]


def file_kind(path):
    """sts, nli or text, from the file itself: a TSV/CSV header naming ``score`` or ``gold_label``, a JSON
    list whose items have ``labels`` (KLUE-STS) or ``gold_label`` (KLUE-NLI); anything else is text."""
    with open(path, "rb") as f:  # bad bytes are the readers' to report, with their line
        head = f.read(4096).decode("utf-8", errors="replace")
    if path.endswith(".json"):
        return "nli" if '"gold_label"' in head else "sts" if '"labels"' in head else "text"
    header = head.lstrip("\ufeff").split("\n", 1)[0]
    if "gold_label" in header:
        return "nli"
    if header.rstrip("\r").split("\t") in PAIR_HEADERS:
        return "pairs"  # data/make_ict.py, evaluation.py --task mine
    return "sts" if "score" in header or "label" in header and path.endswith(".csv") else "text"


def read_evaluation_sets(data_dir, log=print):
    """{evaluation set name: its sentences} of every set present under data_dir, each file read once; the
    sets that are absent are named in one line (they cannot be checked)."""
    found = {}
    absent = [name for name, (rel, _) in EVALUATION_SETS.items() if not os.path.isfile(os.path.join(data_dir, rel))]
    if absent:
        log(f"decontamination: not checked, absent under --data_dir {data_dir}: {', '.join(absent)}")
    for name, (rel, kind) in EVALUATION_SETS.items():
        path = os.path.join(data_dir, rel)
        if name in absent:
            continue
        try:
            found[name] = sentences(path, kind)
        except ImportError as e:  # AutoRAG needs pyarrow
            log(f"decontamination: {name} skipped ({e})")
    return found


def evaluation_index(texts):
    """({normalised sentence: [evaluation set names]}, {sentence as given: {set names}}) of ``texts``
    (read_evaluation_sets)."""
    index, exact = {}, {}
    for name, found in texts.items():
        for s in found:
            exact.setdefault(s, set()).add(name)
            key = normalize(s)
            if len(key) >= MIN_CHARS and name not in index.setdefault(key, []):
                index[key].append(name)
    return index, exact


class NgramIndex:
    """Every NGRAM-character run of the normalised passages and queries of the retrieval sets (PASSAGE_SETS) in
    ``texts`` (read_evaluation_sets), with the sets it comes from. ``sets_of(key)``: the sets sharing a run with
    the normalised text ``key`` (empty when it is shorter than NGRAM or shares none)."""

    def __init__(self, texts, n=NGRAM):
        self.n, self.runs = n, {}
        for name in PASSAGE_SETS:
            for text in texts.get(name, ()):
                key = normalize(text)
                for i in range(len(key) - n + 1):
                    self.runs.setdefault(key[i:i + n], set()).add(name)

    def sets_of(self, key):
        found = set()
        for i in range(len(key) - self.n + 1):
            names = self.runs.get(key[i:i + self.n])
            if names:
                found |= names
        return found


def overlap_report(train_files, data_dir, log=print):
    """(report, contaminated keys) for ``train_files`` [(path, kind)]: report = {evaluation set: {"exact":
    training sentences equal as given, "normalized": equal after normalize, "ngram": sharing an NGRAM-character
    run with a passage or query of the set (retrieval sets only, sentences not already counted as equal),
    "examples": up to 3}}."""
    texts = read_evaluation_sets(data_dir, log)
    (index, exact_index), runs = evaluation_index(texts), NgramIndex(texts)
    report = {name: {"exact": 0, "normalized": 0, "ngram": 0, "examples": []} for name in EVALUATION_SETS
              if os.path.isfile(os.path.join(data_dir, EVALUATION_SETS[name][0]))}
    contaminated, seen = set(), set()
    for path, kind in train_files:
        for s in sentences(path, kind):
            key = normalize(s)
            if key in seen:
                continue
            seen.add(key)
            if key in index:
                contaminated.add(key)
                for name in index[key]:
                    entry = report[name]
                    entry["normalized"] += 1
                    entry["exact"] += name in exact_index.get(s, ())
                    if len(entry["examples"]) < 3:
                        entry["examples"].append(s)
                continue
            names = runs.sets_of(key) if runs.runs else ()
            if names:
                contaminated.add(key)
                for name in names:
                    entry = report[name]
                    entry["ngram"] += 1
                    if len(entry["examples"]) < 3:
                        entry["examples"].append(s)
    return report, contaminated


def _filtered_copy(path, kind, contaminated, out_dir):
    """Write ``path`` without the rows holding a contaminated sentence to out_dir; (new path, rows dropped)."""
    bad = lambda *texts: any(normalize(t) in contaminated for t in texts)  # noqa: E731
    out = os.path.join(out_dir, os.path.basename(os.path.normpath(path)))
    dropped = 0
    if kind == "beir":  # a BEIR folder's training pairs, kept as an anchor/positive TSV
        pairs = read_beir_pairs(path)
        kept = [(q, p) for q, p in pairs if not bad(q, p)]
        dropped, out, left = len(pairs) - len(kept), out + ".tsv", len(kept)
        text = "anchor\tpositive\n" + "".join(f"{' '.join(q.split())}\t{' '.join(p.split())}\n" for q, p in kept)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8-sig") as f:
            items = json.load(f)
        keys = ("premise", "hypothesis") if kind == "nli" else ("sentence1", "sentence2")
        kept = [it for it in items if not bad(*(str(it.get(k, "")) for k in keys))]
        dropped, left = len(items) - len(kept), len(kept)
        text = json.dumps(kept, ensure_ascii=False)
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if not bad(r.get("sentence1", ""), r.get("sentence2", ""))]
        dropped, left = len(rows) - len(kept), len(kept)
        import io
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()) if rows else ["sentence1", "sentence2"])
        writer.writeheader()
        writer.writerows(kept)
        text = buffer.getvalue()
    else:  # TSV with a header (KorNLI, KorSTS) or one sentence per line: filter line by line
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if kind == "text":
            kept = [line for line in lines if not (line.strip() and bad(line.strip()))]
        else:
            header = lines[0].split("\t")
            cols = [header.index(c) for c in ("sentence1", "sentence2", "anchor", "positive", "negative")
                    if c in header]
            kept = lines[:1] + [line for line in lines[1:]
                                if not (line and bad(*(line.split("\t")[c] for c in cols
                                                       if c < len(line.split("\t")))))]
        dropped = len(lines) - len(kept)
        left = sum(1 for line in (kept if kind == "text" else kept[1:]) if line.strip())
        text = "\n".join(kept)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    return out, dropped, left


# The flag that names the files of each training source (the names of the folders' build_source).
SOURCE_FLAGS = {"sup": "train_file", "unsup": "train_file", "wiki": "train_file", "nli": "nli_file",
                "sts": "sts_file", "pairs": "train_file", "anchor": "anchor_file"}


def guard(args, source_names, rank=0, log=print):
    """Compare the training files of ``source_names`` (the run's training sources, see SOURCE_FLAGS) with
    the evaluation sets (see the module docstring) and act by --decontaminate. Sets
    ``args.decontamination`` (the report, for training.json); with drop, rank 0 writes filtered copies and
    every rank points the training flags at them. Raises SystemExit (one line) with fail."""
    flags = list(dict.fromkeys(SOURCE_FLAGS[n] for n in source_names if n in SOURCE_FLAGS))
    files = {}
    for flag in flags:
        value = getattr(args, flag, None)
        for name in ([value] if isinstance(value, str) else value or []):
            path = resolve_path(name, args.data_dir)
            if os.path.isdir(path) and os.path.isfile(os.path.join(path, "corpus.jsonl")):
                files[path] = "beir"  # pairs training from a BEIR folder
                continue
            if not os.path.isfile(path):
                raise not_a_file(path, flag=flag)
            files[path] = file_kind(path)
    report, contaminated = overlap_report(list(files.items()), args.data_dir, log if rank == 0 else lambda _: None)
    hits = {name: r for name, r in report.items() if r["normalized"] or r["ngram"]}
    args.decontamination = {"mode": args.decontaminate, "normalization": "NFKC, casefold, letters and digits only",
                            "evaluation_sets": report}
    if rank == 0:
        checked = ", ".join(report) or "none found under --data_dir"
        if not hits:
            log(f"decontamination: no training sentence occurs in the evaluation sets ({checked})")
        for name, r in hits.items():
            if r["normalized"]:
                log(f"decontamination: {r['normalized']:,} training sentence(s) occur in {name} ({r['exact']:,} "
                    f"exactly, the rest after normalisation), e.g. {r['examples'][0]!r}")
            if r["ngram"]:
                log(f"decontamination: {r['ngram']:,} training sentence(s) share a {NGRAM}-character run with a passage "
                    f"or query of {name}, e.g. {r['examples'][-1]!r}")
    if hits and args.decontaminate == "fail":
        name = next(iter(hits))
        r = hits[name]
        what = (f"{r['normalized']:,} training sentence(s) occur in" if r["normalized"] else
                f"{r['ngram']:,} training sentence(s) share a {NGRAM}-character run with a passage or query of")
        raise SystemExit(f"error: {what} the evaluation set {name} (e.g. {r['examples'][0]!r}); --decontaminate drop "
                         f"trains without them, warn trains anyway")
    if hits and args.decontaminate == "drop":
        out_dir = os.path.join(args.output_dir, "decontaminated")
        os.makedirs(out_dir, exist_ok=True)
        renamed = {}
        for path, kind in files.items():
            new, dropped, left = _filtered_copy(path, kind, contaminated, out_dir) if rank == 0 else (
                os.path.join(out_dir, os.path.basename(path)), None, None)
            renamed[path] = new
            if rank == 0:
                log(f"decontamination: {dropped:,} row(s) dropped from {path} -> {new}")
            if rank == 0 and left == 0:
                raise SystemExit(f"error: --decontaminate drop removed every row of {path} (each shares a sentence "
                                 f"or a {NGRAM}-character run with an evaluation set): nothing is left to train on; "
                                 f"train on other data, or --decontaminate warn to train on it as it is")
        for flag in flags:
            value = getattr(args, flag, None)
            if isinstance(value, str):
                setattr(args, flag, renamed[resolve_path(value, args.data_dir)])
            elif value:
                setattr(args, flag, [renamed[resolve_path(v, args.data_dir)] for v in value])
        args.decontamination["dropped_to"] = out_dir
    return report

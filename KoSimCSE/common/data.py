"""Reading the data: one-line errors, the KorNLI / KorSTS / KLUE readers, sentence files, tokenised
texts, the batch plan and the collators every training script uses."""
import csv
import json
import os
import random

import numpy as np
import torch
from tqdm.auto import tqdm

# The repository's data folder (KoSimCSE/common/ -> KoSimCSE/ -> the repository root).
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")


NLI_LABELS = ("entailment", "neutral", "contradiction")


STS_SPLITS = {
    "korsts-train": "KorSTS/sts-train.tsv",
    "korsts-dev": "KorSTS/sts-dev.tsv",
    "korsts-test": "KorSTS/sts-test.tsv",
    "klue-sts-train": "KLUE-STS/klue_sts_train.csv",
    "klue-sts-dev": "KLUE-STS/klue-sts-v1.1_dev.json",
}


class DataError(ValueError):
    """An input file is missing or malformed; the message says which file, which line, what."""


def resolve_path(path, data_dir):
    """``path`` as given if it exists, else relative to ``data_dir``; named split aliases allowed."""
    path = STS_SPLITS.get(path, path)
    if os.path.exists(path) or os.path.isabs(path):
        return path
    return os.path.join(data_dir, path)


def not_a_file(path, hint="", flag=None):
    """The DataError for a ``path`` that is not a readable file: a folder is named as one, anything else is
    "file not found" followed by ``hint``; ``flag``, the flag that gave the path, is named in either case."""
    named = f" (--{flag})" if flag else ""
    if os.path.isdir(path):
        return DataError(f"{path}: is a directory, not a file{named}")
    return DataError(f"{path}: file not found{named or hint}")


def iter_lines(path):
    """Yield (line_number, text) for the non-blank lines of a UTF-8 file, newline stripped; a UTF-8 byte
    order mark at its start (Excel's "CSV UTF-8" export writes one) is dropped."""
    if not os.path.isfile(path):
        raise not_a_file(path, " (fetch the data with `bash data/download.sh` or point --data_dir at a folder "
                               "that has it)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}: "
                                f"{raw[max(0, e.start - 4):e.start + 4]!r})") from None
            line = line.rstrip("\r\n")
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if "\x00" in line:
                raise DataError(f"{path}:{lineno}: NUL byte in the text (a binary or corrupted file)")
            if line.strip():
                yield lineno, line


def read_tsv(path, columns):
    """Yield (line_number, [values of ``columns``]) from a headed TSV, with quoting off."""
    lines = iter_lines(path)
    for _, header_line in lines:
        break
    else:
        raise DataError(f"{path}: file is empty")
    header = header_line.split("\t")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}:1: header {header} lacks column(s) {missing}")
    index = [header.index(c) for c in columns]
    for lineno, line in lines:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                            f"({', '.join(header)}), found {len(fields)}")
        yield lineno, [fields[i] for i in index]


def parse_score(value, where):
    try:
        score = float(value)
    except ValueError:
        raise DataError(f"{where}: score {value!r} is not a number") from None
    if not 0.0 <= score <= 5.0:
        raise DataError(f"{where}: score {value!r} is outside 0-5")
    return score


def sentence(text, where):
    """``text`` if it is a usable sentence; DataError naming ``where`` if it is not a string (a JSON null),
    empty or only whitespace, or holds a NUL byte: such a row would be encoded as [CLS][SEP] and scored."""
    if not isinstance(text, str):
        raise DataError(f"{where}: a sentence is {text!r}, not text")
    if not text.strip() or "\x00" in text:
        raise DataError(f"{where}: empty sentence" if not text.strip() else f"{where}: NUL byte in a sentence")
    return text


def read_sts(path):
    """(sentence1, sentence2, score in 0-5) triples from KorSTS TSV, KLUE-STS CSV or KLUE-STS JSON.

    KLUE-STS JSON gives ``labels["real-label"]`` (the unrounded annotator mean), which is what the
    KLUE-STS CSV export holds too, so both files of the same split score identically.
    """
    rows = []
    if path.endswith(".json"):
        for i, item in enumerate(_read_json_list(path)):
            where = f"{path}: item {i} (guid {item.get('guid', '?')})"
            try:
                s1, s2, label = item["sentence1"], item["sentence2"], item["labels"]["real-label"]
            except (KeyError, TypeError) as e:
                raise DataError(f"{where}: missing field {e}") from None
            rows.append((sentence(s1, where), sentence(s2, where), parse_score(str(label), where)))
    elif path.endswith(".csv"):
        list(iter_lines(path))  # same missing/empty/UTF-8 checks as the TSV readers
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a byte order mark is dropped
            reader = csv.DictReader(f)
            missing = {"sentence1", "sentence2", "label"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}:1: header {reader.fieldnames} lacks column(s) {sorted(missing)}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or None in row.values():
                    raise DataError(f"{where}: expected {len(reader.fieldnames)} comma-separated fields")
                rows.append((sentence(row["sentence1"], where), sentence(row["sentence2"], where),
                             parse_score(row["label"], where)))
    else:
        for lineno, (score, s1, s2) in read_tsv(path, ["score", "sentence1", "sentence2"]):
            where = f"{path}:{lineno}"
            rows.append((sentence(s1, where), sentence(s2, where), parse_score(score, where)))
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows


def _read_json_list(path):
    list(iter_lines(path))  # missing / empty / UTF-8 checks with line numbers
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark is dropped
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of examples, found {type(data).__name__}")
    return data


def read_nli(path):
    """(premise, hypothesis, label) rows from a KorNLI TSV or a KLUE-NLI JSON.

    Rows whose gold label is ``-`` (SNLI's "annotators did not agree") carry no label and are
    skipped; their count is returned so callers can report it. Any other unknown label is an error.
    """
    rows, unlabeled = [], 0
    if path.endswith(".json"):
        items = ((f"{path}: item {i}", item) for i, item in enumerate(_read_json_list(path)))
        fields = (("premise", "hypothesis", "gold_label"))
        records = []
        for where, item in items:
            try:
                records.append((where, [item[k] for k in fields]))
            except (KeyError, TypeError) as e:
                raise DataError(f"{where}: missing field {e}") from None
    else:
        records = ((f"{path}:{n}", r) for n, r in read_tsv(path, ["sentence1", "sentence2", "gold_label"]))
    for where, (premise, hypothesis, label) in records:
        if not isinstance(label, str):
            raise DataError(f"{where}: gold_label is {label!r}, not a label")
        label = label.strip()
        if label == "-":
            unlabeled += 1
            continue
        if label not in NLI_LABELS:
            raise DataError(f"{where}: unknown NLI label {label!r} (expected one of {', '.join(NLI_LABELS)})")
        rows.append((sentence(premise, where), sentence(hypothesis, where), label))
    return rows, unlabeled


def read_triplets(path):
    """(anchor, positive, negative) rows of a TSV whose header is exactly ``anchor<TAB>positive<TAB>negative``
    (what evaluation.py --task mine writes, one row per mined negative), every row kept; None for any other
    file, which is then read as NLI."""
    if path.endswith(".json"):
        return None
    for _, line in iter_lines(path):
        if line.split("\t") != ["anchor", "positive", "negative"]:
            return None
        break
    triplets = []
    for lineno, row in read_tsv(path, ["anchor", "positive", "negative"]):
        if not all(s.strip() for s in row):
            raise DataError(f"{path}:{lineno}: empty text in an anchor/positive/negative row")
        triplets.append(tuple(row))
    return triplets


PAIR_HEADERS = (["anchor", "positive"], ["anchor", "positive", "negative"])


def read_pairs(path):
    """(anchor, positive) or (anchor, positive, negative) rows of a TSV whose header is ``anchor<TAB>positive``
    (data/make_ict.py) or ``anchor<TAB>positive<TAB>negative`` (evaluation.py --task mine), with quoting off.
    A row with another number of fields or an empty text is refused with its line."""
    lines = iter_lines(path)
    for lineno, header in lines:
        header = header.split("\t")
        if header not in PAIR_HEADERS:
            raise DataError(f"{path}:{lineno}: the header must be anchor<TAB>positive or "
                            f"anchor<TAB>positive<TAB>negative, not {chr(9).join(header)!r}")
        break
    else:
        raise DataError(f"{path}: file is empty")
    rows = []
    for lineno, line in lines:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{lineno}: {len(fields)} tab-separated field(s), the header has {len(header)} "
                            f"({', '.join(header)})")
        for name, text in zip(header, fields):
            if not text.strip():
                raise DataError(f"{path}:{lineno}: the {name} is empty")
        rows.append(tuple(fields))
    if not rows:
        raise DataError(f"{path}: a header and no pairs")
    return rows


def read_sentences(path, max_samples=None, seed=42, log=print):
    """One sentence per line (blank lines ignored); optionally a seeded random subsample."""
    sentences = [line.strip() for _, line in iter_lines(path)]
    if max_samples is not None and max_samples < len(sentences):
        keep = sorted(random.Random(seed).sample(range(len(sentences)), max_samples))
        log(f"{path}: using {max_samples:,} of {len(sentences):,} sentences (--max_train_samples)")
        sentences = [sentences[i] for i in keep]
    else:
        log(f"{path}: {len(sentences):,} sentences")
    return sentences


class TokenizedTexts:
    """Token ids of many texts, tokenised once, kept in one flat int32 array plus offsets.

    A million wiki sentences take ~100 MB this way instead of several GB as padded tensors or
    Python lists. Texts longer than ``max_len`` tokens are truncated (special tokens kept) and
    counted in ``num_truncated``. ``prefix`` (a prompt such as e5's "query: ") goes before every text and
    counts towards ``max_len``.
    """

    def __init__(self, tokenizer, texts, max_len, desc="tokenize", chunk_size=10_000, prefix=""):
        if max_len <= tokenizer.num_special_tokens_to_add(pair=False):
            raise ValueError(f"--max_len {max_len} leaves no room for tokens besides the special ones")
        pieces, self.num_truncated = [], 0
        for start in tqdm(range(0, len(texts), chunk_size), desc=desc, unit_scale=chunk_size,
                          disable=desc is None or len(texts) <= chunk_size):
            # Overflow rows mark the texts that truncation cut; only each text's first row is kept.
            enc = tokenizer([prefix + t for t in texts[start:start + chunk_size]], truncation=True, max_length=max_len,
                            return_overflowing_tokens=True, return_attention_mask=False,
                            return_token_type_ids=False)
            rows = {}
            for ids, sample in zip(enc["input_ids"], enc["overflow_to_sample_mapping"]):
                rows.setdefault(sample, []).append(ids)
            self.num_truncated += sum(len(r) > 1 for r in rows.values())
            pieces += [np.asarray(rows[i][0], dtype=np.int32) for i in range(len(rows))]
        self.ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        self.offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=self.offsets[1:])

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self):
        return np.diff(self.offsets)


def pad_batch(sequences, pad_id):
    """Right-pad a list of 1-D int arrays to the longest one: input_ids and attention_mask."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class BatchPlan:
    """The batches of a run, fixed by (seed, epoch): epoch e visits the examples in the order
    ``torch.randperm(n)`` seeded with seed + e, cut into global batches of ``global_batch`` (a last
    partial batch is dropped unless drop_last=False); under torch.distributed, rank r of W takes
    the r-th slice of every global batch. Any step can be the starting point, which is what makes
    ``--resume`` exact."""

    def __init__(self, num_examples, global_batch, seed, rank=0, world_size=1, drop_last=True):
        self.requested = global_batch  # more than the examples: one batch of all of them (said by describe_stage)
        global_batch = min(global_batch, num_examples)
        if global_batch % world_size:
            raise ValueError(f"--batch_size {global_batch} is not divisible by the {world_size} processes")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.rank, self.local_batch = rank, global_batch // world_size
        # drop_last=False keeps a last partial batch, as a DataLoader does, in a single process only:
        # under torch.distributed every rank must take an equal slice, so it is dropped there.
        self.keep_partial = not drop_last and world_size == 1 and num_examples % global_batch > 0

    def __len__(self):
        return self.num_examples // self.global_batch + self.keep_partial

    def batches(self, epoch, start_step=0):
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        for step in range(start_step, len(self)):
            first = step * self.global_batch + self.rank * self.local_batch
            yield order[first:first + self.local_batch].tolist()


class ColumnCollator:
    """Stacks a batch of B k-tuples column by column into one (k*B, L) tensor, padded dynamically,
    so the whole batch is encoded in a single forward pass: rows [0:B] are column 0, and so on."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, batch):
        return pad_batch([seq for column in zip(*batch) for seq in column], self.pad_id)


DUPLICATE_LIMIT = 0.5  # the share of repeated training examples above which a run is refused


def check_duplicates(examples, what, log=print, limit=DUPLICATE_LIMIT):
    """Say how many training ``examples`` (a sentence, or a row as a tuple) repeat an earlier one, and refuse
    (DataError) when more than ``limit`` of them do: in contrastive training every copy of an anchor in its
    batch is a false negative, and a file of a few sentences copied many times trains on almost nothing."""
    repeats = len(examples) - len(set(examples))
    if not repeats:
        return
    share = repeats / len(examples)
    message = f"{what}: {repeats:,} of {len(examples):,} training examples ({share:.1%}) repeat an earlier one"
    if share > limit:
        raise DataError(f"{message}, above the {limit:.0%} this toolkit trains on; deduplicate the data")
    log(message)


def load_sts_pairs(path, log=print):
    """(sentence1, sentence2, score / 5) rows: the regression target is a similarity in 0-1."""
    pairs = [(s1, s2, score / 5.0) for s1, s2, score in read_sts(path)]
    log(f"{path}: {len(pairs):,} STS pairs")
    check_duplicates([(s1, s2) for s1, s2, _ in pairs], path, log)
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """Sentence pairs tokenised once: item i is (ids of sentence1, ids of sentence2, target); ``prefix`` goes
    before both sentences (a symmetric task: e5's "query: " on both sides)."""

    def __init__(self, tokenizer, pairs, max_len, desc="tokenize pairs", prefix=""):
        self.tokenized = TokenizedTexts(tokenizer, [s for a, b, _ in pairs for s in (a, b)], max_len, desc=desc,
                                        prefix=prefix)
        self.targets = [target for _, _, target in pairs]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.tokenized[2 * i], self.tokenized[2 * i + 1], self.targets[i]


class PairCollator:
    """B pairs -> one (2B, L) batch (rows [0:B] the first sentences, [B:2B] the second ones), padded
    dynamically, plus ``labels``: class ids (long) for NLI or 0-1 similarities (float) for STS."""

    def __init__(self, pad_id, label_dtype):
        self.pad_id, self.label_dtype = pad_id, label_dtype

    def __call__(self, batch):
        firsts, seconds, targets = zip(*batch)
        out = pad_batch(list(firsts) + list(seconds), self.pad_id)
        out["labels"] = torch.tensor(targets, dtype=self.label_dtype)
        return out

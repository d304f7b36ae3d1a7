"""Readers, the tokenised training set and the masking of KoDiffCSE.

Files (see data/README.md): wiki sentences, one per line, to train on; KorSTS TSVs (tab-separated with a
header row and **no quoting**: many fields start with a raw ``"`` that a CSV reader would swallow) and
KLUE-STS (the official dev JSON or the CSV export) for the dev and test scores. Every reader stops on a
malformed row with a ``DataError`` naming the file, the line and the problem; nothing is dropped or
altered silently.

The masking that feeds the generator comes in the two forms of the originals: DiffCSE's dynamic BERT
masking (``mask_tokens``, per batch) and BM-K's static [SEP] masking (``static_sep_masks``, once at load
time).
"""
import csv
import json
import os
import random
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

STS_SPLITS = {
    "korsts-train": "KorSTS/sts-train.tsv",
    "korsts-dev": "KorSTS/sts-dev.tsv",
    "korsts-test": "KorSTS/sts-test.tsv",
    "klue-sts-train": "KLUE-STS/klue_sts_train.csv",
    "klue-sts-dev": "KLUE-STS/klue-sts-v1.1_dev.json",
}


# Copied from KoSimCSE/dataloader.py:DataError
class DataError(ValueError):
    """An input file is missing or malformed; the message says which file, which line, what."""


# Copied from KoSimCSE/dataloader.py:resolve_path
def resolve_path(path, data_dir):
    """``path`` as given if it exists, else relative to ``data_dir``; named split aliases allowed."""
    path = STS_SPLITS.get(path, path)
    if os.path.exists(path) or os.path.isabs(path):
        return path
    return os.path.join(data_dir, path)


# Copied from KoSimCSE/dataloader.py:iter_lines
def iter_lines(path):
    """Yield (line_number, text) for the non-blank lines of a UTF-8 file, newline stripped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (fetch the data with `bash data/download.sh` "
                        f"or point --data_dir at a folder that has it)")
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
            if line.strip():
                yield lineno, line


# Copied from KoSimCSE/dataloader.py:read_tsv
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


# Copied from KoSimCSE/dataloader.py:parse_score
def parse_score(value, where):
    try:
        score = float(value)
    except ValueError:
        raise DataError(f"{where}: score {value!r} is not a number") from None
    if not 0.0 <= score <= 5.0:
        raise DataError(f"{where}: score {value!r} is outside 0-5")
    return score


# Copied from KoSimCSE/dataloader.py:read_sts
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
            rows.append((s1, s2, parse_score(str(label), where)))
    elif path.endswith(".csv"):
        list(iter_lines(path))  # same missing/empty/UTF-8 checks as the TSV readers
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"sentence1", "sentence2", "label"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}:1: header {reader.fieldnames} lacks column(s) {sorted(missing)}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or None in row.values():
                    raise DataError(f"{where}: expected {len(reader.fieldnames)} comma-separated fields")
                rows.append((row["sentence1"], row["sentence2"], parse_score(row["label"], where)))
    else:
        for lineno, (score, s1, s2) in read_tsv(path, ["score", "sentence1", "sentence2"]):
            rows.append((s1, s2, parse_score(score, f"{path}:{lineno}")))
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows


# Copied from KoSimCSE/dataloader.py:_read_json_list
def _read_json_list(path):
    list(iter_lines(path))  # missing / empty / UTF-8 checks with line numbers
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of examples, found {type(data).__name__}")
    return data


# Copied from KoSimCSE/dataloader.py:read_sentences
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


# Copied from KoSimCSE/dataloader.py:TokenizedTexts
class TokenizedTexts:
    """Token ids of many texts, tokenised once, kept in one flat int32 array plus offsets.

    A million wiki sentences take ~100 MB this way instead of several GB as padded tensors or
    Python lists. Texts longer than ``max_len`` tokens are truncated (special tokens kept) and
    counted in ``num_truncated``.
    """

    def __init__(self, tokenizer, texts, max_len, desc="tokenize", chunk_size=10_000):
        if max_len <= tokenizer.num_special_tokens_to_add(pair=False):
            raise ValueError(f"--max_len {max_len} leaves no room for tokens besides the special ones")
        pieces, self.num_truncated = [], 0
        for start in tqdm(range(0, len(texts), chunk_size), desc=desc, unit_scale=chunk_size,
                          disable=desc is None or len(texts) <= chunk_size):
            # Overflow rows mark the texts that truncation cut; only each text's first row is kept.
            enc = tokenizer(list(texts[start:start + chunk_size]), truncation=True, max_length=max_len,
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


# Copied from KoSimCSE/dataloader.py:pad_batch
def pad_batch(sequences, pad_id):
    """Right-pad a list of 1-D int arrays to the longest one: input_ids and attention_mask."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# Copied from KoSimCSE/dataloader.py:BatchPlan
class BatchPlan:
    """The batches of a run, fixed by (seed, epoch): epoch e visits the examples in the order
    ``torch.randperm(n)`` seeded with seed + e, cut into global batches of ``global_batch`` (a last
    partial batch is dropped unless drop_last=False); under torch.distributed, rank r of W takes
    the r-th slice of every global batch. Any step can be the starting point, which is what makes
    ``--resume`` exact."""

    def __init__(self, num_examples, global_batch, seed, rank=0, world_size=1, drop_last=True):
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


class MaskingVocabulary(NamedTuple):
    """What dynamic masking needs to know of the encoder's tokenizer (``masking_vocabulary``)."""
    special_ids: tuple  # never masked: [CLS], [SEP], [PAD], [UNK], [MASK], ...
    mask_id: int  # what 80% of the chosen tokens become
    size: int  # a random replacement is drawn from range(size), len(tokenizer) as in DiffCSE


def masking_vocabulary(tokenizer):
    return MaskingVocabulary(tuple(sorted(set(tokenizer.all_special_ids))), tokenizer.mask_token_id, len(tokenizer))


def special_token_mask(input_ids, vocabulary):
    """True where input_ids holds a special token ([CLS], [SEP], [PAD], ...)."""
    return torch.isin(input_ids, torch.tensor(vocabulary.special_ids, device=input_ids.device))


def mask_tokens(input_ids, attention_mask, vocabulary, ratio, generator=None):
    """DiffCSE's masking, drawn anew for every batch (BERT's MLM recipe): each real, non-special token is
    chosen with probability ``ratio``; a chosen token becomes [MASK] 80% of the time, a random token of
    ``range(vocabulary.size)`` 10%, and stays as it is 10%. Draws from ``generator`` (default: the global
    RNG, which --resume restores). Returns (masked ids, chosen positions); training uses the masked ids,
    the chosen positions are there for the test of the 80/10/10 split (tests/test_kodiffcse.py)."""
    candidates = attention_mask.bool() & ~special_token_mask(input_ids, vocabulary)

    def draw(p):
        return torch.bernoulli(torch.full(input_ids.shape, p), generator=generator).bool().to(input_ids.device)
    chosen = draw(ratio) & candidates
    to_mask = draw(0.8) & chosen
    to_random = draw(0.5) & chosen & ~to_mask
    masked = input_ids.clone()
    masked[to_mask] = vocabulary.mask_id
    random_ids = torch.randint(vocabulary.size, input_ids.shape, generator=generator).to(input_ids.device)
    masked[to_random] = random_ids[to_random]
    return masked, chosen


def static_sep_masks(tokenized, sep_id, ratio, seed, special_ids=None):
    """BM-K's KoDiffCSE masking: once, at load time, exactly k = max(1, int(n * ratio)) distinct positions
    among the n tokens between a sentence's first token ([CLS]) and its last ([SEP]) are replaced by the
    [SEP] id -- not [MASK], no 80/10/10 -- giving a fixed masked copy of the flat id array of
    ``tokenized``. A sentence with no such token stays as it is (BM-K counts it as a missing value).

    ``special_ids`` (--unk_to_sep): BM-K's rule for special tokens inside a sentence, [UNK] in practice
    (data/dataloader.py ``only_mask_tokens``: its special-token mask counts [UNK]). Every one of them
    becomes [SEP] too, n counts only the m others, and the k = max(1, int(m * ratio)) masked positions are
    drawn among positions 1..m of the sentence (BM-K's ``randint(1, num_of_false)``), so a draw can land
    on an [UNK] and the last n - m positions are never drawn. Without it (the default) [UNK] is an
    ordinary token, masked only when drawn."""
    rng = np.random.default_rng(seed)
    masked = tokenized.ids.copy()
    special = np.isin(masked, list(special_ids)) if special_ids is not None else None
    for i in range(len(tokenized)):
        start, end = tokenized.offsets[i], tokenized.offsets[i + 1]
        n = end - start - 2
        if special is not None:
            inside = special[start + 1:end - 1]
            masked[start + 1:end - 1][inside] = sep_id
            n -= int(inside.sum())
        if n > 0:
            masked[start + 1 + rng.choice(n, max(1, int(n * ratio)), replace=False)] = sep_id
    return masked


class DiffCSEDataset(torch.utils.data.Dataset):
    """Items: (ids, ids) -- the sentence twice, dropout makes the two views -- or, with static masks,
    (ids, ids, masked view 1, masked view 2)."""

    def __init__(self, tokenized, static_masks=None):
        self.tokenized, self.static_masks = tokenized, static_masks

    def __len__(self):
        return len(self.tokenized)

    def __getitem__(self, i):
        ids = self.tokenized[i]
        if self.static_masks is None:
            return ids, ids
        a, b = self.tokenized.offsets[i], self.tokenized.offsets[i + 1]
        return ids, ids, self.static_masks[0][a:b], self.static_masks[1][a:b]


# Copied from KoSimCSE/dataloader.py:ColumnCollator
class ColumnCollator:
    """Stacks a batch of B k-tuples column by column into one (k*B, L) tensor, padded dynamically,
    so the whole batch is encoded in a single forward pass: rows [0:B] are column 0, and so on."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, batch):
        return pad_batch([seq for column in zip(*batch) for seq in column], self.pad_id)


def build_diffcse_dataset(paths, tokenizer, max_len, max_samples=None, seed=42, static_sep_ratio=None, log=print,
                          unk_to_sep=False):
    """Sentence-per-line files, tokenised once (``max_samples``: a seeded random subset of each file).
    With ``static_sep_ratio``, also two fixed masked views of every sentence (``static_sep_masks``, seeds
    seed and seed + 1; ``unk_to_sep``: BM-K's handling of the special tokens inside a sentence)."""
    texts = [s for path in paths for s in read_sentences(path, max_samples, seed, log=log)]
    tokenized = TokenizedTexts(tokenizer, texts, max_len, desc="tokenize sentences")
    if tokenized.num_truncated:
        log(f"{tokenized.num_truncated:,} of {len(tokenized):,} training sentences were longer than "
            f"--max_len {max_len} tokens and were truncated")
    masks = None
    if static_sep_ratio is not None:
        specials = tokenizer.all_special_ids if unk_to_sep else None
        masks = tuple(static_sep_masks(tokenized, tokenizer.sep_token_id, static_sep_ratio, seed + i, specials)
                      for i in (0, 1))
    return DiffCSEDataset(tokenized, masks)

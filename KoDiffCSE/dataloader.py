"""The training set of KoDiffCSE (wiki sentences, one per line; common/data.py reads them, stopping on a bad
line with its file and number) and the masking that feeds the generator, in the originals' two forms:
DiffCSE's dynamic BERT masking (``mask_tokens``, per batch) and BM-K's static [SEP] masking
(``static_sep_masks``)."""
from typing import NamedTuple

import numpy as np
import torch
from transformers import AutoConfig

from common.data import TokenizedTexts, check_duplicates, read_sentences
from common.run import load_or_exit
from common.tokenizer import load_tokenizer


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
    the chosen positions are for the test of the 80/10/10 split."""
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
    """Items: (ids, ids), the sentence twice (dropout makes the two views); with static masks, (ids, ids,
    masked view 1, masked view 2)."""

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


def build_diffcse_dataset(paths, tokenizer, max_len, max_samples=None, seed=42, static_sep_ratio=None, log=print,
                          unk_to_sep=False, prefix=""):
    """Sentence-per-line files, tokenised once (``max_samples``: a seeded random subset of each file).
    With ``static_sep_ratio``, also two fixed masked views of every sentence (``static_sep_masks``, seeds
    seed and seed + 1; ``unk_to_sep``: BM-K's handling of the special tokens inside a sentence; ``prefix``:
    --query_prefix, before every sentence)."""
    texts = [s for path in paths for s in read_sentences(path, max_samples, seed, log=log)]
    check_duplicates(texts, " ".join(paths), log)
    tokenized = TokenizedTexts(tokenizer, texts, max_len, desc="tokenize sentences", prefix=prefix)
    if tokenized.num_truncated:
        log(f"{tokenized.num_truncated:,} of {len(tokenized):,} training sentences were longer than "
            f"--max_len {max_len} tokens and were truncated")
    masks = None
    if static_sep_ratio is not None:
        specials = tokenizer.all_special_ids if unk_to_sep else None
        masks = tuple(static_sep_masks(tokenized, tokenizer.sep_token_id, static_sep_ratio, seed + i, specials)
                      for i in (0, 1))
    return DiffCSEDataset(tokenized, masks)


def check_generator(path, generator_name, masking):
    """The generator's token ids go to the discriminator as they are, so the generator ``generator_name``
    must use the tokenizer of the encoder ``path`` and may not predict ids outside its embedding table;
    ``masking`` (--masking) needs a [MASK] or [SEP] token. Checked from the tokenizers and configs alone,
    before any weights are loaded; returns the encoder's tokenizer. Each failure is one clear line."""
    tokenizer = load_or_exit(load_tokenizer, path, "the encoder", "--model")
    generator_tokenizer = load_or_exit(load_tokenizer, generator_name, "the generator", "--generator_name")
    encoder_size = load_or_exit(AutoConfig.from_pretrained, path, "the encoder", "--model").vocab_size
    generator_size = load_or_exit(AutoConfig.from_pretrained, generator_name, "the generator",
                                  "--generator_name").vocab_size
    if generator_tokenizer.get_vocab() != tokenizer.get_vocab() or generator_size > encoder_size:
        raise SystemExit(
            f"error: the generator {generator_name} (tokenizer {len(generator_tokenizer):,} tokens, vocab_size "
            f"{generator_size:,}) does not share the vocabulary of the encoder {path} (tokenizer "
            f"{len(tokenizer):,} tokens, vocab_size {encoder_size:,}); pick a masked-LM generator trained with the "
            f"same tokenizer (e.g. klue/roberta-small for klue/roberta-base)")
    needed = {"dynamic": ("mask_token", "[MASK]"), "static_sep": ("sep_token", "[SEP]")}[masking]
    if getattr(tokenizer, needed[0] + "_id") is None:
        raise SystemExit(f"error: --masking {masking} needs a {needed[1]} token; the tokenizer of {path} has none")
    return tokenizer

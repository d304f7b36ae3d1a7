# Copied from KoSimCSE/common/sts.py (whole file; delete this line to own it)
"""The 8 numbers of the Korean STS tables: Pearson/Spearman x cosine/euclidean/manhattan/dot (x100) and
their AVG, over the whole set (``standard``) or BM-K's per-batch average (``bmk``)."""
import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics.pairwise import paired_cosine_distances, paired_euclidean_distances, paired_manhattan_distances

from .encoding import encode


METRICS = ("cosine_pearson", "cosine_spearman", "euclidean_pearson", "euclidean_spearman",
           "manhattan_pearson", "manhattan_spearman", "dot_pearson", "dot_spearman")


COLUMNS = ("cosP", "cosS", "eucP", "eucS", "manP", "manS", "dotP", "dotS")


def sts_metrics(emb1, emb2, gold):
    """The 8 correlations x100 in the papers' order, their mean ``avg``, and ``max_spearman`` (the
    checkpoint-selection score of BM-K and sentence-transformers <= 2.2)."""
    emb1, emb2 = np.asarray(emb1, dtype=np.float64), np.asarray(emb2, dtype=np.float64)
    similarities = {"cosine": 1 - paired_cosine_distances(emb1, emb2),
                    "euclidean": -paired_euclidean_distances(emb1, emb2),
                    "manhattan": -paired_manhattan_distances(emb1, emb2),
                    "dot": np.einsum("ij,ij->i", emb1, emb2)}
    out = {}
    for name, sim in similarities.items():
        out[f"{name}_pearson"] = 100 * float(pearsonr(gold, sim)[0])
        out[f"{name}_spearman"] = 100 * float(spearmanr(gold, sim)[0])
    out["avg"] = float(np.mean([out[k] for k in METRICS]))
    out["max_spearman"] = max(out[k] for k in METRICS if k.endswith("spearman"))
    return out


def bmk_metrics(emb1, emb2, gold, batch_size, seed):
    """BM-K's protocol: shuffle the pairs (seeded), cut into batches of ``batch_size``, compute the
    metrics per batch and average them over batches (the last, smaller batch weighs as much)."""
    order = torch.randperm(len(gold), generator=torch.Generator().manual_seed(seed)).numpy()
    per_batch = [sts_metrics(emb1[idx], emb2[idx], np.asarray(gold)[idx])
                 for idx in np.array_split(order, range(batch_size, len(order), batch_size))]
    return {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}


def format_table(rows):
    """Markdown table in the papers' column order, two decimals, x100."""
    lines = ["| model | dataset | protocol | AVG | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|---:|" + "---:|" * len(COLUMNS)]
    for row in rows:
        m = row["metrics"]
        lines.append(f"| {row['model']} | {row['dataset']} | {row['protocol']} | {m['avg']:.2f} | "
                     + " | ".join(f"{m[k]:.2f}" for k in METRICS) + " |")
    return "\n".join(lines)


def evaluate_sts(embed, tokenizer, pairs, max_len, batch_size, device, protocols=("standard",), seed=42,
                 stats=None):
    """{protocol: metrics} for (sentence1, sentence2, score) pairs; ``stats``: see encode."""
    n = len(pairs)
    emb = encode(embed, tokenizer, [p[0] for p in pairs] + [p[1] for p in pairs], max_len, batch_size,
                 device, desc="encode", stats=stats)
    gold = np.array([p[2] for p in pairs])
    return {p: sts_metrics(emb[:n], emb[n:], gold) if p == "standard"
            else bmk_metrics(emb[:n], emb[n:], gold, batch_size, seed) for p in protocols}

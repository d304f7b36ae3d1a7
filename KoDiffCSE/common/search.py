# Copied from KoSimCSE/common/search.py (whole file; delete this line to own it)
"""Semantic search streamed over a corpus file (memory for one chunk) or answered from an index, and KMeans
clustering: the work of evaluation.py --task search and cluster."""
import os
import sys

import torch
from tqdm.auto import tqdm

from .data import DataError, iter_lines
from .encoding import encode
from .index import check_index_recipe, index_search


# The example of the KoSBERT/KoSimCSE READMEs: 9 corpus sentences and 3 queries.
EXAMPLE_CORPUS = ["한 남자가 음식을 먹는다.", "한 남자가 빵 한 조각을 먹는다.", "그 여자가 아이를 돌본다.",
                  "한 남자가 말을 탄다.", "한 여자가 바이올린을 연주한다.", "두 남자가 수레를 숲 속으로 밀었다.",
                  "한 남자가 담으로 싸인 땅에서 백마를 타고 있다.", "원숭이 한 마리가 드럼을 연주한다.",
                  "치타 한 마리가 먹이 뒤에서 달리고 있다."]


EXAMPLE_QUERIES = ["한 남자가 파스타를 먹는다.", "고릴라 의상을 입은 누군가가 드럼을 연주하고 있다.",
                   "치타가 들판을 가로 질러 먹이를 쫓는다."]


def _corpus_chunks(corpus, chunk_size):
    if isinstance(corpus, list):
        for start in range(0, len(corpus), chunk_size):
            yield corpus[start:start + chunk_size]
        return
    chunk = []
    for _, line in iter_lines(corpus):
        chunk.append(line.strip())
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def semantic_search(embed, tokenizer, queries, corpus, top_k=5, chunk_size=20_000, max_len=128,
                    batch_size=64, device="cpu", passage_prefix="", stats=None):
    """Top-k corpus sentences by cosine for each query: a list (per query) of (score, index, sentence).

    ``corpus`` is a list of sentences or the path of a one-sentence-per-line file; a file is read and
    encoded ``chunk_size`` lines at a time, keeping only the running top-k, and the winning lines
    are read back at the end, so memory does not grow with the corpus. Corpus sentences are encoded as
    ``passage_prefix`` + sentence (queries as given) and returned without it. ``stats`` (a dict), if
    given, receives the number of corpus sentences and of those cut at ``max_len`` tokens.
    """
    q = torch.nn.functional.normalize(torch.from_numpy(
        encode(embed, tokenizer, queries, max_len, batch_size, device)), dim=-1)
    best_scores, best_ids, seen = torch.empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long), 0
    total = len(corpus) if isinstance(corpus, list) else sum(1 for _ in iter_lines(corpus))
    with tqdm(total=total, desc="search", unit="sent", disable=total <= chunk_size) as bar:
        for chunk in _corpus_chunks(corpus, chunk_size):
            chunk_stats = {}
            c = torch.nn.functional.normalize(torch.from_numpy(encode(
                embed, tokenizer, [passage_prefix + s for s in chunk], max_len, batch_size, device, stats=chunk_stats)),
                dim=-1)
            if stats is not None:
                stats["sentences"] = stats.get("sentences", 0) + len(chunk)
                stats["truncated"] = stats.get("truncated", 0) + chunk_stats["truncated"]
            scores, ids = (q @ c.T).topk(min(top_k, len(chunk)), dim=1)
            best_scores = torch.cat([best_scores, scores], dim=1)
            best_ids = torch.cat([best_ids, ids + seen], dim=1)
            best_scores, keep = best_scores.topk(min(top_k, best_scores.shape[1]), dim=1)
            best_ids = best_ids.gather(1, keep)
            seen += len(chunk)
            bar.update(len(chunk))
    wanted = set(best_ids.flatten().tolist())
    if isinstance(corpus, list):
        text = {i: corpus[i] for i in wanted}
    else:
        text = {i: line.strip() for i, (_, line) in enumerate(iter_lines(corpus)) if i in wanted}
    return [[(float(s), int(i), text[int(i)]) for s, i in zip(srow, irow)]
            for srow, irow in zip(best_scores, best_ids)]


def print_search_results(queries, results):
    """The printed format of the KoSBERT/KoSimCSE SemanticSearch examples."""
    for query, hits in zip(queries, results):
        print("\n\n======================\n\n")
        print("Query:", query)
        print(f"\nTop {len(hits)} most similar sentences in corpus:")
        for score, _, sentence in hits:
            print(sentence, "(Score: %.4f)" % score)


def cluster(embeddings, num_clusters, seed=42):
    from sklearn.cluster import KMeans
    return KMeans(n_clusters=num_clusters, random_state=seed, n_init=10).fit_predict(embeddings)


def plot_clusters(embeddings, labels, path, title=""):
    """Sentences in 2-D (PCA of the embeddings), coloured by cluster, numbered as printed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    xy = PCA(n_components=2, random_state=0).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(7, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=60)
    for i, (x, y) in enumerate(xy):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.legend(*scatter.legend_elements(), title="cluster", loc="best", fontsize=8)
    ax.set_title(title or "sentence embeddings (PCA), coloured by KMeans cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_search(args, encoder, max_len, index=None):
    """evaluation.py --task search: the queries against --corpus_file streamed, or against ``index``
    (load_index of --index_dir, with the prefixes it was built with unless given)."""
    queries = args.queries or ([l.strip() for _, l in iter_lines(args.queries_file)] if args.queries_file
                               else EXAMPLE_QUERIES)
    if not any(q.strip() for q in queries):
        raise DataError(f"{args.queries_file or '--queries'}: no query to search for (blank lines only)")
    if index is None and args.corpus_file and next(iter_lines(args.corpus_file), None) is None:
        raise DataError(f"{args.corpus_file}: no non-blank line to search in")  # as --task index refuses it
    if index is not None:  # the prefixes the index was built with, unless given
        query_prefix = index["meta"]["query_prefix"] if args.query_prefix is None else args.query_prefix
        passage_prefix = index["meta"]["passage_prefix"] if args.passage_prefix is None else args.passage_prefix
        check_index_recipe(index, args.model_dir, encoder, max_len, query_prefix, passage_prefix)
        prefixed = [query_prefix + q for q in queries]
        results = index_search(encoder, encoder.tokenizer, prefixed, index, args.top_k, max_len, args.batch_size,
                               args.device)
    else:
        corpus = args.corpus_file or EXAMPLE_CORPUS
        stats = {}
        results = semantic_search(encoder, encoder.tokenizer, [(args.query_prefix or "") + q for q in queries], corpus,
                                  args.top_k, args.chunk_size, max_len, args.batch_size, args.device,
                                  args.passage_prefix or "", stats)
        print(f"search: {stats['truncated']:,} of {stats['sentences']:,} corpus sentences cut at --max_len {max_len}",
              file=sys.stderr)
    print_search_results(queries, results)


def run_cluster(args, encoder, max_len):
    """evaluation.py --task cluster: KMeans of the sentences, printed by cluster, and a 2-D plot."""
    sentences = ([l.strip() for _, l in iter_lines(args.sentences_file)] if args.sentences_file
                 else EXAMPLE_CORPUS + EXAMPLE_QUERIES)
    emb = encode(encoder, encoder.tokenizer, [(args.query_prefix or "") + s for s in sentences], max_len, args.batch_size,
                 args.device)
    labels = cluster(emb, args.num_clusters, args.seed)
    for c in range(args.num_clusters):
        print("Cluster ", c + 1)
        print([s for s, label in zip(sentences, labels) if label == c])
        print("")
    plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.output_json or "x")), "clusters.png")
    plot_clusters(emb, labels, plot)
    print(f"plot: {plot}")

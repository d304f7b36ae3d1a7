"""Build wiki/wiki_corpus.txt (1,000,000 Korean Wikipedia sentences) from WikiExtractor output.

    python data/build_wiki_corpus.py SOURCE_DIR OUT_FILE [--size 1000000] [--seed 42]

SOURCE_DIR holds WikiExtractor files (AA/wiki_00 ...), e.g. the 2020 extract that download.sh
fetches. The rules, as documented for the reference copy of this corpus:
  1. inside each <doc ...> ... </doc>: drop the tag lines, the first line (the title) and blank lines;
     every remaining line is a paragraph;
  2. split paragraphs into sentences at whitespace after . ? ! when the character before is a Hangul
     syllable or a closing bracket/quote, or when the punctuation is followed by one closing
     quote/bracket and preceded by a Hangul syllable (keeps "B. F. Skinner" and decimals intact);
     collapse runs of whitespace;
  3. keep a sentence if it is 10-300 characters, ends in . ? ! (optionally plus one closing
     quote/bracket), has >= 5 Hangul syllables making up >= 30% of its non-space characters, and has
     no <...> markup;
  4. drop exact duplicates (first occurrence kept);
  5. draw --size sentences with random.Random(seed).sample over the pool, written in corpus order.
"""
import argparse
import os
import random
import re
import sys

CLOSERS = "\"'”’)]」』"
HANGUL = re.compile(r"[\uac00-\ud7a3]")
SPLIT = re.compile(rf"(?:(?<=[\uac00-\ud7a3{re.escape(CLOSERS)}][.?!])|(?<=[\uac00-\ud7a3][.?!][{re.escape(CLOSERS)}]))\s+")
ENDING = re.compile(rf"[.?!][{re.escape(CLOSERS)}]?$")
MARKUP = re.compile(r"<[^>]*>")


def keep(sentence):
    if not 10 <= len(sentence) <= 300 or not ENDING.search(sentence) or MARKUP.search(sentence):
        return False
    hangul = len(HANGUL.findall(sentence))
    return hangul >= 5 and hangul >= 0.3 * len(sentence.replace(" ", ""))


def paragraphs(path):
    title_pending = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("<doc"):
                title_pending = True
            elif line.startswith("</doc>") or not line:
                continue
            elif title_pending:
                title_pending = False
            else:
                yield line


def sentences(source_dir):
    for sub in sorted(os.listdir(source_dir)):
        folder = os.path.join(source_dir, sub)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            for paragraph in paragraphs(os.path.join(folder, name)):
                for piece in SPLIT.split(" ".join(paragraph.split())):
                    yield piece


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source_dir")
    p.add_argument("out_file")
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    pool, seen = [], set()
    for s in sentences(args.source_dir):
        if keep(s) and s not in seen:
            seen.add(s)
            pool.append(s)
    if len(pool) < args.size:
        sys.exit(f"error: only {len(pool):,} sentences pass the filters, fewer than --size {args.size:,}")
    chosen = sorted(random.Random(args.seed).sample(range(len(pool)), args.size))
    tmp = args.out_file + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(args.out_file)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(pool[i] + "\n" for i in chosen)
    os.replace(tmp, args.out_file)
    print(f"{len(pool):,} distinct sentences passed the filters; wrote {args.size:,} to {args.out_file}")


if __name__ == "__main__":
    main()

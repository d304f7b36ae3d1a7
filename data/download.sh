#!/usr/bin/env bash
# Fetch the Korean STS/NLI data and the Korean Wikipedia sentence corpus from their public sources,
# into the layout every script expects (the same layout as ../shared/data):
#
#   KorNLI/{snli_1.0_train,multinli.train,xnli.dev,xnli.test}.ko.tsv   kakaobrain/KorNLUDatasets
#   KorSTS/sts-{train,dev,test}.tsv                                     kakaobrain/KorNLUDatasets
#   KLUE-STS/klue-sts-v1.1_dev.json, klue_sts_{train,val}.csv          KLUE-benchmark/KLUE, Bing-su/klue-sts-csv-data
#   KLUE-NLI/klue-nli-v1.1_dev.json, klue_nli_train.tsv               KLUE-benchmark/KLUE (train: JSON -> TSV)
#   KorQuAD/KorQuAD_v1.0_dev.json                                       korquad/korquad.github.io (evaluation only)
#   AutoRAG/{ocr_corpus_v3,qa_v4}.parquet                               Marker-Inc-Korea/AutoRAG-example-korean-
#                                                                       embedding-benchmark (evaluation only)
#   wiki/wiki_corpus.txt (1,000,000 sentences)                          built from a 2020 Korean Wikipedia
#                                                                       extract (see build_wiki_corpus.py)
#
# Usage: bash data/download.sh [--no-wiki] [DEST]     (DEST defaults to this folder)
# Safe to re-run: files that are already present and verified are skipped; downloads go to *.part
# and are renamed into place only when complete. Every file is checked (sha256 or git blob id) and
# row counts are verified at the end by check_data.py.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WIKI=1
if [ "${1:-}" = "--no-wiki" ]; then WIKI=0; shift; fi
DEST=$(mkdir -p "${1:-$HERE}" && cd "${1:-$HERE}" && pwd)
PY=${PY:-python3}
GH=https://raw.githubusercontent.com
KORNLU=$GH/kakaobrain/KorNLUDatasets/0df0fe7d496eb61b092e022e238c2230b29f1cbc
KLUE=$GH/KLUE-benchmark/KLUE/3efd98708a40ff49251fddde35453f8fbb11f536/klue_benchmark
KLUECSV=$GH/Bing-su/klue-sts-csv-data/cf7cf473cbd01d117d8a20ad34864af6d7954983/data
KORQUAD=$GH/korquad/korquad.github.io/61d7d6682948375dd8f06ef27e788fd19982af38/dataset
AUTORAG=$GH/Marker-Inc-Korea/AutoRAG-example-korean-embedding-benchmark/9a0ba3c3607b39a4d9e2141d72fbe2c93602932d/data
WIKISRC=$GH/HyundongHwang/PyTorchDeepLearningStart/d462dbe5466d5ec6e49206110c1ae252d7db5f5f/text

# verify FILE KIND DIGEST: KIND is sha256 or blob (git blob id, what `git hash-object` prints)
verify() {
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import hashlib, sys
path, kind, want = sys.argv[1:]
data = open(path, "rb").read()
got = hashlib.sha256(data).hexdigest() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
sys.exit(0 if got == want else 1)
PYEOF
}

# fetch URL RELATIVE_PATH KIND DIGEST
fetch() {
  local url=$1 out=$DEST/$2 kind=$3 digest=$4
  if [ -f "$out" ] && verify "$out" "$kind" "$digest"; then echo "ok      $2"; return; fi
  mkdir -p "$(dirname "$out")"
  echo "fetch   $2"
  curl -fL --retry 3 --retry-delay 2 -o "$out.part" "$url"
  if ! verify "$out.part" "$kind" "$digest"; then
    echo "error: $url does not match its expected $kind $digest (left as $out.part)" >&2; exit 1
  fi
  mv "$out.part" "$out"
}

fetch $KORNLU/KorNLI/xnli.dev.ko.tsv   KorNLI/xnli.dev.ko.tsv  sha256 821fb1c1c2e538ac2724a6132da36ffa379eb9a542ceb89243b3cf711377382c
fetch $KORNLU/KorNLI/xnli.test.ko.tsv  KorNLI/xnli.test.ko.tsv sha256 0db53cf8e182283a0d0404ec3fe1b15d1e29236d23d22082dc20d43067254b3e
fetch $KORNLU/KorSTS/sts-train.tsv     KorSTS/sts-train.tsv    sha256 b5aaa7f957d6ff46f4b6834a8b0f024a9234a6eefe9289aed66746b4533da3b8
fetch $KORNLU/KorSTS/sts-dev.tsv       KorSTS/sts-dev.tsv      sha256 d835b65b424401fbcce6be28a78159df8d61f5b19977ea7a0b83b8cb6105f393
fetch $KORNLU/KorSTS/sts-test.tsv      KorSTS/sts-test.tsv     sha256 13f83a3440d9db52d134eb40303ce021b03264aa338fbf2871c8786ce04d2105
fetch $KLUE/klue-sts-v1.1/klue-sts-v1.1_dev.json KLUE-STS/klue-sts-v1.1_dev.json sha256 b6a0ae0c370e21687f7eef0fdea872a328bb2ecbdb020c546cb870d28606bf80
fetch $KLUECSV/klue_sts_train.csv      KLUE-STS/klue_sts_train.csv sha256 1204659f6e5914b16f349810c89784339abdc436fb2feb28865313fadc38cbe9
fetch $KLUECSV/klue_sts_val.csv        KLUE-STS/klue_sts_val.csv   sha256 1b203a9aad2aa65edc577656369655ba42a86996b82cc268ea5f138ac56d0390
fetch $KLUE/klue-nli-v1.1/klue-nli-v1.1_dev.json KLUE-NLI/klue-nli-v1.1_dev.json sha256 0699db82be17766b26e199864e6260443e17ec6e91d1870e876419e388f245b1
# KLUE-NLI train: the official JSON (no published digest), converted to KorNLI's TSV layout and checked by its
# row and label counts (data/klue_nli_to_tsv.py); the TSV is the one the table in README.md trained on when
# its sha256 matches.
KLUE_NLI_TSV_SHA=b51ca2617f4bec65a52c4a9aa2658aeb96aa21c4a99416f188fbc40dfa5bec51
if [ -f "$DEST/KLUE-NLI/klue_nli_train.tsv" ] && verify "$DEST/KLUE-NLI/klue_nli_train.tsv" sha256 $KLUE_NLI_TSV_SHA; then
  echo "ok      KLUE-NLI/klue_nli_train.tsv"
else
  mkdir -p "$DEST/KLUE-NLI"
  echo "fetch   KLUE-NLI/klue_nli_train.tsv (from klue-nli-v1.1_train.json)"
  curl -fL --retry 3 --retry-delay 2 -o "$DEST/KLUE-NLI/klue-nli-v1.1_train.json.part" \
    "$KLUE/klue-nli-v1.1/klue-nli-v1.1_train.json"
  "$PY" "$HERE/klue_nli_to_tsv.py" "$DEST/KLUE-NLI/klue-nli-v1.1_train.json.part" "$DEST/KLUE-NLI/klue_nli_train.tsv"
  rm -f "$DEST/KLUE-NLI/klue-nli-v1.1_train.json.part"
  verify "$DEST/KLUE-NLI/klue_nli_train.tsv" sha256 $KLUE_NLI_TSV_SHA || echo "warning: KLUE-NLI/klue_nli_train.tsv has \
the right counts but differs from the reference TSV (sha256 $KLUE_NLI_TSV_SHA); it is still KLUE-NLI train" >&2
fi
# The retrieval evaluation sets (never trained on; KorQuAD is CC BY-ND: use unmodified, do not redistribute).
fetch $KORQUAD/KorQuAD_v1.0_dev.json  KorQuAD/KorQuAD_v1.0_dev.json blob 6849d8c79140447018f5701a0453835c96608a07
fetch $AUTORAG/ocr_corpus_v3.parquet  AutoRAG/ocr_corpus_v3.parquet blob fc4a0d327dfe2eb8381d79fd22d5bdc757c985c3
fetch $AUTORAG/qa_v4.parquet          AutoRAG/qa_v4.parquet         blob 401e8e681a9503d1524eb2570ab7946f6968c3ed
# The large KorNLI train files: git blob ids (the upstream repository publishes no sha256).
fetch $KORNLU/KorNLI/snli_1.0_train.ko.tsv  KorNLI/snli_1.0_train.ko.tsv blob c91761e52fca2a7420104589811346986ce94073
fetch $KORNLU/KorNLI/multinli.train.ko.tsv  KorNLI/multinli.train.ko.tsv blob 94d26a9d0dd045928148ef8691a256bd0e7d45c3

WIKI_SHA=0d0d3f5922ea5ae233ea535bcfdc6e234a68e4120453d254c5d999171a517089
if [ "$WIKI" = 1 ]; then
  if [ -f "$DEST/wiki/wiki_corpus.txt" ] && verify "$DEST/wiki/wiki_corpus.txt" sha256 $WIKI_SHA; then
    echo "ok      wiki/wiki_corpus.txt"
  else
    # 700 WikiExtractor files (~690 MB), kept in wiki/.source so an interrupted run resumes.
    SRC=$DEST/wiki/.source
    for d in AA AB AC AD AE AF AG; do
      for i in $(seq -w 0 99); do
        f=$SRC/$d/wiki_$i
        [ -s "$f" ] && continue
        mkdir -p "$SRC/$d"
        curl -fsSL --retry 3 -o "$f.part" "$WIKISRC/$d/wiki_$i" && mv "$f.part" "$f"
      done
      echo "fetch   wiki source $d (100 files)"
    done
    "$PY" "$HERE/build_wiki_corpus.py" "$SRC" "$DEST/wiki/wiki_corpus.txt"
    if ! verify "$DEST/wiki/wiki_corpus.txt" sha256 $WIKI_SHA; then
      echo "warning: wiki/wiki_corpus.txt differs from the reference build (sha256 $WIKI_SHA); it is still a valid corpus" >&2
    fi
  fi
fi
"$PY" "$HERE/check_data.py" "$DEST" $([ "$WIKI" = 1 ] && echo --require-all || echo --require-all --no-wiki)

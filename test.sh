#!/usr/bin/env bash
# The paper's zero-shot evaluation: 15 datasets, official settings (518 px, layers 6 12 18 24,
# R 10, seed 333). train_visa.pth for every dataset but VisA, train_mvtec.pth for VisA.
# Then one summary table of the datasets' mean rows beside the paper's numbers.
#
# Environment: DATA (./dataset/mvisa/data), CLIP (./pretrained_weight/ViT-L-14-336px.pt),
# WEIGHTS (./bayes_weight), OUT (./results), DEVICE (auto), EXTRA (more test.py flags,
# e.g. "--batch_size 8 --precision bf16 --no_vis").
set -u
cd "$(dirname "$0")"
DATA=${DATA:-./dataset/mvisa/data}
CLIP=${CLIP:-./pretrained_weight/ViT-L-14-336px.pt}
WEIGHTS=${WEIGHTS:-./bayes_weight}
OUT=${OUT:-./results}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}
DATASETS="mvtec visa BTAD KSDD2 RSDD DAGM DTD HeadCT BrainMRI Br35H ISIC ClinicDB ColonDB Kvasir Endo"
CLIP_URL=https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt

missing=0
say_missing() { echo "missing: $*" >&2; missing=1; }

[ -f "$CLIP" ] || say_missing "$CLIP (CLIP ViT-L/14-336 weights): download $CLIP_URL into $(dirname "$CLIP")/"
[ -f "$WEIGHTS/train_visa.pth" ] || say_missing "$WEIGHTS/train_visa.pth (for all datasets but VisA): download it from https://drive.google.com/file/d/1rNs_rdTmrg4JshmKHotq6AN1gqTpPjvm/view (see bayes_weight/README.md)"
[ -f "$WEIGHTS/train_mvtec.pth" ] || say_missing "$WEIGHTS/train_mvtec.pth (for VisA): download it from https://drive.google.com/file/d/1EHa4jPi7r8jmRVURoZ4yH2-jqDt6K1Ni/view (see bayes_weight/README.md)"

runnable=""
for d in $DATASETS; do
  if [ "$d" = visa ]; then ckpt="$WEIGHTS/train_mvtec.pth"; else ckpt="$WEIGHTS/train_visa.pth"; fi
  if [ ! -f "$DATA/meta_$d.json" ]; then
    say_missing "$DATA/meta_$d.json ($d): convert the raw data with 'python dataset/make_dataset.py --dataset $d --src RAW --dst $DATA' then 'python dataset/make_meta.py --data_root $DATA --dataset $d' (see dataset/README.md)"
  elif [ -f "$CLIP" ] && [ -f "$ckpt" ]; then
    runnable="$runnable $d"
  fi
done

failed=0
for d in $runnable; do
  if [ "$d" = visa ]; then ckpt="$WEIGHTS/train_mvtec.pth"; else ckpt="$WEIGHTS/train_visa.pth"; fi
  echo "=== $d ($ckpt) ==="
  # shellcheck disable=SC2086
  $PYTHON test.py --dataset "$d" --data_path "$DATA" --checkpoint_path "$ckpt" \
    --save_path "$OUT/$d" --pretrained_path "$CLIP" --features_list 6 12 18 24 \
    --image_size 518 --prompt_context_len 5 --prompt_num 3 --prompt_state_len 5 \
    --sample_num 10 --num_flows 10 --seed 333 --device "$DEVICE" $EXTRA || failed=1
done

if [ -n "$runnable" ]; then
  echo "=== summary (mean rows; paper numbers in brackets) ==="
  $PYTHON -m utils.summary "$OUT" --out "$OUT/summary.md" || failed=1
fi
if [ "$missing" = 1 ]; then
  if [ -n "$runnable" ]; then
    echo "some files are missing (listed above); evaluated:$runnable" >&2
  else
    echo "nothing could be evaluated: the files listed above are missing" >&2
  fi
fi
[ "$missing" = 0 ] && [ "$failed" = 0 ]

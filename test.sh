#!/usr/bin/env bash
# The paper's zero-shot evaluation: its 15 test datasets, official settings (518 px, layers
# 6 12 18 24, R 10, seed 333), each with the released checkpoint the registry names for it
# (dataset/registry.py: train_visa.pth for every dataset but VisA, train_mvtec.pth for VisA).
# Then one summary table of the datasets' mean rows beside the paper's numbers.
#
# Environment: DATA (./dataset/mvisa/data), CLIP (./pretrained_weight/ViT-L-14-336px.pt),
# WEIGHTS (./bayes_weight), OUT (./results), DEVICE (auto), SEEDS (e.g. "333 334 335": every
# figure as mean ± std over these sampling seeds; default the official 333 alone), GPUS (e.g.
# "0,1,2,3": each dataset evaluated by one process per GPU, torchrun; the results equal one
# process's; default: one process, the device DEVICE picks), EXTRA (more test.py flags, e.g.
# "--batch_size 8 --precision bf16 --no_vis").
set -u
cd "$(dirname "$0")"
DATA=${DATA:-./dataset/mvisa/data}
CLIP=${CLIP:-./pretrained_weight/ViT-L-14-336px.pt}
WEIGHTS=${WEIGHTS:-./bayes_weight}
OUT=${OUT:-./results}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}
SEEDS=${SEEDS:-333}
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-}
# One process, or one per GPU of GPUS (torchrun; CUDA_VISIBLE_DEVICES keeps them to those GPUs).
launch=("$PYTHON")
if [ -n "$GPUS" ]; then
  IFS=, read -r -a gpu_list <<< "$GPUS"
  export CUDA_VISIBLE_DEVICES="$GPUS"
  if [ "${#gpu_list[@]}" -ge 2 ]; then
    launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "${#gpu_list[@]}")
  fi
fi
# download addresses: models/weights.py holds them (and the SHA-256 of OpenAI's files)
url_of() { "$PYTHON" -c 'import sys; from models.weights import download_url as u; print(u(sys.argv[1]))' "$1" 2>/dev/null || echo "the project page"; }
CLIP_URL=$(url_of ViT-L-14-336px.pt)

# The datasets, and the released checkpoint of each, as "<dataset>:<checkpoint file>" words.
DATASETS=$($PYTHON -m dataset.registry) || {
  echo "test.sh: '$PYTHON -m dataset.registry' failed: run test.sh with the project's Python environment (PYTHON=...)" >&2
  exit 1
}
plan=""
for d in $DATASETS; do
  ckpt=$($PYTHON -m dataset.registry --checkpoint "$d") || exit 1
  plan="$plan $d:$ckpt"
done

missing=0
say_missing() { echo "missing: $*" >&2; missing=1; }

[ -f "$CLIP" ] || say_missing "$CLIP (CLIP ViT-L/14-336 weights): download $CLIP_URL into $(dirname "$CLIP")/"
checked=" "
for item in $plan; do
  ckpt=${item#*:}
  case "$checked" in *" $ckpt "*) continue ;; esac
  checked="$checked$ckpt "
  # which datasets the released checkpoint evaluates, and where to download it
  url=$(url_of "$ckpt")
  case "$ckpt" in
    train_visa.pth) use="for all datasets but VisA" ;;
    train_mvtec.pth) use="for VisA" ;;
    *) use="for"
       for other in $plan; do [ "${other#*:}" = "$ckpt" ] && use="$use ${other%%:*}"; done ;;
  esac
  [ -f "$WEIGHTS/$ckpt" ] || say_missing "$WEIGHTS/$ckpt ($use): download it from $url (see bayes_weight/README.md)"
done

runnable=""
for item in $plan; do
  d=${item%%:*}
  ckpt="$WEIGHTS/${item#*:}"
  if [ ! -f "$DATA/meta_$d.json" ]; then
    say_missing "$DATA/meta_$d.json ($d): convert the raw data with 'python -m dataset.make_dataset --dataset $d --src RAW --dst $DATA' then 'python -m dataset.make_meta --data_root $DATA --dataset $d' (see dataset/README.md)"
  elif [ -f "$CLIP" ] && [ -f "$ckpt" ]; then
    runnable="$runnable $item"
  fi
done

failed=0
evaluated=""
for item in $runnable; do
  d=${item%%:*}
  ckpt="$WEIGHTS/${item#*:}"
  evaluated="$evaluated $d"
  echo "=== $d ($ckpt) ==="
  # shellcheck disable=SC2086
  "${launch[@]}" test.py --dataset "$d" --data_path "$DATA" --checkpoint_path "$ckpt" \
    --save_path "$OUT/$d" --pretrained_path "$CLIP" --features_list 6 12 18 24 \
    --image_size 518 --prompt_context_len 5 --prompt_num 3 --prompt_state_len 5 \
    --sample_num 10 --num_flows 10 --seeds $SEEDS --device "$DEVICE" $EXTRA || failed=1
done

if [ -n "$runnable" ]; then
  echo "=== summary (mean rows; paper numbers in brackets) ==="
  $PYTHON -m utils.summary "$OUT" --out "$OUT/summary.md" || failed=1
fi
if [ "$missing" = 1 ]; then
  if [ -n "$runnable" ]; then
    echo "some files are missing (listed above); evaluated:$evaluated" >&2
  else
    echo "nothing could be evaluated: the files listed above are missing" >&2
  fi
fi
[ "$missing" = 0 ] && [ "$failed" = 0 ]

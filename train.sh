#!/usr/bin/env bash
# The two official Bayes-PFL training runs (ViT-L/14-336 CLIP at 518 px, layers 6 12 18 24,
# seed 333):
#   VisA as auxiliary data     -> my_exps/train_visa   (validated on 5 MVTec-AD classes)
#   MVTec-AD as auxiliary data -> my_exps/train_mvtec  (validated on 5 VisA classes)
#
#   bash train.sh                      # one GPU (GPUS=0): the two runs one after the other
#   GPUS=0,1 bash train.sh             # two GPUs: the two runs side by side
#   bash train.sh --precision bf16     # extra arguments go to both runs
#
# Environment: GPUS (default 0), PYTHON (default python), PRETRAINED (CLIP weights, default
# pretrained_weight/ViT-L-14-336px.pt), DATA_ROOT (default dataset/mvisa/data), EXP_ROOT (default
# my_exps). Console output goes to <EXP_ROOT>/<run>/console.log, the training log to
# <EXP_ROOT>/<run>/train.log.
set -u
cd "$(dirname "$0")" || exit 1

PYTHON=${PYTHON:-python}
GPUS=${GPUS:-0}
PRETRAINED=${PRETRAINED:-./pretrained_weight/ViT-L-14-336px.pt}
DATA_ROOT=${DATA_ROOT:-./dataset/mvisa/data}
EXP_ROOT=${EXP_ROOT:-./my_exps}
CLIP_URL=$("$PYTHON" -c 'from models.weights import download_url; print(download_url("ViT-L-14-336px.pt"))')

missing=0
if [ ! -f "$PRETRAINED" ]; then
    echo "missing: CLIP weights $PRETRAINED; download ViT-L-14-336px.pt from $CLIP_URL and put it there (see pretrained_weight/README.md)" >&2
    missing=1
fi
for name in visa mvtec; do
    if [ ! -d "$DATA_ROOT/$name" ]; then
        echo "missing: data folder $DATA_ROOT/$name; convert the raw dataset with 'python dataset/make_dataset.py --dataset $name --src <raw folder>' (see dataset/README.md)" >&2
        missing=1
    fi
    if [ ! -f "$DATA_ROOT/meta_$name.json" ]; then
        echo "missing: meta file $DATA_ROOT/meta_$name.json; run 'python dataset/make_meta.py --data_root $DATA_ROOT --dataset $name' after dataset/make_dataset.py" >&2
        missing=1
    fi
done
if [ "$missing" -ne 0 ]; then
    echo "train.sh: nothing started; provide the files above and run it again" >&2
    exit 1
fi

COMMON=(
    --pretrained_path "$PRETRAINED"
    --train_data_path "$DATA_ROOT" --val_data_path "$DATA_ROOT"
    --features_list 6 12 18 24 --image_size 518
    --prompt_context_len 5 --prompt_num 3 --prompt_state_len 5 --num_flows 10
    --learning_rate 1e-4 --learning_rate_PFL 1e-3 --learning_rate_prompt 1e-3
    --learning_rate_linear 1e-4
    --batch_size 32 --epochs 30 --sample_num 5 --seed 333 --save_freq 1
)

# run <dataset> <gpu> [extra args...]
run() {
    local dataset=$1 gpu=$2
    shift 2
    local out="$EXP_ROOT/train_$dataset"
    mkdir -p "$out"
    echo "train.sh: training on $dataset (GPU $gpu) -> $out (console: $out/console.log)"
    CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" train.py --dataset "$dataset" --save_path "$out" \
        "${COMMON[@]}" "$@" > "$out/console.log" 2>&1
    local status=$?
    if [ "$status" -ne 0 ]; then
        echo "train.sh: the $dataset run failed (exit $status); see $out/console.log" >&2
    fi
    return "$status"
}

IFS=, read -r -a gpu_list <<< "$GPUS"
if [ "${#gpu_list[@]}" -ge 2 ]; then
    run visa "${gpu_list[0]}" "$@" &
    visa_pid=$!
    run mvtec "${gpu_list[1]}" "$@" &
    mvtec_pid=$!
    wait "$visa_pid"; visa_status=$?
    wait "$mvtec_pid"; mvtec_status=$?
else
    run visa "${gpu_list[0]:-0}" "$@"; visa_status=$?
    run mvtec "${gpu_list[0]:-0}" "$@"; mvtec_status=$?
fi
if [ "$visa_status" -ne 0 ] || [ "$mvtec_status" -ne 0 ]; then
    exit 1
fi
echo "train.sh: done; checkpoints in $EXP_ROOT/train_visa and $EXP_ROOT/train_mvtec"

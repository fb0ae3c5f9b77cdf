#!/usr/bin/env bash
# Fine-tuning the shipped weights to a new task against training from scratch, same budget:
# left-atrium LGE-MRI (2 classes, 4 training + 2 validation volumes), each run then evaluated.
#   bash experiments/la2018_finetune/run.sh /path/to/la2018 [minutes]
# Writes finetuned/ and scratch/ beside this script (weights, training_log.csv, eval/summary.json).
set -euo pipefail
data=$(realpath "$1"); minutes=${2:-5}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../bundle"
classes="['background','left atrium']"
for run in finetuned scratch; do
  extra=()
  [ "$run" = finetuned ] && extra=(--finetune true --ckpt_path models/model.pt)
  python -m monai.bundle run training --config_file configs/train.json --dataset_dir "$data" \
    --class_names "$classes" --train_minutes "$minutes" --ckpt_dir "$here/$run" --output_dir "$here/$run/eval" "${extra[@]}"
  python -m monai.bundle run evaluating --config_file "['configs/train.json','configs/evaluate.json']" \
    --dataset_dir "$data" --class_names "$classes" --ckpt_path "$here/$run/model.pt" --output_dir "$here/$run/eval"
done

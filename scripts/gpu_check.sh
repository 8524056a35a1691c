#!/usr/bin/env bash
# The checks that need a GPU, as one short script (about 5 minutes on one GPU): the test suite's GPU-sensitive
# parts, bf16 and fp16 runs, FSDP through Accelerate (one process), and the memory benchmark on the device.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (expects the project installed: bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=.venv/bin/python
[ -x "$py" ] || py=python3
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"

$py -m mmpref.cli make-tiny lm "$out/lm" --quiet
for precision in bf16 fp16; do  # precision from the launcher, as `accelerate launch --mixed_precision` sets it
  ACCELERATE_MIXED_PRECISION=$precision $py -m mmpref.cli train configs/text/dpo.yaml "model=$out/lm" \
    "output_dir=$out/dpo-$precision" max_steps=20 report_to=none --quiet
  $py -c "import json,sys; s=json.load(open('$out/dpo-$precision/summary.json')); print('$precision', s['mixed_precision'], s['eval/rewards/accuracies'])"
done

# FSDP on one GPU: the sharded save path (gathered state dict) and the LoRA reference
$py -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m mmpref.cli \
  train configs/text/dpo.yaml "model=$out/lm" "output_dir=$out/fsdp" max_steps=10 report_to=none --quiet
$py -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('$out/fsdp/final'); print('fsdp final loads')"

# memory at real shapes, each contender in a fresh process (torch.cuda.max_memory_allocated on the GPU)
$py benchmarks/text_memory.py --shapes both --json "$out/text_memory.json" | tee "$out/text_memory.txt"

#!/usr/bin/env bash
# Generate images with a trained SDXL LoRA: checks the config in milliseconds (model folder, LoRA file, prompts),
# then runs ai/lora/infer_lora_sdxl.py under accelerate (N processes split the work list).
#
#   bash ai/lora/run_lora_infer.sh [config/lora_infer.yaml] [key=value ...]
#
# Examples:
#   bash ai/lora/run_lora_infer.sh                                        # config/lora_infer.yaml, 1 GPU
#   bash ai/lora/run_lora_infer.sh config/lora_infer.yaml paths.lora_weights_path=runs/lora_train/checkpoint-500
#   bash ai/lora/run_lora_infer.sh config/lora_infer.yaml prompt=null captions_csv=csv/bdd_hf_dataset_lora_train.csv max_prompts=100
#   ACCELERATE_CONFIG=config/accelerate_config_multi_gpu.yaml bash ai/lora/run_lora_infer.sh   # all GPUs
#   ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/lora/run_lora_infer.sh config/demo/lora_infer.yaml
#
# Environment: ACCELERATE_CONFIG (default config/accelerate_config_a100_single.yaml), PYTHON, and .env at the repo
# root (MODEL_DIR, VAE_DIR, BDD_DATA_DIR that the config names as ${MODEL_DIR} ...; a variable already set
# wins over the file). A rerun skips the images already made.
set -euo pipefail
# shellcheck source=../common/launch.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/common/launch.sh"
launch_stage ai.lora.infer_lora_sdxl config/lora_infer.yaml "$@"

#!/usr/bin/env bash
# Train an SDXL LoRA: checks the config in milliseconds, then runs ai/lora/train_lora_sdxl.py under accelerate.
#
#   bash ai/lora/run_lora_train.sh [config/lora_train.yaml] [key=value ...]
#
# Examples:
#   bash ai/lora/run_lora_train.sh                                        # config/lora_train.yaml, 1 GPU
#   bash ai/lora/run_lora_train.sh config/lora_train.yaml optim.learning_rate=5e-5 output.name=try2
#   ACCELERATE_CONFIG=config/accelerate_config_multi_gpu.yaml bash ai/lora/run_lora_train.sh
#   ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/lora/run_lora_train.sh config/demo/lora_train.yaml
#
# Environment: ACCELERATE_CONFIG (default config/accelerate_config_a100_single.yaml), PYTHON, and .env at the repo
# root (MODEL_DIR and VAE_DIR, which the config names as ${MODEL_DIR}, and WANDB_API_KEY; a variable
# already set wins over the file). Resume a run with checkpoint.resume_from=latest.
set -euo pipefail
# shellcheck source=../common/launch.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/common/launch.sh"
launch_stage ai.lora.train_lora_sdxl config/lora_train.yaml "$@"

#!/usr/bin/env bash
# Train an SDXL ControlNet on segmentation masks: checks the config in milliseconds, then runs
# ai/controlnet/train_controlnet_sdxl.py under accelerate.
#
#   bash ai/controlnet/run_controlnet_train.sh [config/controlnet_train.yaml] [key=value ...]
#
# Examples:
#   bash ai/controlnet/run_controlnet_train.sh                                  # config/controlnet_train.yaml, 1 GPU
#   bash ai/controlnet/run_controlnet_train.sh config/controlnet_train.yaml controlnet.conditioning=one_hot
#   ACCELERATE_CONFIG=config/accelerate_config_multi_gpu.yaml bash ai/controlnet/run_controlnet_train.sh
#   ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_train.sh \
#       config/demo/controlnet_train.yaml
#
# Environment: ACCELERATE_CONFIG (default config/accelerate_config_a100_single.yaml), PYTHON, and .env at the repo
# root (MODEL_DIR and VAE_DIR, which the config names as ${MODEL_DIR}, and WANDB_API_KEY; a variable
# already set wins over the file). Resume a run with checkpoint.resume_from=latest.
set -euo pipefail
# shellcheck source=../common/launch.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/common/launch.sh"
launch_stage ai.controlnet.train_controlnet_sdxl config/controlnet_train.yaml "$@"

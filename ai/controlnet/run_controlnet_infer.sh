#!/usr/bin/env bash
# Generate traffic scenes that follow BDD100K segmentation masks with a trained SDXL ControlNet: checks the config in
# about a second (model and ControlNet folders and their fit, masks, captions), then runs
# ai/controlnet/infer_controlnet_sdxl.py under accelerate (N processes split the work list).
#
#   bash ai/controlnet/run_controlnet_infer.sh [config/controlnet_infer.yaml] [key=value ...]
#
# Examples:
#   bash ai/controlnet/run_controlnet_infer.sh                            # config/controlnet_infer.yaml, 1 GPU
#   bash ai/controlnet/run_controlnet_infer.sh config/controlnet_infer.yaml controlnet_conditioning_scale=0.7
#   bash ai/controlnet/run_controlnet_infer.sh config/controlnet_infer.yaml paths.captions_path=null prompt="A snowy street"
#   ACCELERATE_CONFIG=config/accelerate_config_multi_gpu.yaml bash ai/controlnet/run_controlnet_infer.sh   # all GPUs
#   ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_infer.sh config/demo/controlnet_infer.yaml
#
# Environment: ACCELERATE_CONFIG (default config/accelerate_config_a100_single.yaml), PYTHON, and .env at the repo
# root (MODEL_DIR, VAE_DIR, BDD_DATA_DIR that the config names as ${MODEL_DIR} ...; a variable already set
# wins over the file). A rerun skips the images already made.
set -euo pipefail
# shellcheck source=../common/launch.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/common/launch.sh"
launch_stage ai.controlnet.infer_controlnet_sdxl config/controlnet_infer.yaml "$@"

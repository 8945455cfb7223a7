#!/usr/bin/env bash
# The loop: diagnose the detector on real val frames, plan scenes for its weakest cells, generate them with the
# box-layout ControlNet, label them, measure the gain, report before/after (annotation/run_loop.py; every key is
# documented in config/loop.yaml). Each step runs as its stage's own command, logged to <out>/loop.log; a rerun keeps
# the steps that are up to date and resumes the one that was interrupted.
#
#   bash annotation/run_loop.sh [config/loop.yaml] [--check] [key=value ...]
#
# Examples:
#   bash annotation/run_loop.sh config/loop.yaml --check                      # validate, print which steps would run
#   bash annotation/run_loop.sh config/loop.yaml gain.train.device=0 gain.design.seeds=[0,1,2]
#   ACCELERATE_CONFIG=config/accelerate_config_multi_gpu.yaml bash annotation/run_loop.sh   # generation on all GPUs
#
# Environment: PYTHON (default: the repo's .venv if present, else python), ACCELERATE_CONFIG (generation's, unless the
# config's accelerate_config is set), and .env at the repo root (YOLO_MODEL, BDD_DATA_DIR, MODEL_DIR ... that the
# config names as ${YOLO_MODEL}; a variable already set wins over the file).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo_root/.venv/bin/python" ]]; then py="$repo_root/.venv/bin/python"; else py="python"; fi
fi
env_exports="$(cd "$repo_root" && "$py" -m core.envfile)" || exit 2
eval "$env_exports"
config="config/loop.yaml"
if [[ $# -gt 0 && "$1" != *=* && "$1" != -* ]]; then
  config="$1"
  shift
fi
if [[ ! -f "$config" && -f "$repo_root/$config" ]]; then config="$repo_root/$config"; fi
[[ -f "$config" ]] || { echo "error: config not found: $config" >&2; exit 2; }
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m annotation.run_loop --config "$config" "$@"

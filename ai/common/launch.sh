#!/usr/bin/env bash
# Shared by the stage launchers (ai/*/run_*.sh): choose the config, check it in milliseconds, then hand over to
# `accelerate launch`. Bash never parses YAML; the Python module's --check does, and prints every error at once.
#
#   launch_stage MODULE DEFAULT_CONFIG [CONFIG.yaml] [key=value ...]
#
# Environment: ACCELERATE_CONFIG (default config/accelerate_config_a100_single.yaml), ACCELERATE_ARGS (extra
# `accelerate launch` flags that override the config file, e.g. "--machine_rank 1" on a second node), PYTHON
# (default: the repo's .venv if present, else python). The .env file at the repo root (from .env.example) is
# loaded first by core/envfile.py, the same reader the Python stages use: variables already set in the
# environment win over the file, and configs name them as ${MODEL_DIR} or ${VAE_DIR:-}.
set -euo pipefail

launch_stage() {
  local module="$1" default_config="$2"
  shift 2
  local repo_root
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  local py="${PYTHON:-}"
  if [[ -z "$py" ]]; then
    if [[ -x "$repo_root/.venv/bin/python" ]]; then py="$repo_root/.venv/bin/python"; else py="python"; fi
  fi
  local env_exports
  env_exports="$(cd "$repo_root" && "$py" -m core.envfile)" || exit 2
  eval "$env_exports"
  local config="$default_config"
  if [[ $# -gt 0 && "$1" != *=* ]]; then
    config="$1"
    shift
  fi
  if [[ ! -f "$config" && -f "$repo_root/$config" ]]; then config="$repo_root/$config"; fi
  [[ -f "$config" ]] || { echo "error: config not found: $config" >&2; exit 2; }
  local accel_cfg="${ACCELERATE_CONFIG:-$repo_root/config/accelerate_config_a100_single.yaml}"
  [[ -f "$accel_cfg" ]] || { echo "error: accelerate config not found: $accel_cfg (set ACCELERATE_CONFIG)" >&2; exit 2; }
  local -a accel_args=()
  read -r -a accel_args <<<"${ACCELERATE_ARGS:-}"
  "$py" -m "$module" --config "$config" --check "$@"
  exec "$py" -m accelerate.commands.launch --config_file "$accel_cfg" "${accel_args[@]}" \
    -m "$module" --config "$config" "$@"
}

#!/usr/bin/env bash
# The main job: set up, then pretrain a small DeepSeek-V3-style MoE offline, save, reload and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/hf-moe demo "$@"

#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 python -m pytest -q "$@"

#!/usr/bin/env bash
# Install the playground and its test tools into the current Python environment.
# CPU torch goes in first where no torch is present: a bare `torch` requirement would pull a
# multi-GB CUDA build. On machines without a local CPU wheel, set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[test]"

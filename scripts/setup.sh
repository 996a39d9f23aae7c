#!/usr/bin/env bash
# Create .venv and install mugv with its extras on a fresh machine.
# The CPU build of torch is installed first and explicitly, so that no
# dependency resolution pulls a multi-GB CUDA build. On GPU machines set
# TORCH_SPEC to the CUDA build you want (e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
EXTRAS=${EXTRAS:-dev,video,text,logging,curate,demo}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
.venv/bin/python -c "import torch, megatron.core; print('mugv setup ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__)"

#!/usr/bin/env bash
# Train on several nodes: run this once on EVERY node, with the same arguments.
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 \
#       scripts/train_multi_node.sh CONFIG [--root DIR] [--dry-run] [key=value ...]
#
# A stage config runs one torchrun with c10d rendezvous at MASTER_ADDR:MASTER_PORT and
# NPROC_PER_NODE processes per node (default: the node's GPUs). A curriculum (a file with a
# top-level `stages:` key) runs `mugv curriculum` on every node; it reads the same variables and
# starts one rendezvous per stage (each stage must ask for nnodes = NNODES). Run dirs and data
# must be on a file system every node sees. --dry-run prints layouts and memory estimates for
# world size NNODES x NPROC_PER_NODE and starts nothing. RDZV_ID (default: mugv) names the
# rendezvous of a stage run. On SIGUSR1 / SIGTERM the training processes save and exit: `mugv
# train` and `mugv curriculum` relay the signal to them without torchrun's 30 s deadline.
set -euo pipefail

usage() { sed -n '5,6p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
CONFIG=$1
shift
[ -f "$CONFIG" ] || { echo "config file not found: $CONFIG" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

ROOT=()
DRY=()
OVERRIDES=()
while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=(--root "${2:?--root needs a value}"); shift 2 ;;
        --dry-run) DRY=(--dry-run); shift ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
fi
if [ ${#DRY[@]} -gt 0 ]; then  # describe only: no rendezvous, so the variables may be unset
    if grep -Eq '^stages:' "$CONFIG"; then
        exec "$PYTHON" -m mugv.cli.main curriculum "$CONFIG" "${ROOT[@]}" --dry-run "${OVERRIDES[@]}"
    fi
    exec "$PYTHON" -m mugv.cli.main train "$CONFIG" --dry-run --nproc "$NPROC_PER_NODE" "${OVERRIDES[@]}"
fi

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node: 0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host of node 0)}"
: "${MASTER_PORT:?set MASTER_PORT (a free port on node 0)}"
export NNODES NODE_RANK MASTER_ADDR MASTER_PORT

if grep -Eq '^stages:' "$CONFIG"; then
    exec "$PYTHON" -m mugv.cli.main curriculum "$CONFIG" "${ROOT[@]}" "${OVERRIDES[@]}"
fi
[ ${#ROOT[@]} -eq 0 ] || { echo "--root is for curricula; set run_dir=... for a stage" >&2; exit 2; }
# `mugv train --nproc` starts torchrun with the c10d rendezvous from these variables
# (mugv.parallel.launch) and relays SIGUSR1 / SIGTERM to the training processes
export RDZV_ID=${RDZV_ID:-mugv}
exec "$PYTHON" -m mugv.cli.main train "$CONFIG" --nproc "$NPROC_PER_NODE" "${OVERRIDES[@]}"

#!/usr/bin/env bash
# Train on one machine: a stage config (one torchrun of `mugv train`) or a curriculum
# (`mugv curriculum`, which starts one torchrun per stage itself).
#
#   scripts/train_single_node.sh CONFIG [--nproc N] [--root DIR] [--dry-run] [key=value ...]
#
# CONFIG is a curriculum when it has a top-level `stages:` key (configs/curriculum/); then the
# process counts come from the file and --root sets where the stage run dirs go. For a stage,
# --nproc (default: the number of GPUs, else 1) is the number of processes. --dry-run prints the
# resolved layout and memory estimate and starts nothing. key=value overrides are passed on.
# SIGUSR1 / SIGTERM make the trainer save a checkpoint and exit (relayed to the training processes).
set -euo pipefail

usage() { sed -n '5p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
CONFIG=$1
shift
[ -f "$CONFIG" ] || { echo "config file not found: $CONFIG" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

NPROC=""
ROOT=()
DRY=()
OVERRIDES=()
while [ $# -gt 0 ]; do
    case $1 in
        --nproc) NPROC=${2:?--nproc needs a value}; shift 2 ;;
        --root) ROOT=(--root "${2:?--root needs a value}"); shift 2 ;;
        --dry-run) DRY=(--dry-run); shift ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done

if grep -Eq '^stages:' "$CONFIG"; then
    [ -z "$NPROC" ] || { echo "--nproc: a curriculum gives each stage's nproc itself" >&2; exit 2; }
    exec "$PYTHON" -m mugv.cli.main curriculum "$CONFIG" "${ROOT[@]}" "${DRY[@]}" "${OVERRIDES[@]}"
fi
[ ${#ROOT[@]} -eq 0 ] || { echo "--root is for curricula; set run_dir=... for a stage" >&2; exit 2; }
if [ -z "$NPROC" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$NPROC" -ge 1 ] || NPROC=1
fi
# `mugv train --nproc` starts torchrun itself (mugv.parallel.launch) and relays the signals
exec "$PYTHON" -m mugv.cli.main train "$CONFIG" --nproc "$NPROC" "${DRY[@]}" "${OVERRIDES[@]}"

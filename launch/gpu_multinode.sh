#!/usr/bin/env bash
# Train o3lite across several GPU nodes: run this script once on EVERY node.
#
# Each node runs one process that drives all of its GPUs:
#   python -m o3lite.train --config=CONFIG --workdir=WORKDIR \
#       --coordinator_address=HOST:PORT --num_processes=N --process_id=I [EXTRA...]
# o3lite passes these to jax.distributed.initialize(); the GPUs of all nodes form one
# mesh. Set-up on every node, from the repository root:
#   pip install -e . && pip install 'jax[cuda12]'
#
# Usage (on each node; relative paths are taken from the repository root):
#   launch/gpu_multinode.sh --coordinator=HOST:PORT --num_processes=N --process_id=I \
#       --workdir=DIR [--config=FILE] [-- EXTRA_FLAGS...]
# Options (each may instead come from the environment variable in brackets):
#   --coordinator=HOST:PORT  process 0's address, reachable from every node [COORDINATOR]
#   --num_processes=N        number of nodes (processes)                  [NUM_PROCESSES]
#   --process_id=I           this node's index, 0 .. N-1; 0 runs on HOST     [PROCESS_ID]
#   --workdir=DIR            run folder on storage every node sees              [WORKDIR]
#   --config=FILE            config file (default configs/sft.py)                [CONFIG]
#   -h, --help               this text
# Under SLURM (`srun --nodes=N --ntasks-per-node=1 launch/gpu_multinode.sh ...`) the
# defaults come from SLURM_NTASKS, SLURM_PROCID and the first host of the allocation
# (port 12345 unless COORDINATOR_PORT is set).
# Everything after `--` is passed to o3lite.train, e.g. -- --config.loop.num_steps=5000
# The interpreter is $PYTHON (default python3). tests/test_multiprocess.py runs this
# script as two CPU processes on one machine.
#
# Example, two nodes (node0 is process 0):
#   node0$ launch/gpu_multinode.sh --coordinator=node0:12345 --num_processes=2 \
#              --process_id=0 --workdir=/nfs/runs/sft1
#   node1$ launch/gpu_multinode.sh --coordinator=node0:12345 --num_processes=2 \
#              --process_id=1 --workdir=/nfs/runs/sft1

set -euo pipefail

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

if [[ -n "${SLURM_JOB_NODELIST:-}" && -z "${COORDINATOR:-}" ]]; then
  first_host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  COORDINATOR="$first_host:${COORDINATOR_PORT:-12345}"
fi
COORDINATOR="${COORDINATOR:-}"
NUM_PROCESSES="${NUM_PROCESSES:-${SLURM_NTASKS:-}}"
PROCESS_ID="${PROCESS_ID:-${SLURM_PROCID:-}}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/sft.py}"
PYTHON="${PYTHON:-python3}"
EXTRA=()

while (($#)); do
  case "$1" in
    --coordinator=*) COORDINATOR="${1#*=}" ;;
    --num_processes=*) NUM_PROCESSES="${1#*=}" ;;
    --process_id=*) PROCESS_ID="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_multinode.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

missing=()
[[ -n "$COORDINATOR" ]] || missing+=("--coordinator (COORDINATOR)")
[[ -n "$NUM_PROCESSES" ]] || missing+=("--num_processes (NUM_PROCESSES)")
[[ -n "$PROCESS_ID" ]] || missing+=("--process_id (PROCESS_ID)")
[[ -n "$WORKDIR" ]] || missing+=("--workdir (WORKDIR)")
if ((${#missing[@]})); then
  echo "gpu_multinode.sh: missing ${missing[*]}" >&2
  usage >&2
  exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "$PYTHON" -m o3lite.train --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
    --process_id="$PROCESS_ID" ${EXTRA[@]+"${EXTRA[@]}"}

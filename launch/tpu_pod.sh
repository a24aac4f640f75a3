#!/usr/bin/env bash
# Train o3lite on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5e-16).
#
# Copies this checkout (tracked files, as in the working tree) to every worker, over the
# previous copy if any, installs it with `pip install -e .` and `pip install 'jax[tpu]'`,
# then runs on all workers at once:
#   python -m o3lite.train --config=CONFIG --workdir=WORKDIR --multiprocess [EXTRA...]
# With --multiprocess o3lite calls jax.distributed.initialize(), which finds the other
# workers of the slice by itself; all their chips form one mesh.
#
# Usage:
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=DIR [options] [-- EXTRA_FLAGS...]
# Options (each may instead come from the environment variable in brackets):
#   --name=NAME        TPU VM name                                        [TPU_NAME]
#   --zone=ZONE        its zone, e.g. us-central2-b                       [ZONE]
#   --project=PROJECT  GCP project (default: gcloud's)                    [PROJECT]
#   --workdir=DIR      run folder on storage every worker sees            [WORKDIR]
#   --config=FILE      config file (default configs/sft.py)               [CONFIG]
#   --remote_dir=DIR   checkout on the workers (default ~/o3lite)         [REMOTE_DIR]
#   --no_setup         skip copy and install (code already there)         [SKIP_SETUP=1]
#   -h, --help         this text
# Everything after `--` is passed to o3lite.train, e.g. -- --config.loop.num_steps=5000
#
# WORKDIR must be one path that every worker can write: checkpoints are written by all
# processes together and read back by all. See launch/README.md for what works today.
# The same WORKDIR again resumes from its latest checkpoint.
#
# Example:
#   launch/tpu_pod.sh --name=my-v4-32 --zone=us-central2-b \
#       --workdir=/mnt/shared/runs/sft1 -- --config.loop.num_steps=5000

set -euo pipefail

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/sft.py}"
REMOTE_DIR="${REMOTE_DIR:-o3lite}"
SKIP_SETUP="${SKIP_SETUP:-0}"
EXTRA=()

while (($#)); do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --no_setup) SKIP_SETUP=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

missing=()
[[ -n "$TPU_NAME" ]] || missing+=("--name (TPU_NAME)")
[[ -n "$ZONE" ]] || missing+=("--zone (ZONE)")
[[ -n "$WORKDIR" ]] || missing+=("--workdir (WORKDIR)")
if ((${#missing[@]})); then
  echo "tpu_pod.sh: missing ${missing[*]}" >&2
  usage >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && where+=(--project="$PROJECT")

on_all_workers() {  # Run one shell command on every worker, in parallel.
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "$SKIP_SETUP" != 1 ]]; then
  tarball="$(mktemp -d)/o3lite.tar.gz"
  trap 'rm -rf "$(dirname "$tarball")"' EXIT
  # Tracked files, with their uncommitted edits: what you run is what you see.
  (cd "$repo_root" && git ls-files -z | tar --null -T - -czf "$tarball")
  echo "copying $(du -h "$tarball" | cut -f1) checkout to every worker of $TPU_NAME"
  "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:o3lite.tar.gz" "${where[@]}" --worker=all
  on_all_workers "set -euo pipefail
    mkdir -p $(printf '%q' "$REMOTE_DIR")
    tar -xzf ~/o3lite.tar.gz -C $(printf '%q' "$REMOTE_DIR")
    cd $(printf '%q' "$REMOTE_DIR")
    python3 -m pip install -q -e .
    python3 -m pip install -q 'jax[tpu]'"
fi

train_cmd=(python3 -m o3lite.train --config="$CONFIG" --workdir="$WORKDIR" --multiprocess
           ${EXTRA[@]+"${EXTRA[@]}"})
echo "running on all workers: ${train_cmd[*]}"
on_all_workers "set -euo pipefail; cd $(printf '%q' "$REMOTE_DIR")
  $(printf '%q ' "${train_cmd[@]}")"

#!/usr/bin/env bash
# Launch GeoMeld-FM pretraining on one multi-GPU host: one JAX process drives every local GPU.
#
# Usage:
#   launch/gpu.sh [--dry-run] --config=configs/pretrain.py:<variant> --workdir=<local dir> [-- --config.a.b=v ...]
#
# --config / --workdir fall back to $CONFIG / $WORKDIR. The git SHA and the command line are
# recorded in <workdir>/launch/<time>.txt and the output is appended to <workdir>/train.log.
# Extra XLA flags can be added through $XLA_FLAGS; the GPU defaults below come first so that
# a flag repeated in $XLA_FLAGS wins.
set -euo pipefail

# The latency-hiding scheduler overlaps collectives (gradient all-reduce, FSDP all-gathers)
# with compute; without it they serialise with the convolutions.
readonly GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

DRY_RUN=0
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
OVERRIDES=()
PYTHON="${PYTHON:-python}"

die() { echo "gpu.sh: error: $*" >&2; exit 2; }

while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (config overrides go after --; see --help)" ;;
  esac
  shift
done
[[ -n "$CONFIG" ]] || die "CONFIG is not set: pass --config=configs/pretrain.py:<variant> or export CONFIG"
[[ -n "$WORKDIR" ]] || die "WORKDIR is not set: pass --workdir=<dir> or export WORKDIR"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHA="$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$SHA" != unknown && -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
  SHA="$SHA-dirty"
fi
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
GPU_COUNT="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"

CMD=("$PYTHON" -m geomeld_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
export XLA_FLAGS="$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
# JAX preallocates 75% of GPU memory by default; the training process is the only user here.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/jax_cache}"
export GEOMELD_GIT_SHA="$SHA"

RECORD="git_sha: $SHA
run_id: $RUN_ID
host: $(hostname) (${GPU_COUNT:-0} GPUs)
XLA_FLAGS: $XLA_FLAGS
command: $(printf '%q ' "${CMD[@]}")"

cd "$REPO_ROOT"
if (( DRY_RUN )); then
  printf '%s\n' "$RECORD" | sed 's/^/# launch record: /'
  echo "XLA_FLAGS=$(printf '%q' "$XLA_FLAGS") XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" \
    "JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$JAX_COMPILATION_CACHE_DIR") GEOMELD_GIT_SHA=$SHA" \
    "$(printf '%q ' "${CMD[@]}")2>&1 | tee -a $(printf '%q' "$WORKDIR/train.log")"
  exit 0
fi
mkdir -p "$WORKDIR/launch"
printf '%s\n' "$RECORD" > "$WORKDIR/launch/$RUN_ID.txt"
"${CMD[@]}" > >(tee -a "$WORKDIR/train.log") 2>&1 &
TRAIN_PID=$!
# A SIGTERM or Ctrl-C sent to this script (a scheduler, `docker stop`, `kill`) goes on to the
# trainer as SIGTERM, which checkpoints the next step and stops; this script then exits with the
# trainer's status. (A background job of a script ignores SIGINT itself, so Ctrl-C needs this.)
trap 'kill -TERM "$TRAIN_PID" 2>/dev/null || true' TERM INT
status=0
wait "$TRAIN_PID" || status=$?
while kill -0 "$TRAIN_PID" 2>/dev/null; do  # the trap cut the first wait short
  status=0
  wait "$TRAIN_PID" || status=$?
done
exit "$status"

#!/usr/bin/env bash
# Launch GeoMeld-FM pretraining on a Cloud TPU VM pod slice.
#
# Usage:
#   launch/tpu.sh [--dry-run] [flags] create [--spot|--reserved]
#   launch/tpu.sh [--dry-run] [flags] setup [--data-bucket=gs://BUCKET]
#   launch/tpu.sh [--dry-run] [flags] run --config=configs/pretrain.py:<variant> [--data-bucket=gs://BUCKET] [-- --config.a.b=v ...]
#   launch/tpu.sh [--dry-run] [flags] logs
#   launch/tpu.sh [--dry-run] [flags] stop
#   launch/tpu.sh [--dry-run] [flags] delete
#
# Flags (each falls back to the environment variable in brackets):
#   --tpu-name [TPU_NAME]  --zone [ZONE]  --project [PROJECT]
#   --accelerator-type [ACCELERATOR_TYPE], e.g. v5p-32    (create)
#   --runtime-version [TPU_RUNTIME_VERSION], default by generation: v2-alpha-tpuv5 (v5p),
#       v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4 and older)
#   --workdir [WORKDIR], e.g. gs://bucket/geomeld/run1   (run). Every host writes its part
#       of each checkpoint there, so a multi-host slice needs gs:// (or a shared mount); the
#       run refuses to start when the hosts do not see the same workdir.
#   --data-bucket [DATA_BUCKET], e.g. gs://my-data   (setup installs gcsfuse, run mounts it
#       read-only at --data-mount [DATA_MOUNT], default /tmp/gcsfuse). ArrayRecord cannot read
#       gs:// itself (google/array_record#120), so the dataset is read through the mount:
#       --config.input.data_dir=/tmp/gcsfuse/<path in the bucket>.
#   --dry-run  print every gcloud/git command instead of running it (needs no gcloud)
#
# Every worker runs the same code: `setup` ships `git archive` of the local HEAD commit,
# unpacked into ~/geomeld/src/<sha>; `run` refuses to start unless that SHA is set up there.
# Uncommitted changes are NOT shipped.
#
# Example (first, on this machine, check that the step compiles and fits the slice's HBM:
#   python -m geomeld_jax.aot --config=configs/pretrain.py:base --topology=v5p:2x2x4 [--config.a.b=v]):
#   export TPU_NAME=geomeld-v5p ZONE=us-east5-a PROJECT=my-proj ACCELERATOR_TYPE=v5p-32
#   launch/tpu.sh create --spot   # queued: setup once `gcloud compute tpus queued-resources
#                                 # describe $TPU_NAME` says ACTIVE (spot capacity can take a while)
#   launch/tpu.sh setup --data-bucket=gs://my-data
#   launch/tpu.sh run --workdir=gs://my-bucket/geomeld/base1 --config=configs/pretrain.py:base \
#       --data-bucket=gs://my-data -- --config.input.data_dir=/tmp/gcsfuse/geomeld
set -euo pipefail

readonly REMOTE_ROOT='~/geomeld'  # expanded by the worker's shell, not here
readonly JAX_TPU_FIND_LINKS='https://storage.googleapis.com/jax-releases/libtpu_releases.html'

DRY_RUN=0
CAPACITY=""
CONFIG="${CONFIG:-}"
OVERRIDES=()
TPU_RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
DATA_BUCKET="${DATA_BUCKET:-}"
DATA_BUCKET_FLAG=0  # --data-bucket typed on the command line (an exported one applies quietly)
DATA_MOUNT="${DATA_MOUNT:-/tmp/gcsfuse}"

die() { echo "tpu.sh: error: $*" >&2; exit 2; }

# Print a command the way a shell would read it back (single quotes only where needed).
quote_cmd() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# Run a command, or only print it under --dry-run.
run_cmd() {
  if (( DRY_RUN )); then
    quote_cmd "$@"
  else
    "$@"
  fi
}

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "$name is not set: export $name=... or pass --$(echo "$name" | tr 'A-Z_' 'a-z-')=..."
  done
}

require_gcloud() {
  (( DRY_RUN )) || command -v gcloud >/dev/null || die "gcloud is not installed (use --dry-run to print the commands)"
}

local_sha() {
  git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || die "$REPO_ROOT is not a git checkout; cannot name the code revision"
}

tpu_ssh() {  # tpu_ssh <worker> <remote command>
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker="$1" --command="$2"
}

# The worker-side shell lines that install gcsfuse (setup) and mount DATA_BUCKET (run); both
# idempotent. Mount flags as maxtext's setup_gcsfuse.sh: read-only, metadata cached for the
# whole run (the dataset does not change under a run).
gcsfuse_install_lines() {
  [[ -n "$DATA_BUCKET" ]] || return 0
  cat <<EOS
if ! command -v gcsfuse >/dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
EOS
}

gcsfuse_mount_lines() {
  [[ -n "$DATA_BUCKET" ]] || return 0
  local bucket="${DATA_BUCKET#gs://}" mount
  bucket="${bucket%/}"
  mount="$(printf '%q' "$DATA_MOUNT")"
  cat <<EOS
command -v gcsfuse >/dev/null || { echo "gcsfuse is missing on \$(hostname): run launch/tpu.sh setup --data-bucket=$DATA_BUCKET" >&2; exit 1; }
mkdir -p $mount
if mountpoint -q $mount && [ "\$(findmnt -no SOURCE $mount)" != "$bucket" ]; then fusermount -u $mount; fi
mountpoint -q $mount || gcsfuse -o ro --implicit-dirs --type-cache-max-size-mb=-1 --stat-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1 --metadata-cache-ttl-secs=-1 $bucket $mount
EOS
}

# ---------------------------------------------------------------------------------------------
# Google's software versions per generation (cloud.google.com/tpu/docs/runtimes).
default_runtime() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

cmd_create() {
  require TPU_NAME ZONE PROJECT ACCELERATOR_TYPE
  require_gcloud
  [[ -n "$TPU_RUNTIME_VERSION" ]] || TPU_RUNTIME_VERSION="$(default_runtime "$ACCELERATOR_TYPE")"
  local capacity=()
  [[ -n "$CAPACITY" ]] && capacity=("--$CAPACITY")
  run_cmd gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --zone="$ZONE" --project="$PROJECT" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$TPU_RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"}
  echo "tpu.sh: queued; watch it with: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE --project=$PROJECT" >&2
}

cmd_setup() {
  require TPU_NAME ZONE PROJECT
  require_gcloud
  local sha archive
  sha="$(local_sha)"
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "tpu.sh: warning: uncommitted changes are not shipped; workers get commit $sha" >&2
  fi
  archive="/tmp/geomeld-$sha.tar.gz"
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz --output="$archive" "$sha"
  run_cmd gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:geomeld-$sha.tar.gz" \
    --zone="$ZONE" --project="$PROJECT" --worker=all
  # Idempotent: re-running unpacks the same SHA again, keeps an existing venv, and pip only
  # changes what differs. jax[tpu] goes through the same constraints so libtpu matches jax.
  local remote="set -euo pipefail
src=$REMOTE_ROOT/src/$sha
mkdir -p \$src $REMOTE_ROOT/logs
tar -xzf ~/geomeld-$sha.tar.gz -C \$src
echo $sha > \$src/GIT_SHA
# The project needs Python >= 3.11; TPU VM images ship Ubuntu 22.04's 3.10. uv fetches a
# standalone 3.11 then (--seed: with pip in the venv).
if [ ! -x $REMOTE_ROOT/venv/bin/python ]; then
  if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    python3 -m venv $REMOTE_ROOT/venv
  else
    python3 -m pip install -q --user uv
    python3 -m uv venv --seed --python 3.11 $REMOTE_ROOT/venv
  fi
fi
$REMOTE_ROOT/venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
$REMOTE_ROOT/venv/bin/pip install -q -U pip
$REMOTE_ROOT/venv/bin/pip install -q -c \$src/constraints.txt 'jax[tpu]' -f $JAX_TPU_FIND_LINKS
$REMOTE_ROOT/venv/bin/pip install -q -c \$src/constraints.txt -e \"\$src[tpu,gcs]\"
$(gcsfuse_install_lines)
touch \$src/.setup_done
echo \"geomeld $sha ready on \$(hostname)\""
  tpu_ssh all "$remote"
}

cmd_run() {
  require TPU_NAME ZONE PROJECT WORKDIR CONFIG
  require_gcloud
  local sha run_id overrides_q cmdline record
  sha="$(local_sha)"
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "tpu.sh: warning: uncommitted changes are not shipped; workers run commit $sha" >&2
  fi
  run_id="$(date -u +%Y%m%dT%H%M%SZ)"
  overrides_q=""
  if (( ${#OVERRIDES[@]} )); then
    overrides_q=" $(printf '%q ' "${OVERRIDES[@]}")"
    overrides_q="${overrides_q% }"
  fi
  cmdline="python -m geomeld_jax.main --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$overrides_q"
  # Kill whatever still holds the TPU (a crashed or orphaned earlier run): /dev/accel* on v2-v4,
  # /dev/vfio/* on v5e/v5p/v6e. libtpu refuses to start while its lock file exists.
  local remote="set -euo pipefail
src=$REMOTE_ROOT/src/$sha
[ -f \$src/.setup_done ] || { echo \"commit $sha is not set up on \$(hostname): run launch/tpu.sh setup\" >&2; exit 1; }
if [ -f $REMOTE_ROOT/run.pid ] && kill -0 -- -\$(cat $REMOTE_ROOT/run.pid) 2>/dev/null; then
  echo \"a run is still going on \$(hostname) (process group \$(cat $REMOTE_ROOT/run.pid)): launch/tpu.sh stop\" >&2; exit 1
fi
$(gcsfuse_mount_lines)
stale=\$(sudo lsof -t -w /dev/accel* /dev/vfio/* 2>/dev/null | sort -u || true)
if [ -n \"\$stale\" ]; then echo \"killing stale TPU users: \$stale\"; sudo kill -9 \$stale || true; sleep 2; fi
sudo rm -f /tmp/libtpu_lockfile
log=$REMOTE_ROOT/logs/run-$run_id-\$(hostname).log
ln -sfn \$log $REMOTE_ROOT/logs/latest.log
cd \$src
# JAX_PLATFORMS=tpu: a TPU that fails to start is an error, not a silent CPU run. setsid: the
# run and its data workers form one process group, which stop ends as a whole.
GEOMELD_DISTRIBUTED=1 GEOMELD_GIT_SHA=$sha JAX_PLATFORMS=tpu JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$WORKDIR/jax_cache") \
setsid nohup $REMOTE_ROOT/venv/bin/${cmdline} > \$log 2>&1 < /dev/null &
echo \$! > $REMOTE_ROOT/run.pid
echo \"started \$(cat $REMOTE_ROOT/run.pid) on \$(hostname), log \$log\""
  record="git_sha: $sha
run_id: $run_id
tpu: $TPU_NAME ($ZONE, $PROJECT)
command: $cmdline"
  # The record goes into the workdir from this machine (gs://) or from worker 0 (a path on
  # the workers' disk), before the run starts so a crash still leaves it behind.
  if [[ "$WORKDIR" == gs://* ]]; then
    if (( DRY_RUN )); then
      printf '%s\n' "$record" | sed 's/^/# launch record: /'
      quote_cmd gcloud storage cp - "$WORKDIR/launch/$run_id.txt"
    else
      printf '%s\n' "$record" | gcloud storage cp - "$WORKDIR/launch/$run_id.txt"
    fi
  else
    tpu_ssh 0 "mkdir -p $(printf '%q' "$WORKDIR/launch") && printf '%s\n' $(printf '%q' "$record") > $(printf '%q' "$WORKDIR/launch/$run_id.txt")"
  fi
  tpu_ssh all "$remote"
}

cmd_logs() {
  require TPU_NAME ZONE PROJECT
  require_gcloud
  tpu_ssh 0 "tail -n 100 $REMOTE_ROOT/logs/latest.log"
  tpu_ssh all "if grep -q Traceback $REMOTE_ROOT/logs/latest.log; then echo \"== \$(hostname): Traceback ==\"; grep -n -A 30 Traceback $REMOTE_ROOT/logs/latest.log | tail -n 60; fi"
}

cmd_stop() {
  require TPU_NAME ZONE PROJECT
  require_gcloud
  # SIGTERM lets the trainer save its preemption checkpoint; then up to 5 minutes for that
  # save before the whole process group (grain's data workers too) is killed.
  tpu_ssh all "if [ -f $REMOTE_ROOT/run.pid ]; then pgid=\$(cat $REMOTE_ROOT/run.pid)
if kill -TERM -- -\$pgid 2>/dev/null; then
  for i in \$(seq 300); do kill -0 \$pgid 2>/dev/null || break; sleep 1; done
  kill -KILL -- -\$pgid 2>/dev/null || true
  echo \"stopped process group \$pgid on \$(hostname)\"
else echo \"\$pgid already gone on \$(hostname)\"; fi
rm -f $REMOTE_ROOT/run.pid
else echo \"no recorded run on \$(hostname)\"; fi"
}

cmd_delete() {
  require TPU_NAME ZONE PROJECT
  require_gcloud
  run_cmd gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --force --quiet
}

# ---------------------------------------------------------------------------------------------
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUBCOMMAND=""
while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --tpu-name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) TPU_RUNTIME_VERSION="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data-bucket=*) DATA_BUCKET="${1#*=}"; DATA_BUCKET_FLAG=1 ;;
    --data-mount=*) DATA_MOUNT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --spot) CAPACITY=spot ;;
    --reserved) CAPACITY=reserved ;;
    --) shift; OVERRIDES=("$@"); break ;;
    create|setup|run|logs|stop|delete)
      [[ -z "$SUBCOMMAND" ]] || die "two subcommands given: $SUBCOMMAND and $1"
      SUBCOMMAND="$1" ;;
    -h|--help) sed -n '2,35p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ -n "$SUBCOMMAND" ]] || die "no subcommand: one of create, setup, run, logs, stop, delete (see --help)"
if (( ${#OVERRIDES[@]} )) && [[ "$SUBCOMMAND" != run ]]; then
  die "config overrides after -- only apply to 'run', not '$SUBCOMMAND'"
fi
if [[ -n "$DATA_BUCKET" ]]; then
  [[ "$DATA_BUCKET" =~ ^gs://[a-z0-9][a-z0-9._-]*/?$ ]] || die "--data-bucket takes a bucket, gs://NAME, not '$DATA_BUCKET' (pick the path inside it with --config.input.data_dir=$DATA_MOUNT/<path>)"
  if (( DATA_BUCKET_FLAG )) && [[ "$SUBCOMMAND" != setup && "$SUBCOMMAND" != run ]]; then
    die "--data-bucket only applies to 'setup' and 'run'"
  fi
fi
if [[ -n "$CAPACITY" && "$SUBCOMMAND" != create ]]; then
  die "--$CAPACITY only applies to 'create'"
fi
"cmd_$SUBCOMMAND"

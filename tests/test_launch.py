"""Dry runs of launch/tpu.sh and launch/gpu.sh: the printed commands, without gcloud or GPUs,
and the printed remote scripts run under bash on a fake TPU worker."""

import os
import pathlib
import shlex
import signal
import subprocess
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_SH = REPO_ROOT / "launch" / "tpu.sh"
GPU_SH = REPO_ROOT / "launch" / "gpu.sh"
TPU_ENV = dict(TPU_NAME="geomeld-test", ZONE="us-east5-a", PROJECT="proj-x", ACCELERATOR_TYPE="v5p-32",
               WORKDIR="gs://bucket/geomeld/run1")
BASH = subprocess.run(["which", "bash"], capture_output=True, text=True, check=True).stdout.strip()
OVERRIDES = ["--config.total_steps=1234", "--config.optim.lr=3e-4"]


def _head_sha() -> str:
  return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                        check=True).stdout.strip()


def _run(script: pathlib.Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  skip = ("CONFIG", "XLA_FLAGS", "DATA_BUCKET", "DATA_MOUNT", "TPU_RUNTIME_VERSION")
  base = {k: v for k, v in os.environ.items() if k not in TPU_ENV and k not in skip}
  return subprocess.run([BASH, str(script), *args], env={**base, **(env or {})}, capture_output=True,
                        text=True, timeout=30, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def sha() -> str:
  return _head_sha()


def test_create_spot_and_reserved():
  spot = _run(TPU_SH, "--dry-run", "create", "--spot", env=TPU_ENV)
  assert spot.returncode == 0, spot.stderr
  assert "gcloud compute tpus queued-resources create geomeld-test" in spot.stdout
  for part in ("--zone=us-east5-a", "--project=proj-x", "--accelerator-type=v5p-32", "--spot"):
    assert part in spot.stdout
  reserved = _run(TPU_SH, "--dry-run", "create", "--reserved", env=TPU_ENV)
  assert reserved.returncode == 0 and "--reserved" in reserved.stdout and "--spot" not in reserved.stdout
  # The software version follows the generation unless given.
  assert "--runtime-version=v2-alpha-tpuv5 " in spot.stdout + " "
  v4 = _run(TPU_SH, "--dry-run", "--accelerator-type=v4-8", "create", env=TPU_ENV)
  assert "--runtime-version=tpu-ubuntu2204-base" in v4.stdout
  given = _run(TPU_SH, "--dry-run", "--runtime-version=my-image", "create", env=TPU_ENV)
  assert "--runtime-version=my-image" in given.stdout


def test_setup_ships_the_head_sha_to_all_workers(sha):
  result = _run(TPU_SH, "--dry-run", "setup", env=TPU_ENV)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert f"archive --format=tar.gz --output=/tmp/geomeld-{sha}.tar.gz {sha}" in out
  scp = next(line for line in out.splitlines() if "tpu-vm scp" in line)
  assert sha in scp and "--worker=all" in scp
  ssh = out[out.index("tpu-vm ssh"):]
  assert "--worker=all" in ssh and f"src=~/geomeld/src/{sha}" in ssh
  assert "if [ ! -x ~/geomeld/venv/bin/python ]; then" in ssh  # idempotent venv
  # TPU images ship Python 3.10; the project needs 3.11 (uv fetches it).
  assert "uv venv --seed --python 3.11" in ssh and "sys.version_info >= (3, 11)" in ssh
  assert "jax[tpu]" in ssh and '-c $src/constraints.txt -e "$src[tpu,gcs]"' in ssh
  assert "gcsfuse" not in ssh  # only with --data-bucket


def test_data_bucket_is_installed_at_setup_and_mounted_before_the_run():
  setup = _run(TPU_SH, "--dry-run", "setup", "--data-bucket=gs://geo-data", env=TPU_ENV)
  assert setup.returncode == 0, setup.stderr
  assert "sudo apt-get install -y -q gcsfuse" in setup.stdout
  run = _run(TPU_SH, "--dry-run", "run", "--config=configs/pretrain.py:base", "--data-bucket=gs://geo-data",
             "--data-mount=/mnt/geo", "--", "--config.input.data_dir=/mnt/geo/geomeld", env=TPU_ENV)
  assert run.returncode == 0, run.stderr
  out = run.stdout
  mount = "mountpoint -q /mnt/geo || gcsfuse -o ro --implicit-dirs"
  assert mount in out and "geo-data /mnt/geo" in out
  assert out.index(mount) < out.rindex("python -m geomeld_jax.main")  # mounted before it starts
  for bad in ("gs://geo-data/geomeld", "geo-data"):
    result = _run(TPU_SH, "--dry-run", "run", "--config=configs/pretrain.py:base", f"--data-bucket={bad}",
                  env=TPU_ENV)
    assert result.returncode == 2 and "--data-bucket takes a bucket" in result.stderr
  stop = _run(TPU_SH, "--dry-run", "stop", "--data-bucket=gs://geo-data", env=TPU_ENV)
  assert stop.returncode == 2 and "only applies to 'setup' and 'run'" in stop.stderr
  # Exported (as the help suggests), the bucket must not block the other subcommands.
  for sub in ("stop", "logs", "delete"):
    assert _run(TPU_SH, "--dry-run", sub, env={**TPU_ENV, "DATA_BUCKET": "gs://geo-data"}).returncode == 0
  # A mount of another bucket is replaced, not reused.
  assert 'findmnt -no SOURCE /mnt/geo)" != "geo-data" ]; then fusermount -u /mnt/geo' in out


def test_run_cleans_stale_tpu_users_and_starts_detached(sha):
  result = _run(TPU_SH, "--dry-run", "run", "--config=configs/pretrain.py:base", "--", *OVERRIDES, env=TPU_ENV)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  ssh = out[out.index("tpu-vm ssh"):]
  assert "--worker=all" in ssh
  assert "lsof -t -w /dev/accel* /dev/vfio/*" in ssh and "rm -f /tmp/libtpu_lockfile" in ssh
  # Cleanup runs before the training process starts.
  assert ssh.index("libtpu_lockfile") < ssh.index("nohup")
  # A run still going is not killed as a stale TPU user: the launch refuses first.
  assert ssh.index("a run is still going") < ssh.index("lsof")
  assert "JAX_PLATFORMS=tpu" in ssh  # a TPU that fails to start is an error, not a CPU run
  assert "GEOMELD_DISTRIBUTED=1" in ssh and f"GEOMELD_GIT_SHA={sha}" in ssh
  assert ("setsid nohup ~/geomeld/venv/bin/python -m geomeld_jax.main --config=configs/pretrain.py:base "
          "--workdir=gs://bucket/geomeld/run1 " + " ".join(OVERRIDES)) in ssh
  assert "> $log 2>&1 < /dev/null &" in ssh and "$(hostname).log" in ssh  # per-worker log
  assert "echo $! > ~/geomeld/run.pid" in ssh
  assert f"src=~/geomeld/src/{sha}" in ssh and ".setup_done ]" in ssh
  # The SHA and the command are recorded into the workdir.
  assert f"# launch record: git_sha: {sha}" in out
  assert "gcloud storage cp - gs://bucket/geomeld/run1/launch/" in out
  record_cmd = next(line for line in out.splitlines() if line.startswith("# launch record: command:"))
  assert all(o in record_cmd for o in OVERRIDES)


def test_run_quotes_overrides_with_spaces():
  result = _run(TPU_SH, "--dry-run", "run", "--config=configs/pretrain.py:tiny", "--", "--config.name=two words",
                env=TPU_ENV)
  assert result.returncode == 0, result.stderr
  assert r"--config.name=two\ words" in result.stdout


def test_run_with_a_local_workdir_records_on_worker_0(sha):
  env = {**TPU_ENV, "WORKDIR": "/mnt/disk/run2"}
  result = _run(TPU_SH, "--dry-run", "run", "--config=configs/pretrain.py:base", env=env)
  assert result.returncode == 0, result.stderr
  record = next(line for line in result.stdout.splitlines() if "--worker=0" in line)
  assert "mkdir -p /mnt/disk/run2/launch" in record and sha in record


def test_logs_stop_delete():
  logs = _run(TPU_SH, "--dry-run", "logs", env=TPU_ENV)
  assert logs.returncode == 0, logs.stderr
  assert "--worker=0" in logs.stdout and "tail -n 100 ~/geomeld/logs/latest.log" in logs.stdout
  assert "--worker=all" in logs.stdout and "grep -q Traceback" in logs.stdout
  stop = _run(TPU_SH, "--dry-run", "stop", env=TPU_ENV)
  assert stop.returncode == 0 and "--worker=all" in stop.stdout
  # The run's whole process group (grain's data workers too), after its checkpoint.
  assert "kill -TERM -- -$pgid" in stop.stdout and "kill -KILL -- -$pgid" in stop.stdout
  assert stop.stdout.index("seq 300") < stop.stdout.index("kill -KILL")
  delete = _run(TPU_SH, "--dry-run", "delete", env=TPU_ENV)
  assert delete.returncode == 0
  assert "gcloud compute tpus queued-resources delete geomeld-test" in delete.stdout


def test_flags_replace_env():
  result = _run(TPU_SH, "--dry-run", "--tpu-name=other", "--zone=europe-west4-a", "--project=p2",
                "--accelerator-type=v5litepod-16", "create")
  assert result.returncode == 0, result.stderr
  assert "create other" in result.stdout and "--zone=europe-west4-a" in result.stdout


@pytest.mark.parametrize("subcommand,missing", [
    ("create", "ACCELERATOR_TYPE"), ("setup", "PROJECT"), ("run", "WORKDIR"), ("logs", "ZONE"),
    ("stop", "TPU_NAME"), ("delete", "PROJECT"),
])
def test_missing_settings_fail_clearly(subcommand, missing):
  env = {k: v for k, v in TPU_ENV.items() if k != missing}
  args = ["--dry-run", subcommand] + (["--config=configs/pretrain.py:base"] if subcommand == "run" else [])
  result = _run(TPU_SH, *args, env=env)
  assert result.returncode != 0
  assert f"{missing} is not set" in result.stderr
  assert "gcloud" not in result.stdout


def test_run_without_config_and_bad_arguments_fail():
  no_config = _run(TPU_SH, "--dry-run", "run", env=TPU_ENV)
  assert no_config.returncode != 0 and "CONFIG is not set" in no_config.stderr
  assert _run(TPU_SH, "--dry-run", env=TPU_ENV).returncode != 0
  bogus = _run(TPU_SH, "--dry-run", "frobnicate", env=TPU_ENV)
  assert bogus.returncode != 0 and "unknown argument 'frobnicate'" in bogus.stderr
  misplaced = _run(TPU_SH, "--dry-run", "setup", "--", "--config.x=1", env=TPU_ENV)
  assert misplaced.returncode != 0 and "only apply to 'run'" in misplaced.stderr


def test_without_dry_run_gcloud_is_required(tmp_path):
  # A PATH holding only the tools the script needs before its gcloud check, so that a gcloud
  # installed on this machine is never actually called.
  for tool in ("dirname", "tr"):
    (tmp_path / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True,
                                                check=True).stdout.strip())
  result = _run(TPU_SH, "setup", env={**TPU_ENV, "PATH": str(tmp_path)})
  assert result.returncode != 0 and "gcloud is not installed" in result.stderr


def test_gpu_dry_run(sha):
  result = _run(GPU_SH, "--dry-run", "--config=configs/pretrain.py:base", "--workdir=/tmp/geomeld-gpu", "--",
                *OVERRIDES, env={"XLA_FLAGS": "--xla_dump_to=/tmp/dump"})
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert f"git_sha: {sha}" in out
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in out
  assert "--xla_dump_to=/tmp/dump" in out  # the caller's XLA flags are kept, after the defaults
  assert ("python -m geomeld_jax.main --config=configs/pretrain.py:base --workdir=/tmp/geomeld-gpu "
          + " ".join(OVERRIDES)) in out
  assert "GEOMELD_DISTRIBUTED" not in out  # one process drives all local GPUs
  assert not pathlib.Path("/tmp/geomeld-gpu/launch").exists()


def test_gpu_missing_workdir_fails_clearly():
  result = _run(GPU_SH, "--dry-run", "--config=configs/pretrain.py:base")
  assert result.returncode != 0 and "WORKDIR is not set" in result.stderr


def test_gpu_launcher_passes_sigterm_on_to_the_trainer(tmp_path):
  # A stand-in trainer: says it started, and on SIGTERM says so and exits 0 (as the train loop
  # does after its preemption save).
  trainer = tmp_path / "trainer.sh"
  trainer.write_text("#!/usr/bin/env bash\ntrap 'echo got TERM; exit 0' TERM\necho started \"$@\"\n"
                     "for i in $(seq 300); do sleep 0.1; done\necho never signalled\nexit 3\n")
  trainer.chmod(0o755)
  workdir = tmp_path / "wd"
  launcher = subprocess.Popen([BASH, str(GPU_SH), "--config=configs/pretrain.py:atto", f"--workdir={workdir}"],
                              env={**os.environ, "PYTHON": str(trainer)}, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    assert launcher.stdout.readline().startswith("started -m geomeld_jax.main")
    launcher.send_signal(signal.SIGTERM)  # to the launcher only, as `kill <pid>` would
    out, _ = launcher.communicate(timeout=20)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 0, out
  assert "got TERM" in out and "never signalled" not in out
  assert "got TERM" in (workdir / "train.log").read_text()


def test_run_takes_an_exported_config():
  result = _run(TPU_SH, "--dry-run", "run", env={**TPU_ENV, "CONFIG": "configs/pretrain.py:tiny"})
  assert result.returncode == 0, result.stderr
  assert "--config=configs/pretrain.py:tiny" in result.stdout


def _remote_command(stdout: str) -> str:
  """The --command of the last `tpu-vm ssh --worker=all` line the dry run printed."""
  ssh = stdout[stdout.rindex("gcloud compute tpus tpu-vm ssh"):]
  return next(a for a in shlex.split(ssh) if a.startswith("--command="))[len("--command="):]


def _worker(tmp_path: pathlib.Path, sha: str) -> tuple[dict[str, str], pathlib.Path]:
  """A fake TPU worker: HOME with the SHA set up, a venv python that records its argv, and
  sudo/lsof stubs (no TPU, no root)."""
  home, stubs = tmp_path / "home", tmp_path / "bin"
  (home / "geomeld" / "src" / sha).mkdir(parents=True)
  (home / "geomeld" / "src" / sha / ".setup_done").touch()
  (home / "geomeld" / "logs").mkdir()  # as setup leaves them
  (home / "geomeld" / "venv" / "bin").mkdir(parents=True)
  python = home / "geomeld" / "venv" / "bin" / "python"
  python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/argv"\n'
                    'echo "$JAX_PLATFORMS" > "$HOME/platforms"\nexec sleep 300\n')
  stubs.mkdir()
  (stubs / "sudo").write_text('#!/usr/bin/env bash\nexec "$@"\n')
  (stubs / "lsof").write_text("#!/usr/bin/env bash\nexit 1\n")
  for f in (python, stubs / "sudo", stubs / "lsof"):
    f.chmod(0o755)
  return {"HOME": str(home), "PATH": f"{stubs}:{os.environ['PATH']}"}, home


def test_run_and_stop_commands_execute_on_a_fake_worker(tmp_path, sha):
  """The remote scripts themselves, under bash: overrides reach the trainer byte for byte, a
  second run is refused while the first is going, and stop ends its whole process group."""
  tricky = [*OVERRIDES, "--config.mesh=(('data',-1),('fsdp',4))", "--config.name=it's two words"]
  run = _run(TPU_SH, "--dry-run", "run", "--config=configs/pretrain.py:base", "--", *tricky,
             env=TPU_ENV)
  assert run.returncode == 0, run.stderr
  env, home = _worker(tmp_path, sha)
  remote = _remote_command(run.stdout)
  started = subprocess.run([BASH, "-c", remote], env=env, capture_output=True, text=True, timeout=30)
  assert started.returncode == 0, started.stderr
  pgid = int((home / "geomeld" / "run.pid").read_text())
  try:
    _check_started_then_stop(home, env, remote, pgid, tricky)
  finally:  # a failing check must not leave the fake trainer running
    try:
      os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _check_started_then_stop(home, env, remote, pgid, tricky):
  for _ in range(100):  # the stub writes argv, then the platform: wait for the second
    if (home / "platforms").exists() and (home / "platforms").read_text().strip():
      break
    time.sleep(0.1)
  argv = (home / "argv").read_text().splitlines()
  assert argv == ["-m", "geomeld_jax.main", "--config=configs/pretrain.py:base",
                  "--workdir=gs://bucket/geomeld/run1", *tricky]
  assert (home / "platforms").read_text().strip() == "tpu"
  assert os.getpgid(pgid) == pgid  # the trainer leads its own process group
  again = subprocess.run([BASH, "-c", remote], env=env, capture_output=True, text=True, timeout=30)
  assert again.returncode == 1 and "a run is still going" in again.stderr
  stop = _run(TPU_SH, "--dry-run", "stop", env=TPU_ENV)
  stopped = subprocess.run([BASH, "-c", _remote_command(stop.stdout)], env=env,
                           capture_output=True, text=True, timeout=60)
  assert stopped.returncode == 0 and f"stopped process group {pgid}" in stopped.stdout
  with pytest.raises(ProcessLookupError):
    os.killpg(pgid, 0)
  assert not (home / "geomeld" / "run.pid").exists()

"""CLI and safety: clear input errors, --overwrite, interrupted builds, Beam flags pass-through."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_prep import pipeline
from data_prep import splits
from data_prep import synthetic
from data_prep import tokenizer
from data_prep import writer

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
  d = tmp_path_factory.mktemp("cli") / "bad"
  synthetic.write_bad_shards(str(d))
  return str(d)


def _config(shards: str, out: pathlib.Path, **kw) -> pipeline.BuildConfig:
  return pipeline.BuildConfig(sources=(f"synthetic:{shards}",), output_dir=str(out),
                              split=splits.SplitConfig(fractions=(1.0, 0.0, 0.0)),
                              vocab_size=100, **kw)


def _leftovers(out: pathlib.Path) -> list[str]:
  return [str(p) for p in out.rglob("*")] if out.exists() else []


@pytest.mark.parametrize("spec, match", [
    ("synthetic:/nonexistent/geomeld/shards", "nonexistent"),
    ("geomeld:/tmp/*.does-not-match-anything.tar", "does-not-match"),
    ("nosuchscheme:/tmp", "unknown source spec"),
])
def test_bad_sources_fail_before_any_work(tmp_path, spec, match):
  with pytest.raises((FileNotFoundError, ValueError), match=match):
    pipeline.run_build(pipeline.BuildConfig(sources=(spec,), output_dir=str(tmp_path / "o")))
  assert not (tmp_path / "o").exists()


def test_one_file_through_two_specs_and_bad_settings_fail_before_any_work(tmp_path, shards):
  first = sorted(pathlib.Path(shards).glob("*.tar"))[0]
  with pytest.raises(ValueError, match="listed twice"):
    pipeline.run_build(pipeline.BuildConfig(
        sources=(f"synthetic:{first}", f"synthetic:{shards}/*.tar"), output_dir=str(tmp_path / "o")))
  with pytest.raises(ValueError, match="unknown compression 'lz4'"):
    _config(shards, tmp_path / "o", compression="lz4")
  with pytest.raises(ValueError, match="vocab_size must be >= 8"):
    pipeline.BuildConfig(sources=("synthetic:x",), output_dir="o", vocab_size=4)
  assert not (tmp_path / "o").exists()


def test_unknown_captioner_fails_early(tmp_path, shards):
  with pytest.raises(ValueError, match="unknown captioner"):
    pipeline.run_build(_config(shards, tmp_path / "o", captioner="nope"))
  assert not (tmp_path / "o").exists()


def test_overwrite_and_interrupted_builds(tmp_path, shards, monkeypatch):
  out = tmp_path / "out"
  first = pipeline.run_build(_config(shards, out))
  final = pathlib.Path(first.dataset_dir)
  assert first.manifest["written"] + first.manifest["rejections"].get(splits.BUFFER, 0) == (
      synthetic.BAD_SHARDS_GOOD_RECORDS)
  before = (final / "manifest.json").read_bytes()

  with pytest.raises(FileExistsError, match="--overwrite"):
    pipeline.run_build(_config(shards, out))

  # A failure inside the Beam pipeline (a shard write: a bad tile would only be a dead letter):
  # nothing new appears, the old dataset is untouched.
  real = writer.write_records

  def full_disk(*args, **kwargs):
    raise OSError("simulated full disk")

  monkeypatch.setattr(writer, "write_records", full_disk)
  with pytest.raises(Exception, match="simulated full disk"):
    pipeline.run_build(_config(shards, out, overwrite=True))
  monkeypatch.setattr(writer, "write_records", real)
  assert (final / "manifest.json").read_bytes() == before
  assert sorted(p.name for p in final.parent.iterdir()) == [final.name]

  # A failure after the pipeline (driver side, before commit): same guarantee.
  def broken(*args, **kwargs):
    raise RuntimeError("simulated tokenizer failure")

  monkeypatch.setattr(tokenizer, "train_tokenizer_bytes", broken)
  fresh = tmp_path / "fresh"
  with pytest.raises(RuntimeError, match="simulated tokenizer failure"):
    pipeline.run_build(_config(shards, fresh))
  assert _leftovers(fresh) == [str(fresh / "geomeld")]  # only the empty parent folder
  monkeypatch.undo()

  second = pipeline.run_build(_config(shards, out, overwrite=True))
  assert second.dataset_dir == first.dataset_dir
  assert json.loads((final / "manifest.json").read_text())["created_utc"]
  assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "data_prep.build", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_help_and_clear_error():
  help_text = _cli("--help").stdout
  for flag in ("--source", "--output_dir", "--overwrite", "--num_shards", "--auto_shard_mb",
               "--block_size_m", "--split_fractions", "--seed", "--vocab_size", "--captioner"):
    assert flag in help_text, flag
  bad = _cli("--source=synthetic:/nonexistent/dir", "--output_dir=/tmp/never-written")
  assert bad.returncode == 1
  assert "error:" in bad.stderr and "/nonexistent/dir" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_cli_build_with_beam_flags(tmp_path, shards):
  out = tmp_path / "cli"
  res = _cli(f"--source=synthetic:{shards}", f"--output_dir={out}", "--split_fractions=1,0,0",
             "--vocab_size=100", "--direct_num_workers=1", "--direct_running_mode=in_memory")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "written" in res.stdout and "samples/s" in res.stdout
  manifest = json.loads((out / "geomeld" / "1.0.0" / "manifest.json").read_text())
  assert manifest["flags"]["beam_args"] == ["--direct_num_workers=1",
                                            "--direct_running_mode=in_memory"]
  assert manifest["read"] == manifest["written"] + manifest["rejected"]

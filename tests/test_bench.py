"""The train-step benchmark script: case parsing and one tiny CPU run through its CLI."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import pretrain
from geomeld_jax import bench

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parse_case_types_overrides_by_the_config_value():
  fields = dict(pretrain.get_config("atto,mp_mae").model.items())
  assert bench.parse_case("mp_mae", fields) == ("mp_mae", {})
  assert bench.parse_case("mp_mae/stem=original/patch_size=32/text_causal=false", fields) == (
      "mp_mae", {"stem": "original", "patch_size": 32, "text_causal": False})
  with pytest.raises(ValueError, match="'stme=original' is not field=value for a model field"):
    bench.parse_case("mp_mae/stme=original", fields)
  with pytest.raises(ValueError, match="text_causal takes true/false"):
    bench.parse_case("mp_mae/text_causal=yes", fields)
  with pytest.raises(ValueError, match="jepa is set by the preset; name another preset"):
    bench.parse_case("mp_mae/jepa=true", fields)


@pytest.mark.slow
def test_cli_prints_one_json_line_per_case_with_its_profile(tmp_path):
  cmd = [sys.executable, "-m", "geomeld_jax.bench", "--config=configs/pretrain.py:smoke",
         "--objectives=encoder,encoder/stem=original,s2_mae", "--batch_size=8",
         "--crop_size=32", "--steps=1", "--compute_dtype=float32",
         f"--profile_dir={tmp_path}"]
  out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["case"] for r in rows] == ["encoder", "encoder/stem=original", "s2_mae"]
  for r in rows:
    assert "error" not in r, r
    assert r["samples_per_s"] > 0 and r["flops_per_sample"] > 0
  # The original stem (stride 4, total 32) does far less work than the smoke patch-8 stem.
  assert rows[1]["flops_per_sample"] < rows[0]["flops_per_sample"] / 4
  assert "samples/s" in out.splitlines()[-4]  # the closing table's header
  # Each case's trace is kept and summarised; the model's named scopes label the ops.
  assert (tmp_path / "encoder_stem_original").is_dir()
  for r in rows:
    profile = r["profile"]
    assert profile["device_ms_per_step"] > 0 and profile["top_ops"]
    assert sum(profile["by_branch"].values()) == pytest.approx(1.0)
    assert {"dwconv", "mlp"} <= set(profile["by_part"])
  assert "mae_encoder" in rows[2]["profile"]["by_branch"]
  assert any("/dwconv/" in op["jax_op"] for op in rows[2]["profile"]["top_ops"])
  assert "by encoder part: " in out

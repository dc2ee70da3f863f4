"""The train-step benchmark script: case parsing and one tiny CPU run through its CLI."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

import jax
import numpy as np

from configs import pretrain
from geomeld_jax import bench
from geomeld_jax import records
from geomeld_jax import sharding
from geomeld_jax import train_step as ts

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


def test_model_flops_count_the_train_loss_not_the_eval_extras():
  """With ITC on, eval adds an unmasked encoder pass for a metric; model FLOPs must not."""
  config = pretrain.get_config("smoke,mp_mae_itc")
  with config.unlocked():
    config.input.global_batch_size = 2
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)), devices=jax.devices()[:1])
  normalizer = records.Normalizer(ts.synthetic_statistics())
  setup = ts.setup(config, mesh, normalizer)
  state = jax.eval_shape(setup.init_state)
  batch = sharding.put_batch(ts.synthetic_batch(setup.model_def.config, 2, 32,
                                                config.input.text_len), mesh)
  train_forward = bench._flops(bench.train_loss_forward(setup, normalizer).lower(state, batch))
  eval_forward = bench._flops(setup.eval_step.lower(state, batch, np.int32(0)))
  step = bench._flops(setup.train_step.lower(state, batch))
  assert 0 < train_forward < 0.8 * eval_forward
  assert 2 * train_forward < step < 3.5 * train_forward  # forward + backward of that loss


# A GPU trace in the shape XLA:GPU writes it: kernels launched inside a command buffer (a CUDA
# graph) carry the buffer's name as hlo_op, and their own kernel name.
_GPU_HLO = """
%command_buffer.7 (p: bf16[4]) -> bf16[4] {
  %loop_multiply_fusion.12 = bf16[4]{0} fusion(bf16[4]{0} %p), kind=kLoop, calls=%fused_12, metadata={op_type="mul" op_name="jit(train_step)/jvp(mae_encoder)/stage0_block0/mlp/mul"}
  ROOT %cudnn-conv.3 = (bf16[4]{0}, u8[0]{0}) custom-call(bf16[4]{0} %loop_multiply_fusion.12), custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(jepa_teacher)/stem/conv_general_dilated"}
}
%input_reduce_fusion = f32[] fusion(f32[4]{0} %x), kind=kInput, calls=%fused_3, metadata={op_name="jit(train_step)/itc_text_tower/reduce_sum"}
"""


def test_device_time_profile_looks_inside_gpu_command_buffers(tmp_path):
  def op(name, hlo_op, dur):
    return {"ph": "X", "pid": 1, "tid": 2, "name": name, "dur": dur, "args": {"hlo_op": hlo_op}}

  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #13"}},
      op("loop_multiply_fusion_12", "command_buffer_7", 300.0),
      op("sm90_xmma_fprop_implicit_gemm", "command_buffer_7", 100.0),  # cuDNN's kernel
      op("input_reduce_fusion", "input_reduce_fusion", 100.0),
      op("loop_multiply_fusion_12", "command_buffer_7", 300.0),  # the second step
      op("sm90_xmma_fprop_implicit_gemm", "command_buffer_7", 100.0),
      op("input_reduce_fusion", "input_reduce_fusion", 100.0),
  ]
  trace_dir = tmp_path / "plugins" / "profile" / "run"
  trace_dir.mkdir(parents=True)
  with gzip.open(trace_dir / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  profile = bench.device_time_profile(str(tmp_path), num_steps=2, hlo_text=_GPU_HLO)
  assert profile["device_ms_per_step"] == pytest.approx(0.5)
  ops = {o["op"]: o for o in profile["top_ops"]}
  assert set(ops) == {"loop_multiply_fusion.12", "command_buffer_7", "input_reduce_fusion"}
  assert ops["loop_multiply_fusion.12"]["jax_op"].endswith("jvp(mae_encoder)/stage0_block0/mlp/mul")
  assert ops["loop_multiply_fusion.12"]["share"] == pytest.approx(0.6)
  assert ops["command_buffer_7"]["calls_per_step"] == 1
  assert profile["by_branch"] == pytest.approx({"mae_encoder": 0.6, "-": 0.4})
  assert profile["by_part"] == pytest.approx({"mlp": 0.6, "-": 0.4})


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

"""MetricWriter: TensorBoard events, the progress line, throughput; run_info.json."""

import json
import logging
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from geomeld_jax import metrics_writer


def _read_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Parses TFRecord-framed event files (length, crc, payload, crc) without tensorboard."""
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_write_scalars_events_and_progress_line(tmp_path, caplog):
  clock = iter([100.0, 102.0])
  writer = metrics_writer.MetricWriter(tmp_path, total_steps=1000, is_host0=True, global_batch_size=256,
                                       clock=lambda: next(clock))
  with caplog.at_level(logging.INFO):
    first = writer.write_scalars(100, {"loss": jnp.float32(2.5), "lr": np.array(1e-3)})
    second = writer.write_scalars(200, {"loss": 1.5, "lr": 2e-3})
  writer.close()
  assert first == {"loss": 2.5, "lr": pytest.approx(1e-3)}
  assert second["steps_per_sec"] == pytest.approx(50.0)
  assert second["samples_per_sec"] == pytest.approx(12800.0)
  line = caplog.records[-1].getMessage()
  assert line.startswith("step 200/1000 | loss 1.5 | lr 0.002")
  assert "12800.0 samples/s" in line and "ETA 0m16s" in line  # 800 steps at 50 steps/s

  scalars = _read_scalars(tmp_path / "tensorboard")
  assert scalars["loss"] == [(100, 2.5), (200, 1.5)]
  assert scalars["samples_per_sec"] == [(200, pytest.approx(12800.0))]


def test_not_host0_writes_nothing(tmp_path):
  writer = metrics_writer.MetricWriter(tmp_path, total_steps=10, is_host0=False)
  assert writer.write_scalars(1, {"loss": 1.0}) == {}
  writer.close()
  assert not (tmp_path / "tensorboard").exists()


def test_non_scalar_metric_is_refused(tmp_path):
  writer = metrics_writer.MetricWriter(tmp_path, total_steps=10, is_host0=True)
  with pytest.raises(ValueError, match="metric 'loss' must be a scalar"):
    writer.write_scalars(1, {"loss": np.ones(3)})
  writer.close()


def test_run_info(tmp_path):
  path = metrics_writer.write_run_info(tmp_path, json.dumps({"model": {"variant": "atto"}}))
  info = json.loads(path.read_text())
  assert info["config"] == {"model": {"variant": "atto"}}
  assert info["versions"]["jax"] == jax.__version__
  assert info["device_kinds"] and info["process_count"] == 1 and info["device_count"] == jax.device_count()
  assert info["git_sha"] is None or len(info["git_sha"].split("-")[0]) == 40

"""The table command's checkpoint loading errors and table rendering."""

import json

import pytest

from geomeld_jax.evaluation import run

BASELINE = dict(variant="atto", stem="patch", patch_size=8)


def test_checkpoint_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
    run.load_checkpoint(str(tmp_path), BASELINE)
  (tmp_path / "model_config.json").write_text(json.dumps(
      {"input_bands": ["B2", "B3", "B4"], "model": {}, "encoders": ["encoder"]}))
  with pytest.raises(ValueError, match=r"model_config.json: the encoder expects input bands"):
    run.load_checkpoint(str(tmp_path), BASELINE)
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    run.load_checkpoint("imagenet:" + str(tmp_path / "missing.safetensors"), BASELINE)


def test_markdown_table_mean_std():
  table = {"random": {"m-bigearthnet": {"LP": {"metric": "micro_f1", "mean": 12.345, "std": 1.0}}},
           "export": {"m-bigearthnet": {"LP": {"metric": "micro_f1", "mean": 40.0, "std": 0.25}},
                      "m-so2sat": {"FT": {"metric": "top1_acc", "mean": 50.0, "std": 0.0}}}}
  md = run.markdown_table(table, 3)
  lines = md.splitlines()
  assert lines[0] == "| checkpoint | m-bigearthnet LP (micro_f1) | m-so2sat FT (top1_acc) |"
  assert lines[2] == "| random | 12.3 ± 1.0 | – |"
  assert lines[3] == "| export | 40.0 ± 0.2 | 50.0 ± 0.0 |"
  assert "3 seed(s)" in md and "†" not in md
  table["export"]["m-bigearthnet"]["LP"]["best_lr_at_grid_edge"] = [False, True, False]
  md = run.markdown_table(table, 3)
  assert md.splitlines()[3] == "| export | 40.0 ± 0.2† | 50.0 ± 0.0 |"
  assert "† the best probe lr of some seed is at the edge" in md


def test_best_lr_at_grid_edge():
  from geomeld_jax.evaluation import probe  # pylint: disable=import-outside-toplevel
  result = lambda best, grid: probe.ProbeResult("m", 1.0, best, dict.fromkeys(grid, 0.0), {})  # noqa: E731
  assert result(1e-3, (1e-3, 3e-3, 1e-2)).best_lr_at_grid_edge
  assert result(1e-2, (1e-3, 3e-3, 1e-2)).best_lr_at_grid_edge
  assert not result(3e-3, (1e-3, 3e-3, 1e-2)).best_lr_at_grid_edge
  assert not result(3e-3, (3e-3,)).best_lr_at_grid_edge  # no sweep, no edge

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
  assert "3 seed(s)" in md

"""The demo build is reused only when it came from the same settings and shard files."""

import json

from data_prep import demo


def test_demo_build_is_reused_only_when_up_to_date(demo_dataset):
  config = demo.demo_config(str(demo_dataset))
  manifest = json.loads((demo_dataset / config.dataset_dir / "manifest.json").read_text())
  assert demo._up_to_date(manifest, config)  # pylint: disable=protected-access
  assert not demo._up_to_date(manifest, demo.demo_config(str(demo_dataset), seed=1))  # pylint: disable=protected-access
  shards = json.loads((demo_dataset / "synthetic_shards" / "demo_shards.json").read_text())
  assert shards == {"num_samples": 512, "seed": 0, "samples_per_shard": 64}
  # Shard files rewritten since the build (another sample count or seed): not up to date.
  units = manifest["sources"][config.sources[0]]["units"]
  first = sorted(units)[0]
  stale = json.loads(json.dumps(manifest))
  stale["sources"][config.sources[0]]["units"][first]["fingerprint"] = "another file"
  assert not demo._up_to_date(stale, config)  # pylint: disable=protected-access

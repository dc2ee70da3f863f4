"""Image<->text retrieval on a captioned split of a built GeoMeld dataset, and robustness.

Every caption of every tile is a text query / target (objectives.md §6): i2t R@K counts an
image as found when any of its captions is in the top K; t2i R@K asks each caption for its
tile. Images are embedded as at pretraining time but unmasked: mean pooling of the encoder's
final map over all cells, then ``GeoMeldFM.embed_image``.

Cross-modal robustness: the same metrics with Sentinel-2 bands dropped at test time (made
invalid, so the encoder sees zeros there, exactly how a missing band looks in training), and
a linear probe trained on all bands scored on test features with bands dropped.

The paper's R@K table for a pretraining run (its export and its dataset, as the run's
config.json names them):

  python -m geomeld_jax.evaluation.retrieval --workdir=runs/atto_full --split=test \
      --drop_bands=B2+B3+B4

prints one JSON line and writes it to <workdir>/export/<step>/retrieval_<split>.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geomeld_jax import input_pipeline
from geomeld_jax import modalities as mod
from geomeld_jax import records
from geomeld_jax.evaluation import metrics
from geomeld_jax.evaluation import probe
from geomeld_jax.models import geomeld


@dataclasses.dataclass
class CaptionedSplit:
  x: np.ndarray  # (N, H, W, 12) normalised S2, 0 at invalid
  valid: np.ndarray  # (N, H, W, 12) bool
  captions: list[list[str]]
  tile_ids: list[str]
  lat: np.ndarray
  lon: np.ndarray
  dates: list[str]


def _center_crop(a: np.ndarray, size: int) -> np.ndarray:
  h, w = a.shape[:2]
  if size > min(h, w):
    raise ValueError(f"crop size {size} is larger than the {h}x{w} tile")
  top, left = (h - size) // 2, (w - size) // 2
  return a[top:top + size, left:left + size]


def split_source(files: input_pipeline.DatasetFiles, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder_from_directory(str(files.root))
  if split not in builder.info.splits:
    raise ValueError(f"dataset {files.root} has no split {split!r}; it has "
                     f"{list(builder.info.splits)}")
  return builder.as_data_source(split=split)


def load_split(files: input_pipeline.DatasetFiles, split: str, *, crop_size: int,
               max_images: int | None = None, captioned_only: bool = False) -> CaptionedSplit:
  """Decoded S2 input, captions and metadata of a split (centre crop, no augmentation)."""
  normalizer = records.Normalizer.from_file(files.statistics)
  source = split_source(files, split)
  xs, vs, caps, ids, lats, lons, dates = [], [], [], [], [], [], []
  for i in range(len(source)):
    if max_images is not None and len(xs) >= max_images:
      break
    rec = source[i]
    c = records.captions(rec)
    if captioned_only and not c:
      continue
    x, v = normalizer.normalize(mod.INPUT_MODALITY, np.asarray(rec[mod.INPUT_MODALITY]))
    xs.append(_center_crop(x, crop_size))
    vs.append(_center_crop(v, crop_size))
    caps.append(c)
    ids.append(records._text(rec["tile_id"]))  # pylint: disable=protected-access
    lats.append(float(rec["lat"]))
    lons.append(float(rec["lon"]))
    dates.append(records._text(rec["date"]))  # pylint: disable=protected-access
  if not xs:
    raise ValueError(f"split {split!r} of {files.root} has no {'captioned ' if captioned_only else ''}"
                     "records")
  return CaptionedSplit(np.stack(xs), np.stack(vs), caps, ids, np.asarray(lats, np.float32),
                        np.asarray(lons, np.float32), dates)


def drop_s2_bands(x: np.ndarray, valid: np.ndarray, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Marks the named S2 bands invalid (and zero) in channels-last arrays."""
  idx = [mod.SENTINEL2.band_index(b) for b in bands]
  valid = valid.copy()
  valid[..., idx] = False
  return np.where(valid, x, 0.0).astype(np.float32), valid


def _batched(fn, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """fn over fixed-size batches (last one padded: one compile)."""
  n = len(arrays[0])
  out = []
  for i in range(0, n, batch_size):
    chunk = [a[i:i + batch_size] for a in arrays]
    pad = batch_size - len(chunk[0])
    if pad:
      chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
    out.append(np.asarray(fn(*chunk))[:batch_size - pad])
  return np.concatenate(out)


def image_embeddings(model, x: np.ndarray, valid: np.ndarray, batch_size: int) -> np.ndarray:
  """L2-normalised joint image embeddings (N, E) of the unmasked encoder (mean pooling)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, x, valid):
    return geomeld.embed_whole_image(nnx.merge(graphdef, state), jnp.where(valid, x, 0.0),
                                     deterministic=True)

  return _batched(lambda a, b: fn(state, a, b), [x, valid], batch_size)


def text_embeddings(model, tokens: np.ndarray, batch_size: int) -> np.ndarray:
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, t):
    return nnx.merge(graphdef, state).embed_text(t)

  return _batched(lambda t: fn(state, t), [tokens], batch_size)


def tokenize_captions(files: input_pipeline.DatasetFiles, captions: list[list[str]],
                      text_len: int) -> tuple[np.ndarray, list[str], list[list[int]]]:
  """The distinct caption strings as (T, L) token ids, the strings, and per string every image
  whose captions hold it: template captions repeat across tiles, and a string shared by two
  images is a correct answer for both (`metrics.retrieval_recalls`)."""
  if not files.tokenizer.is_file():
    raise FileNotFoundError(f"{files.tokenizer} is missing: the dataset was built without captions")
  tok = input_pipeline.Tokenizer(files.tokenizer, text_len)
  index: dict[str, int] = {}
  tokens, texts, images_of = [], [], []
  for i, caps in enumerate(captions):
    for c in caps:
      if c not in index:
        index[c] = len(texts)
        tokens.append(tok(c))
        texts.append(c)
        images_of.append([])
      if i not in images_of[index[c]]:
        images_of[index[c]].append(i)
  if not tokens:
    raise ValueError("no captions to retrieve")
  return np.stack(tokens), texts, images_of


def evaluate_retrieval(model, files: input_pipeline.DatasetFiles, split: str = "test", *,
                       crop_size: int, text_len: int, batch_size: int = 32,
                       drop_bands: Sequence[Sequence[str]] = (), max_images: int | None = None
                       ) -> dict[str, dict[str, float]]:
  """{'all_bands': recalls, 'drop_<bands>': recalls, ...} on the captioned images of `split`."""
  data = load_split(files, split, crop_size=crop_size, max_images=max_images, captioned_only=True)
  tokens, _, images_of = tokenize_captions(files, data.captions, text_len)
  txt = text_embeddings(model, tokens, batch_size)
  out = {}
  for name, drop in [("all_bands", ())] + [("drop_" + "+".join(d), tuple(d)) for d in drop_bands]:
    x, v = drop_s2_bands(data.x, data.valid, drop) if drop else (data.x, data.valid)
    img = image_embeddings(model, x, v, batch_size)
    out[name] = metrics.retrieval_recalls(img @ txt.T, images_of)
    out[name]["num_images"] = float(len(img))
    out[name]["num_captions"] = float(len(txt))  # distinct strings
    out[name]["num_captions_shared"] = float(sum(len(i) > 1 for i in images_of))
  return out


def probe_with_dropped_bands(encoder, task, result: probe.ProbeResult, *, drop_bands: Sequence[str],
                             cache: probe.FeatureCache, checkpoint_id: str, batch_size: int,
                             max_samples: int | None = None) -> float:
  """Test score (%) of a probe trained on all bands, on test features with `drop_bands` invalid."""
  feats, labels = probe.task_features(encoder, task, "test", cache=cache,
                                      checkpoint_id=checkpoint_id, batch_size=batch_size,
                                      max_samples=max_samples, drop_bands=drop_bands)
  _, score = metrics.task_metric(task.info.kind, probe.predict(result.params, feats), labels,
                                 task.info.num_classes)
  return score


def retrieval_examples(model, files, split: str, *, crop_size: int, text_len: int, k: int = 3,
                       num_queries: int = 2, batch_size: int = 16, max_images: int = 64
                       ) -> list[dict[str, Any]]:
  """Text queries (a tile's caption) with their top-k tiles: for the visual report."""
  data = load_split(files, split, crop_size=crop_size, max_images=max_images, captioned_only=True)
  tokens, texts, _ = tokenize_captions(files, data.captions, text_len)
  img = image_embeddings(model, data.x, data.valid, batch_size)
  txt = text_embeddings(model, tokens, batch_size)
  sim = txt @ img.T
  out = []
  for i in range(min(num_queries, len(img))):  # each query: an image's first caption
    t = texts.index(data.captions[i][0])
    top = np.argsort(-sim[t], kind="stable")[:k]
    out.append({"query": texts[t], "true_image": i,
                "top": [int(i) for i in top], "scores": [float(sim[t, i]) for i in top],
                "captions": [data.captions[i][0] for i in top], "x": data.x[top],
                "valid": data.valid[top]})
  return out


def evaluate_run(workdir: str | pathlib.Path, *, step: int | None = None, split: str = "test",
                 drop_bands: Sequence[Sequence[str]] = (), max_images: int | None = None
                 ) -> dict[str, Any]:
  """Retrieval of a run's export (default: the newest) on `split` of the run's own dataset,
  at the run's crop size and caption length; written next to the export as JSON."""
  from geomeld_jax import export  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  exports = sorted(int(p.name) for p in (workdir / export.EXPORT_SUBDIR).glob("*")
                   if p.name.isdigit())
  if not exports:
    raise FileNotFoundError(f"no export in {workdir / export.EXPORT_SUBDIR}: run "
                            f"python -m geomeld_jax.export --workdir={workdir} first")
  step = exports[-1] if step is None else step
  if step not in exports:
    raise ValueError(f"no export of step {step} in {workdir}; exported steps: {exports}")
  export_dir = workdir / export.EXPORT_SUBDIR / str(step)
  run_cfg = json.loads((workdir / "config.json").read_text())["input"]
  model, _ = export.load_itc_model(export_dir)
  files = input_pipeline.locate_dataset(run_cfg["data_dir"])
  recalls = evaluate_retrieval(model, files, split, crop_size=int(run_cfg["crop_size"]),
                               text_len=int(run_cfg["text_len"]), drop_bands=drop_bands,
                               max_images=max_images)
  result = {"workdir": str(workdir), "step": step, "split": split, **recalls}
  (export_dir / f"retrieval_{split}.json").write_text(json.dumps(result, indent=2))
  return result


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  drop = [group.split("+") for group in f.drop_bands]
  print(json.dumps(evaluate_run(f.workdir, step=f.step, split=f.split, drop_bands=drop,
                                max_images=f.max_images)))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "A pretraining run directory with an ITC export.")
  flags.DEFINE_integer("step", None, "Exported step (default: the newest).")
  flags.DEFINE_string("split", "test", "Captioned split of the run's dataset.")
  flags.DEFINE_list("drop_bands", [], "Band groups dropped at test time, e.g. B2+B3+B4,B8.")
  flags.DEFINE_integer("max_images", None, "Use at most this many images (default: all).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

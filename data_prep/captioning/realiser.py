"""The offline realiser: K varied candidate captions from an attribute record, no network.

Each candidate draws, from a generator seeded by (seed, tile_id, k), a sentence plan (the order
and grouping of topics), vocabulary from the lexicon's phrase tables, and whether to state
numbers. It only states what the record knows with confidence >= CLAIM_CONFIDENCE, only with
phrases whose lexicon range holds the measured value with a margin, and every clause it writes
carries at least one claim, so the verifier can check every word that matters. Relations
across modalities are written where both sides are known: land cover on the terrain (with the
slope and aspect from the DEM), canopy height of the tree cover, where the water lies.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_prep.captioning import lexicon as lx
from data_prep.captioning.orchestrator import CLAIM_CONFIDENCE, AttributeRecord

# Products disagreeing by more than this on a class make it too uncertain to name.
MAX_PRODUCT_DISAGREEMENT = 0.25
_REALISER_EXTENT_PHRASES = {  # phrases that read well before any class phrase
    "dominant": ("mostly", "mainly", "predominantly", "largely", "dominated by"),
    "large": ("large areas of", "a large share of", "broad tracts of"),
    "moderate": ("patches of", "areas of", "some"),
    "small": ("small patches of", "scattered", "pockets of"),
    "trace": ("traces of", "isolated specks of"),
}
_CLASS_WORDS = {
    "forest": ("forest", "woodland", "tree cover"),
    "shrubland": ("shrubland", "scrub"),
    "grassland": ("grassland", "meadows", "pasture"),
    "cropland": ("cropland", "farmland", "fields"),
    "built": ("built-up land", "buildings", "built-up areas"),
    "bare": ("bare ground", "bare soil"),
    "snow": ("snow", "snow and ice"),
    "wetland": ("wetland", "marsh"),
    "mangrove": ("mangroves",),
    "moss": ("moss and lichen", "tundra"),
}
_TERRAIN_NP = {"flat": ("flat terrain", "level ground"), "plain": ("a lowland plain", "plains"),
               "hilly": ("hilly terrain", "rolling hills", "hill country"),
               "mountainous": ("mountainous terrain", "mountain terrain")}


def candidate_rng(seed: int, tile_id: str, k: int) -> np.random.Generator:
  digest = hashlib.sha256(f"{int(seed)}|{tile_id}|{int(k)}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class _Facts:
  """Clause builders over one record; each returns None when its topic is unknown."""

  def __init__(self, record: AttributeRecord, rng: np.random.Generator):
    self.r = record
    self.rng = rng

  def v(self, name: str):
    return self.r.value(name, CLAIM_CONFIDENCE)

  def pick(self, options):
    options = list(options)
    return options[int(self.rng.integers(len(options)))] if options else None

  def coin(self, p: float = 0.5) -> bool:
    return bool(self.rng.random() < p)

  # -- land cover ------------------------------------------------------------------------
  def classes(self) -> list[tuple[str, float]]:
    fr = self.v("landcover.fractions")
    if not fr:
      return []
    wc, dw = self.v("landcover.worldcover"), self.v("landcover.dynamic_world")
    out = []
    for c, f in sorted(fr.items(), key=lambda kv: (-kv[1], kv[0])):
      if c == "water" or f < 0.012:
        continue
      if wc is not None and dw is not None and abs(wc.get(c, 0) - dw.get(c, 0)) > \
          MAX_PRODUCT_DISAGREEMENT:
        continue
      out.append((c, float(f)))
    return out[:3]

  def landcover_phrase(self, c: str, f: float) -> str:
    word = self.pick(_CLASS_WORDS[c])
    if self.coin(0.3):
      return f"{word} (about {round(100 * f)}%)"
    names = [n for n in lx.extent_for(f) if n in _REALISER_EXTENT_PHRASES]
    if not names:
      return f"{word} (about {round(100 * f)}%)"
    return f"{self.pick(_REALISER_EXTENT_PHRASES[self.pick(names)])} {word}"

  def landcover(self, relation: str = "") -> str | None:
    cls = self.classes()
    if not cls:
      return None
    parts = [self.landcover_phrase(c, f) for c, f in cls]
    head = parts[0] + (f" {relation}" if relation else "")
    if len(parts) == 1:
      return head
    joiner = self.pick((" with ", " alongside ", " and "))
    return head + joiner + " and ".join(parts[1:])

  # -- terrain ---------------------------------------------------------------------------
  def slope_words(self) -> str:
    p90, mean = self.v("terrain.slope_p90"), self.v("terrain.slope_mean")
    rc = self.v("terrain.relief_class")
    words = []
    if p90 is not None and p90 >= lx.STEEP_MIN_SLOPE_P90 + 2:
      words.append("steep")
    elif mean is not None and rc in ("plain", "hilly") and 1.0 <= mean <= lx.GENTLE_MAX_SLOPE_MEAN - 2:
      words.append("gentle")
    asp = self.v("terrain.aspect")
    if asp and words:
      words.append(f"{asp}-facing")
    return " ".join(words)

  def terrain_np(self) -> str | None:
    rc = self.v("terrain.relief_class")
    if rc is None:
      return None
    lf = self.v("terrain.landform")
    if lf in ("valley", "ridge"):
      return f"a {lf} in {self.pick(_TERRAIN_NP[rc])}"
    return self.pick(_TERRAIN_NP[rc])

  def terrain_relation(self) -> str:
    """'on steep north-facing slopes' / 'on hilly terrain' for the land-cover clause."""
    sw = self.slope_words()
    if sw:
      return f"on {sw} slopes"
    t = self.terrain_np()
    return f"on {t}" if t else ""

  def terrain_numbers(self) -> str | None:
    relief, elev = self.v("terrain.relief"), self.v("terrain.elevation_mean")
    if relief is None or elev is None:
      return None
    style = int(self.rng.integers(3))
    if style == 0:
      return f"a relief of about {int(5 * round(relief / 5))} m"
    if style == 1:
      return f"elevations around {int(10 * round(elev / 10))} m"
    return (f"elevations around {int(10 * round(elev / 10))} m and a relief of about "
            f"{int(5 * round(relief / 5))} m")

  # -- water -----------------------------------------------------------------------------
  def water(self) -> str | None:
    pct = self.v("water.percent")
    if pct is None:
      return None
    f = pct / 100.0
    if f < 0.003:
      return self.pick(("no open water", "no visible surface water", "free of open water"))
    if f < 0.012:
      return None  # too little to describe with confidence either way
    form, loc = self.v("water.form"), self.v("water.location")
    where = ""
    if loc and loc != "centre":
      where = f" in the {loc}" + self.pick(("", " of the tile", " part"))
    elif loc == "centre":
      where = " in the centre"
    if form == "extensive":
      return self.pick(lx.WATER_PHRASES["extensive"]) + f" covering about {round(pct)}%"
    if form == "river":
      return self.pick(("a river", "a stream", "a channel")) + where
    if form == "lake":
      return self.pick(("a lake", "a pond", "a reservoir")) + where
    names = [n for n in lx.extent_for(f) if n in _REALISER_EXTENT_PHRASES]
    if not names or self.coin(0.3):
      return f"open water (about {round(pct)}%)" + where
    return f"{self.pick(_REALISER_EXTENT_PHRASES[self.pick(names)])} open water{where}"

  # -- vegetation ------------------------------------------------------------------------
  def vegetation(self) -> str | None:
    parts = []
    nd = self.v("vegetation.ndvi_mean")
    dens = lx.density_for(nd) if nd is not None else []
    if dens:
      parts.append(self.pick(lx.VEGETATION_DENSITY[self.pick(dens)][2]))
    mean, p90 = self.v("vegetation.canopy_mean"), self.v("vegetation.canopy_p90")
    if mean is not None:
      style = int(self.rng.integers(3))
      if style == 0 or p90 is None:
        parts.append(f"a canopy near {round(mean)} m")
      elif style == 1:
        parts.append(f"trees up to {round(p90)} m tall")
      elif p90 >= lx.TALL_CANOPY_MIN_P90 + 3:
        parts.append(self.pick(("tall trees", "a tall canopy")))
      elif mean <= lx.LOW_CANOPY_MAX_MEAN - 2:
        parts.append(self.pick(("low trees", "a low canopy")))
      else:
        parts.append(f"a canopy near {round(mean)} m")
    tc = self.v("vegetation.tree_cover")
    if tc is not None and tc >= 0.05 and self.coin(0.4):
      parts.append(f"a tree cover of about {round(100 * tc)}%")
    vf = self.v("vegetation.vegetated_fraction")
    if vf is not None and vf >= 0.05 and (not parts or self.coin(0.3)):
      parts.append(f"vegetation covering about {round(100 * vf)}%")
    return " with ".join(parts) if parts else None

  # -- time and place --------------------------------------------------------------------
  def season(self) -> str | None:
    season, month = self.v("time.season"), self.v("time.month")
    if season is None and month is None:
      return None
    style = int(self.rng.integers(3))
    if season and (style == 0 or month is None):
      return self.pick(("seen in ", "imaged in ", "captured in ")) + season
    if month and season and style == 1:
      return f"imaged in {lx.MONTHS[month - 1]}, in {season}"
    if month:
      return f"acquired in {lx.MONTHS[month - 1]}"
    return f"seen in {season}"

  def place(self) -> str | None:
    country = self.v("place.country")
    if not country:
      return None
    near, dist = self.v("place.nearest"), self.v("place.distance_km")
    region = self.v("place.region")
    opts = [f"in {country}"]
    if region:
      opts.append(f"in {region}, {country}")
    if near and dist is not None and dist <= lx.NEAR_PLACE_MAX_KM:
      opts += [f"near {near}, {country}", f"near {near} in {country}"]
    return self.pick(opts)


def _sentence(parts) -> str | None:
  parts = [p for p in parts if p]
  if not parts:
    return None
  s = ", ".join(parts)
  return s[0].upper() + s[1:] + "."


def realise(record: AttributeRecord, k: int, seed: int = 0) -> list[str]:
  """K candidate captions (possibly fewer distinct ones for a record that knows little)."""
  if k < 1:
    raise ValueError(f"need k >= 1 candidates, got {k}")
  out = []
  for i in range(k):
    f = _Facts(record, candidate_rng(seed, record.tile_id, i))
    plan = int(f.rng.integers(4))
    place, season = f.place(), f.season()
    if plan == 0:
      sents = [_sentence([f.terrain_np(), place]),
               _sentence([f.landcover(), f.water()]),
               _sentence([f.vegetation(), season])]
    elif plan == 1:
      sents = [_sentence([f.landcover(f.terrain_relation()), place]),
               _sentence([f.water(), f.terrain_numbers()]),
               _sentence([season, f.vegetation()])]
    elif plan == 2:
      sents = [_sentence([season, place]),
               _sentence([f.landcover(), f.vegetation()]),
               _sentence([f.terrain_np(), f.water()])]
    else:
      sents = [_sentence([place, f.landcover(f.terrain_relation())]),
               _sentence([f.vegetation(), f.water()]),
               _sentence([f.terrain_numbers(), season])]
    caption = " ".join(s for s in sents if s)
    if caption.strip():
      out.append(caption)
  return out

"""The claim lexicon shared by the realiser (which writes only these phrases) and the verifier.

Every statement a caption can make about a tile is one of the claim kinds below, and every
phrase that makes it is listed here with the attribute range it asserts. The realiser picks
phrases whose range contains the measured value; the verification agent parses any caption
(offline or from a language model) with the same tables and checks each claim against the
attribute record with the tolerances stated here.

Land cover is described in one claim vocabulary (`LANDCOVER_CLASSES`); each product maps into
it (`WORLDCOVER_TO_CLAIM`, `DYNAMIC_WORLD_TO_CLAIM`, and for evaluation `EOLEARN_TO_CLAIM`).
Fractions are of the tile's valid pixels.
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------------------
# Land-cover claim vocabulary and product mappings.
# ----------------------------------------------------------------------------------------

LANDCOVER_CLASSES = ("forest", "shrubland", "grassland", "cropland", "built", "bare", "snow",
                     "water", "wetland", "mangrove", "moss")

# Registry class names (geomeld_jax.modalities) -> claim class.
WORLDCOVER_TO_CLAIM = {
    "tree_cover": "forest", "shrubland": "shrubland", "grassland": "grassland",
    "cropland": "cropland", "built_up": "built", "bare_sparse_vegetation": "bare",
    "snow_and_ice": "snow", "permanent_water_bodies": "water", "herbaceous_wetland": "wetland",
    "mangroves": "mangrove", "moss_and_lichen": "moss",
}
DYNAMIC_WORLD_TO_CLAIM = {
    "water": "water", "trees": "forest", "grass": "grassland", "flooded_vegetation": "wetland",
    "crops": "cropland", "shrub_and_scrub": "shrubland", "built": "built", "bare": "bare",
    "snow_and_ice": "snow",
}
# eo-learn LULC codes (held-out truth of the Slovenian patch) -> claim class. Tundra is the
# nearest claim class to moss-and-lichen; 0 is no data.
EOLEARN_TO_CLAIM = {1: "cropland", 2: "forest", 3: "grassland", 4: "shrubland", 5: "water",
                    6: "wetland", 7: "moss", 8: "built", 9: "bare", 10: "snow"}
# Classes that count as vegetated ground in the vegetated-fraction claim.
VEGETATED_CLASSES = ("forest", "shrubland", "grassland", "cropland", "wetland", "mangrove", "moss")

# Phrases naming each class (longest match wins in the parser). Water has its own claim kind.
LANDCOVER_PHRASES: dict[str, tuple[str, ...]] = {
    "forest": ("forest", "forests", "woodland", "woodlands", "tree cover", "trees", "woods"),
    "shrubland": ("shrubland", "shrubs", "scrub", "scrubland", "bushland"),
    "grassland": ("grassland", "grasslands", "meadows", "meadow", "pasture", "pastures"),
    "cropland": ("cropland", "farmland", "fields", "agricultural land", "arable land",
                 "cultivated land", "crops"),
    "built": ("built-up land", "built-up areas", "built-up area", "buildings", "houses",
              "settlement", "settlements", "urban area", "urban fabric"),
    "bare": ("bare ground", "bare soil", "bare land", "exposed rock", "sand"),
    "snow": ("snow", "ice", "glacier", "snowfields"),
    "wetland": ("wetland", "wetlands", "marsh", "marshes", "swamp", "swamps"),
    "mangrove": ("mangroves", "mangrove"),
    "moss": ("moss and lichen", "moss", "lichen", "tundra"),
}

# ----------------------------------------------------------------------------------------
# Extent phrases: the fraction range of the tile each asserts.
# ----------------------------------------------------------------------------------------

# name -> (lo, hi, phrases placed before the class phrase)
EXTENTS: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "dominant": (0.5, 1.0, ("dominated by", "mostly", "mainly", "predominantly", "largely")),
    "large": (0.25, 0.75, ("large areas of", "a large share of", "broad tracts of")),
    "moderate": (0.08, 0.4, ("some", "areas of", "patches of", "parcels of")),
    "small": (0.01, 0.12, ("small patches of", "scattered", "a little", "pockets of", "a few")),
    "trace": (0.002, 0.03, ("traces of", "a sliver of", "isolated specks of")),
    "none": (0.0, 0.005, ("no", "without", "free of", "no visible")),
}
PRESENCE_RANGE = (0.005, 1.0)  # a class or water named without an extent phrase
# Checking tolerance around an extent range (fraction of the tile), and around percentages.
EXTENT_TOLERANCE = 0.05
NONE_TOLERANCE = 0.01  # "no X" holds while X covers under 1.5% of the tile
PERCENT_TOLERANCE = 10.0  # percentage points for "about NN%"

# ----------------------------------------------------------------------------------------
# Water.
# ----------------------------------------------------------------------------------------

WATER_PHRASES: dict[str, tuple[str, ...]] = {
    # form -> phrases, matched in this order; "any" asserts presence only.
    # Water over half the tile: the form the orchestrator reports for it.
    "extensive": ("a large water body", "a large body of water", "extensive open water"),
    "any": ("open water", "surface water", "water bodies", "a water body", "water"),
    "river": ("a river", "the river", "river", "a stream", "stream", "a canal", "a channel"),
    "lake": ("a lake", "lake", "a pond", "ponds", "a reservoir", "reservoir"),
    # Never measured (the tiles hold no coast evidence), so a "sea" claim is always rewritten.
    "sea": ("the sea", "open sea", "the ocean", "sea", "ocean"),
}
# A "river" needs an elongated main water body; water over half the tile is "extensive" (a
# lake, a reservoir and the sea all look alike from the water mask alone).
RIVER_MIN_ELONGATION = 3.0
EXTENSIVE_WATER_MIN_FRACTION = 0.5

# ----------------------------------------------------------------------------------------
# Terrain. Classes follow geomeld_jax.modalities.TERRAIN_CLASSES; thresholds in orchestrator.
# ----------------------------------------------------------------------------------------

TERRAIN_PHRASES: dict[str, tuple[str, ...]] = {
    "flat": ("flat", "level ground", "level terrain"),
    "plain": ("a plain", "plains", "lowland plain", "gently undulating"),
    "hilly": ("hilly", "hills", "rolling hills", "hill country"),
    "mountainous": ("mountainous", "mountains", "mountain terrain", "high mountains"),
    "valley": ("a valley", "valley floor", "valley"),
    "ridge": ("a ridge", "ridge", "ridgeline", "crest"),
}
# Adjacent terrain classes accepted for a claim when the measurement sits near a threshold.
TERRAIN_ORDER = ("flat", "plain", "hilly", "mountainous")
SLOPE_PHRASES: dict[str, tuple[str, ...]] = {
    "steep": ("steep slopes", "steep", "steeply sloping"),
    "gentle": ("gentle slopes", "gently sloping", "gentle"),
}
STEEP_MIN_SLOPE_P90 = 20.0  # degrees: "steep" needs 90th-percentile slope >= 20 (tol 3)
GENTLE_MAX_SLOPE_MEAN = 10.0  # degrees: "gentle" needs mean slope <= 10 (tol 2)
SLOPE_TOLERANCE = 2.5
RELIEF_TOLERANCE = (15.0, 0.2)  # metres, relative: |claim - relief| <= max(15 m, 20 %)
ELEVATION_TOLERANCE = (30.0, 0.1)
ASPECT_TOLERANCE_DEG = 50.0
COMPASS = ("north", "north-east", "east", "south-east", "south", "south-west", "west",
           "north-west")

# ----------------------------------------------------------------------------------------
# Vegetation.
# ----------------------------------------------------------------------------------------

# density -> (NDVI mean lo, hi, phrases)
VEGETATION_DENSITY: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "dense": (0.55, 1.0, ("densely vegetated", "dense vegetation", "lush vegetation",
                          "dense green cover")),
    "moderate": (0.35, 0.6, ("moderately vegetated", "moderate vegetation")),
    "sparse": (0.15, 0.4, ("sparsely vegetated", "sparse vegetation", "thin vegetation")),
    "none": (-1.0, 0.2, ("little vegetation", "barely vegetated", "unvegetated")),
}
NDVI_TOLERANCE = 0.05
CANOPY_TOLERANCE = (3.0, 0.25)  # metres, relative
TALL_CANOPY_MIN_P90 = 20.0  # "tall trees": canopy p90 >= 20 m (tol 3)
LOW_CANOPY_MAX_MEAN = 10.0  # "low trees": canopy mean <= 10 m (tol 2)
TALL_PHRASES = ("tall trees", "tall forest", "tall canopy", "high canopy")
LOW_PHRASES = ("low trees", "low canopy", "short trees", "low woodland")
DENSE_BUILT_MIN = 0.35  # "densely built" needs a built-up fraction >= 35 % (tol 5 pp)
DENSE_BUILT_PHRASES = ("densely built", "dense urban", "densely built-up")

# ----------------------------------------------------------------------------------------
# Time and place.
# ----------------------------------------------------------------------------------------

SEASONS = ("winter", "spring", "summer", "autumn")
SEASON_PHRASES = {"winter": ("winter",), "spring": ("spring",), "summer": ("summer",),
                  "autumn": ("autumn", "fall")}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
HEMISPHERES = ("northern", "southern")
NEAR_PLACE_MAX_KM = 15.0  # the realiser says "near X" only within 15 km of X's centre

CLAIM_KINDS = ("landcover", "water", "terrain", "slope", "relief", "elevation", "aspect",
               "vegetation", "vegetated_fraction", "canopy", "tree_cover", "builtup", "season",
               "month", "hemisphere", "place")


def phrase_regex(phrases, case_sensitive: bool = False) -> re.Pattern:
  """A word-bounded alternation of phrases, longest first so the longest match wins."""
  alts = sorted(set(phrases), key=len, reverse=True)
  body = "|".join(re.escape(p) for p in alts)
  flags = 0 if case_sensitive else re.IGNORECASE
  return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", flags)


def extent_for(fraction: float) -> list[str]:
  """Extent names whose range holds `fraction` with a margin (so a checker agrees)."""
  margin = 0.02
  out = []
  for name, (lo, hi, _) in EXTENTS.items():
    if name == "none":
      if fraction < lo + 0.002:
        out.append(name)
    elif lo + margin <= fraction <= hi - margin or (hi >= 1.0 and fraction >= lo + margin):
      out.append(name)
  return out


def extent_holds(name: str, fraction: float) -> bool:
  lo, hi, _ = EXTENTS[name]
  if name == "none":
    return fraction <= hi + NONE_TOLERANCE
  return lo - EXTENT_TOLERANCE <= fraction <= hi + EXTENT_TOLERANCE


def density_for(ndvi_mean: float) -> list[str]:
  margin = 0.03
  return [n for n, (lo, hi, _) in VEGETATION_DENSITY.items()
          if lo + margin <= ndvi_mean <= hi - margin or (hi >= 1.0 and ndvi_mean >= lo + margin)]


def density_holds(name: str, ndvi_mean: float) -> bool:
  lo, hi, _ = VEGETATION_DENSITY[name]
  return lo - NDVI_TOLERANCE <= ndvi_mean <= hi + NDVI_TOLERANCE


def within(claimed: float, measured: float, tolerance: tuple[float, float]) -> bool:
  absolute, relative = tolerance
  return abs(claimed - measured) <= max(absolute, relative * abs(measured))


def compass_of(angle_deg: float) -> str:
  """Bearing in degrees clockwise from north -> one of 8 compass words."""
  return COMPASS[int(((angle_deg % 360.0) + 22.5) // 45.0) % 8]


def compass_angle(word: str) -> float:
  return 45.0 * COMPASS.index(word)


# ----------------------------------------------------------------------------------------
# In-tile directions under the training augmentation's flips and 90-degree rotations.
# ----------------------------------------------------------------------------------------
# A caption's in-tile directions ("water in the north-east of the tile", "north-facing
# slopes", "the top-left corner") describe the tile as stored, north up. Once the input
# pipeline mirrors or rotates the pixels, those words must turn with them, or image-text
# contrastive learning pairs the image with a caption that contradicts it. Only in-tile
# constructions are rewritten: "the northern hemisphere", "in the north of Spain" and names
# ("South Africa") keep their words.

_DIRECTION = "|".join(sorted(COMPASS, key=len, reverse=True))
_FACING_RE = re.compile(rf"\b({_DIRECTION})-facing\b", re.I)
# Case-sensitive on purpose: "of Spain" (a capital) is a place, "of the tile" is not.
_IN_THE_RE = re.compile(
    rf"\b([Ii]n the )((?i:{_DIRECTION}))(?!-)((?:ern)?)\b((?: (?:part|side|corner|half|edge))?+)"
    r"(?! hemisphere)(?! of (?:the )?[A-Z])")
_CORNER_RE = re.compile(r"\b(top|upper|bottom|lower)([- ])(left|right)\b", re.I)
_SIDE_RE = re.compile(r"\b(the )(left|right|top|bottom|upper|lower)( (?:part|side|half|edge|corner))\b",
                      re.I)
_SIDE_BEARING = {"top": 0, "upper": 0, "right": 90, "bottom": 180, "lower": 180, "left": 270}
_VERTICAL_PAIR = {"top": ("top", "bottom"), "bottom": ("top", "bottom"),
                  "upper": ("upper", "lower"), "lower": ("upper", "lower")}


def transform_bearing(bearing_deg: float, *, flip_lr: bool, flip_ud: bool, rot90: int) -> float:
  """Where a bearing (clockwise from north, north = row 0) points after the input pipeline's
  augmentation of an (H, W, ...) tile: `v[:, ::-1]` if flip_lr, then `v[::-1]` if flip_ud, then
  `np.rot90(v, rot90, axes=(0, 1))` (counter-clockwise)."""
  if flip_lr:
    bearing_deg = -bearing_deg
  if flip_ud:
    bearing_deg = 180.0 - bearing_deg
  return (bearing_deg - 90.0 * rot90) % 360.0


def _same_case(new: str, old: str) -> str:
  """`new` in the capitalisation of `old` ('North-East' -> 'South-West', 'North-east' -> ...)."""
  if all(part[:1].isupper() for part in old.split("-")):
    return "-".join(part.capitalize() for part in new.split("-"))
  return new[:1].upper() + new[1:] if old[:1].isupper() else new


def reorient_caption(text: str, *, flip_lr: bool, flip_ud: bool, rot90: int) -> str:
  """`text` with its in-tile directions turned as `transform_bearing` turns the pixels."""
  if not (flip_lr or flip_ud or rot90 % 4):
    return text
  turn = lambda word: compass_of(transform_bearing(  # noqa: E731
      compass_angle(word.lower()), flip_lr=flip_lr, flip_ud=flip_ud, rot90=rot90))

  def facing(m: re.Match) -> str:
    return _same_case(turn(m.group(1)), m.group(1)) + "-facing"

  def in_the(m: re.Match) -> str:
    return m.group(1) + _same_case(turn(m.group(2)), m.group(2)) + m.group(3) + m.group(4)

  def corner(m: re.Match) -> str:
    vertical, sep, horizontal = m.groups()
    bearing = 45.0 if horizontal.lower() == "right" else 315.0
    if vertical.lower() in ("bottom", "lower"):
      bearing = 180.0 - bearing
    new = transform_bearing(bearing, flip_lr=flip_lr, flip_ud=flip_ud, rot90=rot90)
    pair = _VERTICAL_PAIR[vertical.lower()]  # keep the caption's own words: top/bottom, upper/lower
    new_vertical = pair[0] if (new < 90 or new > 270) else pair[1]
    return _same_case(new_vertical, vertical) + sep + ("right" if new < 180 else "left")

  def side(m: re.Match) -> str:
    word = m.group(2).lower()
    new = transform_bearing(_SIDE_BEARING[word], flip_lr=flip_lr, flip_ud=flip_ud, rot90=rot90)
    pair = _VERTICAL_PAIR.get(word, ("top", "bottom"))
    new_word = {0.0: pair[0], 90.0: "right", 180.0: pair[1], 270.0: "left"}[new]
    return m.group(1) + _same_case(new_word, m.group(2)) + m.group(3)

  for pattern, rewrite in ((_FACING_RE, facing), (_IN_THE_RE, in_the), (_CORNER_RE, corner),
                           (_SIDE_RE, side)):
    text = pattern.sub(rewrite, text)
  return text

"""The verification agent: claim extraction, checking, rewriting, and the claim table.

Parser: a caption is split into sentences and clauses (at ``, ; :``); each clause is scanned
with the phrase tables of `lexicon` (longest phrase first, spans never reused) for claims of
these kinds: land cover (class + extent phrase, negation, or "about NN%"), water (presence,
extent, form river/lake/sea, location "in the west"), terrain class, slope (steep/gentle),
relief/elevation numbers, aspect ("north-facing"), vegetation density, vegetated share,
canopy height, tall/low trees, tree cover, densely built, season, month, hemisphere and place
(country names, the tile's region/nearest place, and any "near X"/"in X" name).

Checks use the tolerances in `lexicon` against attributes with confidence >= 0.5; a claim on
an unknown or low-confidence attribute is `unsupported`. Verdicts: supported, contradicted,
unsupported. Actions: a contradicted extent, number or season is rewritten to the measured
value; any other contradicted or unsupported claim removes its clause, as does a name, link,
number or object ("a golf course") that no claim accounts for (`unchecked_content`); a sentence
left with no supported claim is removed (so text without verifiable content, e.g. instructions
injected through metadata, never survives); a caption left with nothing is rejected.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Any

from data_prep.captioning import lexicon as lx
from data_prep.captioning._country_names import COUNTRY_NAMES
from data_prep.captioning.orchestrator import CLAIM_CONFIDENCE, AttributeRecord, relief_class

SUPPORTED, CONTRADICTED, UNSUPPORTED = "supported", "contradicted", "unsupported"
COVERAGE_GROUPS = ("landcover", "water", "terrain", "vegetation", "builtup", "season", "place")
_KIND_GROUP = {"landcover": "landcover", "water": "water", "water_location": "water",
               "terrain": "terrain", "slope": "terrain", "relief": "terrain",
               "elevation": "terrain", "aspect": "terrain", "vegetation": "vegetation",
               "vegetated_fraction": "vegetation", "canopy": "vegetation",
               "tree_cover": "vegetation", "builtup": "builtup", "season": "season",
               "month": "season", "hemisphere": "season", "place": "place"}

_NUM = r"(\d+(?:\.\d+)?)"
_APPROX = r"(?:(?:about|around|roughly|nearly|approximately|almost|close to|some|near|~)\s*)?"
_COMPASS_RE = "|".join(sorted(lx.COMPASS, key=len, reverse=True))
_NAME = r"([A-Z][\w'.-]*(?:[ -](?:de|la|le|del|di|am|an|upon|[A-Z][\w'.-]*))*)"
_NOT_PLACE = set(lx.MONTHS) | {"The", "This", "Sentinel", "It", "A", "An", "Northern",
                                "Southern", "Winter", "Spring", "Summer", "Autumn", "Fall"}


@dataclasses.dataclass
class Claim:
  kind: str
  subject: str
  text: str
  start: int
  end: int
  extent: str | None = None
  extent_span: tuple[int, int] | None = None
  extent_phrase: str | None = None
  number: float | None = None
  number_span: tuple[int, int] | None = None


@dataclasses.dataclass
class Check:
  verdict: str
  evidence: str
  # (start, end, text) to splice in, or None: a contradicted claim without one drops its clause.
  fix: tuple[int, int, str] | None = None


@dataclasses.dataclass
class Verification:
  original: str
  caption: str | None  # None: rejected
  claims: list[dict[str, Any]]  # the original's claim table, with the action taken
  final_claims: list[dict[str, Any]]  # the verified caption's claim table
  precision: float  # supported / all claims of the original (0 when it has none)
  coverage: float  # share of available attribute groups the verified caption covers
  reason: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _fold(s: str) -> str:
  return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)
                 ).lower().strip()


# ----------------------------------------------------------------------------------------
# Parsing.
# ----------------------------------------------------------------------------------------


def _res(phrases_by_key: dict[str, tuple[str, ...]]) -> list[tuple[str, re.Pattern]]:
  return [(k, lx.phrase_regex(v)) for k, v in phrases_by_key.items()]


_EXTENT_RE = lx.phrase_regex([p for _, _, ps in lx.EXTENTS.values() for p in ps])
_EXTENT_OF = {p.lower(): name for name, (_, _, ps) in lx.EXTENTS.items() for p in ps}
_COUNTRY_RE = lx.phrase_regex(COUNTRY_NAMES.values(), case_sensitive=True)
_SIMPLE_TABLES: list[tuple[str, list[tuple[str, re.Pattern]]]] = [
    ("builtup", [("dense", lx.phrase_regex(lx.DENSE_BUILT_PHRASES))]),
    ("vegetation", [(k, lx.phrase_regex(v[2])) for k, v in lx.VEGETATION_DENSITY.items()]),
    ("canopy", [("tall", lx.phrase_regex(lx.TALL_PHRASES)),
                ("low", lx.phrase_regex(lx.LOW_PHRASES))]),
    ("slope", _res(lx.SLOPE_PHRASES)),
    ("terrain", _res(lx.TERRAIN_PHRASES)),
    ("hemisphere", [(h, re.compile(rf"\b{h} hemisphere\b", re.I)) for h in lx.HEMISPHERES]),
    ("season", _res(lx.SEASON_PHRASES)),
    ("month", [(str(i + 1), re.compile(rf"\b{m}\b")) for i, m in enumerate(lx.MONTHS)]),
]
_NUMBER_PATTERNS: list[tuple[str, str, re.Pattern]] = [
    ("tree_cover", "mean", re.compile(rf"tree cover of {_APPROX}{_NUM}\s?%", re.I)),
    ("vegetated_fraction", "mean",
     re.compile(rf"vegetation (?:covers|covering) {_APPROX}{_NUM}\s?%", re.I)),
    ("canopy", "p90", re.compile(rf"\btrees? (?:reaching |of )?up to {_NUM}\s?m\b(?: tall)?", re.I)),
    ("canopy", "mean", re.compile(
        rf"\bcanop(?:y|ies)(?: height)?(?: (?:of|near|around|about|averaging|at|close to))*\s*"
        rf"{_NUM}\s?m\b", re.I)),
    ("canopy", "mean", re.compile(rf"\btrees? {_APPROX}{_NUM}\s?m tall", re.I)),
    ("relief", "relief", re.compile(
        rf"\b(?:relief|height difference)s? of {_APPROX}{_NUM}\s?m\b", re.I)),
    ("relief", "relief", re.compile(rf"\b{_NUM}\s?m of relief", re.I)),
    ("elevation", "mean", re.compile(
        rf"\b(?:elevation|altitude)s? (?:of |around |near |about |averaging |at )*{_NUM}\s?m\b",
        re.I)),
    ("elevation", "mean", re.compile(rf"\b{_NUM}\s?m above sea level", re.I)),
]
_ASPECT_RE = re.compile(rf"\b({_COMPASS_RE})-facing", re.I)
_LOCATION_RE = re.compile(
    rf"\bin the ({_COMPASS_RE}|centre|center)(?:ern)?\b(?! hemisphere)"
    rf"(?: (?:part|side|corner|half|edge))?"
    rf"(?: of the tile)?", re.I)
_PERCENT_RE = re.compile(rf"{_APPROX}{_NUM}\s?%")
_SEA_LEVEL_RE = re.compile(r"\bsea[- ]level\b", re.I)
_PLACE_RE = re.compile(rf"\b(?:near|close to|outside|in|around|of) {_NAME}")


class _Scanner:
  """Finds non-overlapping matches in a clause, in priority order."""

  def __init__(self, text: str):
    self.text = text
    self.taken = [False] * len(text)

  def free(self, s: int, e: int) -> bool:
    return not any(self.taken[s:e])

  def take(self, s: int, e: int) -> None:
    for i in range(s, e):
      self.taken[i] = True

  def find(self, pattern: re.Pattern, group: int = 0):
    for m in pattern.finditer(self.text):
      s, e = m.span(group)
      if s < e and self.free(s, e):
        self.take(*m.span(0) if group == 0 else (s, e))
        yield m


def parse_clause(text: str, record: AttributeRecord | None = None) -> list[Claim]:
  """Every claim in one clause, in text order."""
  sc = _Scanner(text)
  claims: list[Claim] = []
  # Places first: capitalised names would otherwise read as land cover ("Forest Hills").
  for m in sc.find(_COUNTRY_RE):
    claims.append(Claim("place", m.group(0), m.group(0), *m.span()))
  known_names = []
  if record is not None:
    for n in ("place.nearest", "place.region"):
      v = record.value(n)
      if v:
        known_names.append(str(v))
  if known_names:
    for m in sc.find(lx.phrase_regex(known_names, case_sensitive=True)):
      claims.append(Claim("place", m.group(0), m.group(0), *m.span()))
  for m in _PLACE_RE.finditer(text):
    name = m.group(1)
    if name.split(" ")[0] in _NOT_PLACE or not sc.free(*m.span(1)):
      continue
    sc.take(*m.span(1))
    claims.append(Claim("place", name, name, *m.span(1)))
  for kind, stat, pat in _NUMBER_PATTERNS:
    for m in sc.find(pat):
      claims.append(Claim(kind, stat, m.group(0), *m.span(), number=float(m.group(1)),
                          number_span=m.span(1)))
  list(sc.find(_SEA_LEVEL_RE))  # reserve "sea level" (a height reference, not water)
  for m in sc.find(_ASPECT_RE):
    claims.append(Claim("aspect", m.group(1).lower(), m.group(0), *m.span()))
  for m in sc.find(_LOCATION_RE):
    word = m.group(1).lower()
    claims.append(Claim("water_location", "centre" if word == "center" else word, m.group(0),
                        *m.span()))
  for kind, table in _SIMPLE_TABLES:
    for subject, pat in table:
      for m in sc.find(pat):
        claims.append(Claim(kind, subject, m.group(0), *m.span()))
  extent_claims = []
  for kind, table in (("water", _res(lx.WATER_PHRASES)),
                      ("landcover", _res(lx.LANDCOVER_PHRASES))):
    for subject, pat in table:
      for m in sc.find(pat):
        c = Claim(kind, subject, m.group(0), *m.span())
        claims.append(c)
        extent_claims.append(c)
  claims.sort(key=lambda c: c.start)
  _attach_extents(text, claims, extent_claims, sc)
  # Only water has a measured position: a position is water's when the class it follows (or,
  # opening the clause, the one it precedes) is water; "grassland in the north beside a lake"
  # places the grassland, which nothing checks.
  covers = [c for c in claims if c.kind in ("water", "landcover")]
  for c in claims:
    if c.kind == "water_location":
      before = [o for o in covers if o.end <= c.start]
      owner = before[-1] if before else next((o for o in covers if o.start >= c.end), None)
      if owner is None or owner.kind != "water":
        c.kind = "location"
  return claims


def _attach_extents(text: str, claims: list[Claim], targets: list[Claim], sc: _Scanner) -> None:
  """Binds extent phrases and percentages to the class they are about.

  An extent phrase binds to the class right after it ("mostly forest"); a percentage to the
  class right after it ("30% meadows", up to two words between) or else right before it
  ("forest (about 67%)", "the lake covering about 6%", up to three words between). No other
  claim may stand between. A percentage that binds to nothing becomes an unowned claim, which
  is unsupported, so its clause goes.
  """
  for c in targets:
    prev_end = max([o.end for o in claims if o.end <= c.start], default=0)
    window = text[prev_end:c.start]
    best = None
    for m in _EXTENT_RE.finditer(window):
      between = window[m.end():].split()
      if len(between) <= 2:
        best = m
    if best is not None:
      c.extent = _EXTENT_OF[best.group(0).lower()]
      c.extent_span = (prev_end + best.start(), prev_end + best.end())
      c.extent_phrase = best.group(0)

  def adjacent(s: int, e: int, max_words: int) -> bool:
    return (len(text[s:e].split()) <= max_words
            and not any(s <= o.start and o.end <= e for o in claims))

  for m in _PERCENT_RE.finditer(text):
    if not sc.free(*m.span(1)):
      continue
    # "30% meadows" binds forward, but never across a bracket or a conjunction: in
    # "forest (about 67%) with meadows" the 67% is the forest's.
    after = [c for c in targets if c.start >= m.end() and c.number is None
             and adjacent(m.end(), c.start, 2) and not _BREAK_RE.search(text[m.end():c.start])]
    before = [c for c in targets if c.end <= m.start() and c.number is None
              and adjacent(c.end, m.start(), 3)]
    owner = after[0] if after else (before[-1] if before else None)
    sc.take(*m.span(1))
    if owner is not None:
      owner.number, owner.number_span = float(m.group(1)), m.span(1)
    else:
      claims.append(Claim("unowned_percent", "", m.group(0), *m.span()))
  claims.sort(key=lambda c: c.start)


_BREAK_RE = re.compile(r"[()]|\b(?:and|with|or|while|but|plus|whereas)\b", re.I)
_WORD_RE = re.compile(r"(?<![\w.-])[^\W\d_][\w'-]*")
# Negations and quantity or comparison words outside a claim's span: "the tile lacks open
# water", "hardly any forest", "grassland dominates", "more grassland than forest", "covering
# more than 35%". A claim's own extent phrase ("no water", "mostly forest") is inside its span
# and checked; left over, such a word would turn a checked claim into a different statement.
# Positions no claim checks: only water's position is measured ("a lake in the north" parses as
# its claim); "to the north", "in the top-left corner", "on the western edge", "east of" do not.
_LEFTOVER_DIRECTION_RE = re.compile(
    r"\b(?:north|south|east|west)(?:-?(?:east|west))?(?:ern|wards?)?\b|\b(?:top|bottom|left|"
    r"right)(?:-(?:left|right|hand))?\b|\b(?:corner|edge|margin)s?\b", re.I)
_LEFTOVER_QUALIFIER_RE = re.compile(
    r"\b(?:not|no|none|never|neither|nor|lacks?|lacking|absent|absence|without|hardly|barely|"
    r"scarcely|few|fewer|little|dominat\w*|majority|most|mostly|mainly|largely|predominantly|"
    r"primarily|more|less|than|except)\b|n't\b", re.I)
_LEFTOVER_LINK_RE = re.compile(r"https?:|www\.|@|\b\w+\.(?:com|org|net|io|info|ru|cn)\b", re.I)
_LEFTOVER_NUMBER_RE = re.compile(r"\d")
_SENSOR_RE = re.compile(r"\bSentinel-?[12]\b")
# Objects and places that no attribute confirms or denies: what remote-sensing captioners are
# known to invent ("a golf course", "ships in the harbour"). Outside a claim they make a clause
# unchecked, as a name or a number does. Words the lexicon uses for checkable cover
# ("buildings", "fields", "reservoir", "urban") are not listed: they parse as claims.
_OBJECT_WORDS = (
    r"roads?", r"streets?", r"highways?", r"motorways?", r"railways?", r"railroads?", r"trains?",
    r"airports?", r"airfields?", r"runways?", r"aircraft", r"air ?planes?", r"planes?",
    r"helicopters?", r"ports?", r"harbou?rs?", r"docks?", r"piers?", r"marinas?", r"ships?",
    r"boats?", r"vessels?", r"bridges?", r"dams?", r"mines?", r"quarr(?:y|ies)", r"stadiums?",
    r"golf", r"power (?:plants?|stations?)", r"nuclear", r"solar", r"turbines?", r"wind farms?",
    r"factor(?:y|ies)", r"industrial", r"warehouses?", r"tanks?", r"oil", r"pipelines?",
    r"parking", r"car parks?", r"courts?", r"(?:swimming )?pools?", r"churche?s?", r"temples?",
    r"mosques?", r"towers?", r"castles?", r"monuments?", r"ruins?", r"cemeter(?:y|ies)",
    r"schools?", r"hospitals?", r"malls?", r"vehicles?", r"cars?", r"trucks?", r"greenhouses?",
    r"landfills?", r"villages?", r"towns?", r"cit(?:y|ies)", r"islands?", r"beach(?:es)?",
    r"volcano(?:e?s)?", r"craters?", r"orchards?", r"vineyards?", r"plantations?",
    r"campus(?:es)?", r"resorts?", r"hotels?", r"barns?")
_LEFTOVER_OBJECT_RE = re.compile(r"\b(?:" + "|".join(_OBJECT_WORDS) + r")\b", re.I)


def unchecked_content(clause: str, claims: list[Claim]) -> str | None:
  """A name, link, number, object, negation or comparison in `clause` that none of its claims
  accounts for, or None.

  Such words are never checked ("along the Danube", "visit x.com", "built in 1990", "and a
  golf course", "the tile lacks open water", "more grassland than forest"), so a clause
  holding one goes even when its other claims hold.
  """
  rest = list(_SENSOR_RE.sub(lambda m: " " * len(m.group(0)), clause))
  for c in claims:
    for s, e in ((c.start, c.end), c.number_span or (0, 0), c.extent_span or (0, 0)):
      rest[s:e] = " " * (e - s)
  rest = "".join(rest)
  m = (_LEFTOVER_LINK_RE.search(rest) or _LEFTOVER_NUMBER_RE.search(rest)
       or _LEFTOVER_OBJECT_RE.search(rest) or _LEFTOVER_QUALIFIER_RE.search(rest)
       or _LEFTOVER_DIRECTION_RE.search(rest))
  if m is not None:
    return m.group(0)
  # A capitalised word or an acronym is a name (Unicode: "Łódź", "Évora"), except a clause's
  # first word, which may be capitalised anyway.
  first = re.match(r"\s*\S*", clause).end()
  for w in _WORD_RE.finditer(rest, first):
    word = w.group(0)
    if word[0].isupper() and (len(word) > 1 or not word.isalpha()):
      return word
  return None


# ----------------------------------------------------------------------------------------
# Checking.
# ----------------------------------------------------------------------------------------


# Extent phrases that do not stand before their noun like a determiner.
_NOT_A_DETERMINER = frozenset(("dominated by", "mostly", "mainly", "predominantly", "largely",
                               "without", "free of"))


def _fraction_check(c: Claim, f: float, evidence: str, rng_phrase: str) -> Check:
  """Shared by land cover and water: presence, extent phrase, or percentage."""
  if c.number is not None:
    if abs(c.number - 100.0 * f) <= lx.PERCENT_TOLERANCE:
      return Check(SUPPORTED, evidence)
    if f < lx.PRESENCE_RANGE[0]:
      return Check(CONTRADICTED, evidence)
    return Check(CONTRADICTED, evidence, (*c.number_span, f"{round(100 * f):d}"))
  if c.extent is not None:
    if lx.extent_holds(c.extent, f):
      return Check(SUPPORTED, evidence)
    if c.extent == "none" or f < lx.PRESENCE_RANGE[0]:
      return Check(CONTRADICTED, evidence)
    names = ([n for n in lx.extent_for(f) if n != "none"]
             or [n for n in lx.EXTENTS if n != "none" and lx.extent_holds(n, f)])
    # The swap must read as the original did. A determiner-like phrase ("some", "patches
    # of") is swapped for another; "mostly", "dominated by" or "without" only where it opens
    # the clause ("Mostly cropland" -> "Small patches of cropland"), for inside one it reads
    # differently ("the tile is mostly grassland" -> "the tile is large areas of grassland"):
    # the clause goes instead.
    inside = (c.extent_phrase or "").lower() in _NOT_A_DETERMINER and c.extent_span[0] > 0
    swaps = [p for n in names for p in lx.EXTENTS[n][2] if p not in _NOT_A_DETERMINER]
    if not swaps or inside:
      return Check(CONTRADICTED, evidence)
    return Check(CONTRADICTED, evidence, (*c.extent_span, swaps[0]))
  if f >= lx.PRESENCE_RANGE[0] - 0.002:
    return Check(SUPPORTED, evidence)
  return Check(CONTRADICTED, evidence + f" ({rng_phrase} absent)")


def check_claim(c: Claim, record: AttributeRecord) -> Check:
  v = lambda name: record.value(name, CLAIM_CONFIDENCE)  # noqa: E731
  kind = c.kind
  if kind == "landcover":
    fr = v("landcover.fractions")
    if fr is None:
      return Check(UNSUPPORTED, "land cover unknown")
    f = float(fr.get(c.subject, 0.0))
    return _fraction_check(c, f, f"{c.subject} covers {100 * f:.1f}% "
                           f"({record.get('landcover.fractions').source})", c.subject)
  if kind == "water":
    pct = v("water.percent")
    if pct is None:
      return Check(UNSUPPORTED, "water unknown")
    f = float(pct) / 100.0
    ev = f"water {pct:.1f}% ({record.get('water.percent').source})"
    base = _fraction_check(c, f, ev, "water")
    if base.verdict != SUPPORTED or c.subject == "any" or c.extent == "none":
      return base
    form = v("water.form")
    if form == c.subject:
      return Check(SUPPORTED, ev + f", main water body {form}-shaped")
    return Check(CONTRADICTED, ev + f", main water body is {form or 'of no clear form'}",
                 (c.start, c.end, "open water"))
  if kind == "location":
    return Check(UNSUPPORTED, "only water has a measured position in the tile")
  if kind == "unowned_percent":
    return Check(UNSUPPORTED, "a percentage of no recognised class")
  if kind == "water_location":
    loc = v("water.location")
    if loc is None:
      return Check(UNSUPPORTED, "no located water body")
    if loc == c.subject or (loc != "centre" and c.subject != "centre" and abs(
        (lx.compass_angle(loc) - lx.compass_angle(c.subject) + 180) % 360 - 180) <= 45):
      return Check(SUPPORTED, f"water centred {loc}")
    return Check(CONTRADICTED, f"water centred {loc}")
  if kind == "terrain":
    if c.subject in ("valley", "ridge"):
      lf = v("terrain.landform")
      if lf is None:
        return Check(UNSUPPORTED, "landform unknown")
      return Check(SUPPORTED if lf == c.subject else CONTRADICTED,
                   f"landform {lf} ({record.get('terrain.landform').note})")
    relief, slope = v("terrain.relief"), v("terrain.slope_mean")
    if relief is None or slope is None:
      return Check(UNSUPPORTED, "terrain unknown")
    ok = {relief_class(relief, slope, s) for s in (0.8, 1.0, 1.25)}
    ev = f"relief {relief:.0f} m, mean slope {slope:.1f} deg: {relief_class(relief, slope)}"
    if c.subject in ok:
      return Check(SUPPORTED, ev)
    actual = relief_class(relief, slope)
    fix = None
    if c.text.lower() in ("flat", "hilly", "mountainous") and actual in ("flat", "hilly",
                                                                        "mountainous"):
      fix = (c.start, c.end, actual)
    return Check(CONTRADICTED, ev, fix)
  if kind == "slope":
    p90, mean = v("terrain.slope_p90"), v("terrain.slope_mean")
    if p90 is None:
      return Check(UNSUPPORTED, "slope unknown")
    ev = f"slope mean {mean:.1f}, p90 {p90:.1f} deg"
    ok = (p90 >= lx.STEEP_MIN_SLOPE_P90 - lx.SLOPE_TOLERANCE if c.subject == "steep"
          else mean <= lx.GENTLE_MAX_SLOPE_MEAN + lx.SLOPE_TOLERANCE)
    return Check(SUPPORTED if ok else CONTRADICTED, ev)
  if kind in ("relief", "elevation", "canopy", "tree_cover", "vegetated_fraction"):
    return _number_check(c, record)
  if kind == "aspect":
    asp = v("terrain.aspect")
    if asp is None:
      return Check(UNSUPPORTED, "no single aspect")
    diff = abs((lx.compass_angle(asp) - lx.compass_angle(c.subject) + 180) % 360 - 180)
    return Check(SUPPORTED if diff <= lx.ASPECT_TOLERANCE_DEG else CONTRADICTED,
                 f"fitted plane faces {asp}")
  if kind == "vegetation":
    nd = v("vegetation.ndvi_mean")
    if nd is None:
      return Check(UNSUPPORTED, "NDVI unknown or cloudy")
    ok = lx.density_holds(c.subject, nd)
    return Check(SUPPORTED if ok else CONTRADICTED, f"mean NDVI {nd:.2f}")
  if kind == "builtup":
    b = v("builtup.fraction")
    if b is None:
      return Check(UNSUPPORTED, "built-up unknown")
    ok = b >= lx.DENSE_BUILT_MIN - lx.EXTENT_TOLERANCE
    return Check(SUPPORTED if ok else CONTRADICTED, f"built-up {100 * b:.1f}%")
  if kind in ("season", "month", "hemisphere"):
    name = {"season": "time.season", "month": "time.month", "hemisphere": "time.hemisphere"}[kind]
    val = v(name)
    if val is None:
      return Check(UNSUPPORTED, f"{kind} unknown")
    ok = str(val) == c.subject
    fix = (c.start, c.end, str(val)) if kind == "season" and not ok else None
    return Check(SUPPORTED if ok else CONTRADICTED, f"{kind} {val} (date {v('time.date')})", fix)
  if kind == "place":
    names = {n: v(n) for n in ("place.nearest", "place.region", "place.country")}
    if not any(names.values()):
      return Check(UNSUPPORTED, "place unknown")
    ev = ", ".join(f"{k.split('.')[1]} {val}" for k, val in names.items() if val)
    ok = any(val and _fold(str(val)) == _fold(c.subject) for val in names.values())
    return Check(SUPPORTED if ok else CONTRADICTED, ev)
  raise ValueError(f"no check for claim kind {kind!r}")


def _number_check(c: Claim, record: AttributeRecord) -> Check:
  v = lambda name: record.value(name, CLAIM_CONFIDENCE)  # noqa: E731
  if c.kind == "canopy" and c.subject in ("tall", "low"):
    p90, mean = v("vegetation.canopy_p90"), v("vegetation.canopy_mean")
    if p90 is None:
      return Check(UNSUPPORTED, "canopy height unknown")
    ok = (p90 >= lx.TALL_CANOPY_MIN_P90 - 3.0 if c.subject == "tall"
          else mean <= lx.LOW_CANOPY_MAX_MEAN + 2.0)
    return Check(SUPPORTED if ok else CONTRADICTED, f"canopy mean {mean} m, p90 {p90} m")
  spec = {
      ("canopy", "mean"): ("vegetation.canopy_mean", lx.CANOPY_TOLERANCE, 1.0, "m"),
      ("canopy", "p90"): ("vegetation.canopy_p90", lx.CANOPY_TOLERANCE, 1.0, "m"),
      ("relief", "relief"): ("terrain.relief", lx.RELIEF_TOLERANCE, 1.0, "m"),
      ("elevation", "mean"): ("terrain.elevation_mean", lx.ELEVATION_TOLERANCE, 1.0, "m"),
      ("tree_cover", "mean"): ("vegetation.tree_cover", (lx.PERCENT_TOLERANCE, 0.0), 100.0, "%"),
      ("vegetated_fraction", "mean"): ("vegetation.vegetated_fraction",
                                       (lx.PERCENT_TOLERANCE, 0.0), 100.0, "%"),
  }[(c.kind, c.subject)]
  name, tol, mult, unit = spec
  val = v(name)
  if val is None:
    return Check(UNSUPPORTED, f"{name} unknown")
  measured = float(val) * mult
  ev = f"{name} = {measured:.1f} {unit}"
  if lx.within(c.number, measured, tol):
    return Check(SUPPORTED, ev)
  return Check(CONTRADICTED, ev, (*c.number_span, f"{round(measured):d}"))


# ----------------------------------------------------------------------------------------
# Rewriting.
# ----------------------------------------------------------------------------------------

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_SPLIT = re.compile(r"\s*(?:;|:|,(?!\d{3}\b))\s*")  # "1,490 m" stays whole


def _clauses(sentence: str) -> list[str]:
  """The clauses of a sentence; never split inside brackets ("(about 67%, in the north)")."""
  text = sentence.strip().rstrip(".!?").strip()
  out, depth, start = [], 0, 0
  for m in re.finditer(r"[()]|" + _CLAUSE_SPLIT.pattern, text):
    if m.group(0) == "(":
      depth += 1
    elif m.group(0) == ")":
      depth = max(0, depth - 1)
    elif depth == 0:
      out.append(text[start:m.start()])
      start = m.end()
  out.append(text[start:])
  return [c for c in out if c]


_LEADING_LINK_RE = re.compile(r"^(?:and|but|or|with|while|whereas|plus)\b\s*", re.I)


def _join(clauses: list[str]) -> str:
  clauses = [c.strip() for c in clauses if c.strip()]
  if clauses:  # "A golf course, and mostly forest" without its first clause: "Mostly forest"
    clauses[0] = _LEADING_LINK_RE.sub("", clauses[0])
  s = ", ".join(c for c in clauses if c)
  return (s[0].upper() + s[1:] + ".") if s else ""


def _pass(caption: str, record: AttributeRecord, *, rewrite: bool = True
          ) -> tuple[str, list[dict[str, Any]], int]:
  """One verification pass: returns the rewritten caption, the claim table, and how many
  claims were contradicted or unsupported. With `rewrite` off, a contradicted claim removes
  its clause even when a fix exists."""
  table: list[dict[str, Any]] = []
  bad = 0
  sentences_out = []
  for sentence in _SENTENCE_SPLIT.split(caption.strip()):
    kept = []
    supported_in_sentence = 0
    for clause in _clauses(sentence):
      claims = parse_clause(clause, record)
      fixes, drop = [], False
      for c in claims:
        chk = check_claim(c, record)
        action = "keep"
        if chk.verdict != SUPPORTED:
          bad += 1
          if rewrite and chk.verdict == CONTRADICTED and chk.fix is not None:
            fixes.append(chk.fix)
            action = f"rewrite -> {chk.fix[2]!r}"
          else:
            drop = True
            action = "remove clause"
        table.append({"claim": c.text, "kind": c.kind, "subject": c.subject,
                      "evidence": chk.evidence, "verdict": chk.verdict, "action": action})
      leftover = unchecked_content(clause, claims) if claims else None
      if leftover is not None:
        bad += 1
        drop = True
        table.append({"claim": clause, "kind": "unchecked", "subject": leftover, "evidence": "",
                      "verdict": UNSUPPORTED, "action": f"remove clause (unchecked {leftover!r})"})
      if drop:
        continue
      if not claims:
        table.append({"claim": clause, "kind": "none", "subject": "", "evidence": "",
                      "verdict": UNSUPPORTED, "action": "remove clause (no verifiable content)"})
        continue
      for s, e, repl in sorted(fixes, reverse=True):
        clause = clause[:s] + repl + clause[e:]
      kept.append(clause)
      supported_in_sentence += len(claims)
    if kept and supported_in_sentence:
      sentences_out.append(_join(kept))
  return " ".join(sentences_out).strip(), table, bad


def coverage(final_table: list[dict[str, Any]], record: AttributeRecord) -> float:
  available = available_groups(record)
  if not available:
    return 0.0
  supported = [r for r in final_table if r["verdict"] == SUPPORTED and r["kind"] in _KIND_GROUP]
  covered = {_KIND_GROUP[r["kind"]] for r in supported}
  if any(r["kind"] == "landcover" and r["subject"] == "built" for r in supported):
    covered.add("builtup")  # "built-up areas (about 85%)" speaks to it as much as "densely built"
  return len(covered & available) / len(available)


def available_groups(record: AttributeRecord) -> set[str]:
  v = lambda name: record.value(name, CLAIM_CONFIDENCE)  # noqa: E731
  groups = set()
  if v("landcover.fractions"):
    groups.add("landcover")
  if v("water.percent") is not None:
    groups.add("water")
  if v("terrain.class"):
    groups.add("terrain")
  if v("vegetation.ndvi_mean") is not None or v("vegetation.canopy_mean") is not None:
    groups.add("vegetation")
  if (v("builtup.fraction") or 0.0) >= 0.01:
    groups.add("builtup")
  if v("time.season"):
    groups.add("season")
  if v("place.country"):
    groups.add("place")
  return groups


def verify(caption: str, record: AttributeRecord, max_passes: int = 3) -> Verification:
  """Checks, rewrites and re-checks a caption until a pass finds nothing to fix."""
  original = caption if isinstance(caption, str) else ""
  original = unicodedata.normalize("NFC", original)  # "Škofja" as one letter, as names are
  if not original.strip():
    return Verification(original, None, [], [], 0.0, 0.0, "empty_caption")
  text, first_table, _ = _pass(original, record)
  n_claims = sum(1 for r in first_table if r["kind"] != "none")
  n_ok = sum(1 for r in first_table if r["verdict"] == SUPPORTED)
  precision = n_ok / n_claims if n_claims else 0.0
  final_table: list[dict[str, Any]] = []
  for _ in range(max_passes):
    if not text:
      break
    new_text, final_table, bad = _pass(text, record)
    if bad == 0 and new_text == text:
      break
    text = new_text
  else:
    # Still changing after max_passes: drop the clauses that are still wrong, keep the rest.
    text, _, _ = _pass(text, record, rewrite=False)
    final_table = _pass(text, record)[1] if text else []
  if not text or not any(r["verdict"] == SUPPORTED for r in final_table):
    return Verification(original, None, first_table, [], precision, 0.0,
                        "no_verifiable_content")
  return Verification(original, text, first_table, final_table, precision,
                      coverage(final_table, record))

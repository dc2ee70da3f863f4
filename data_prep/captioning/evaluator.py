"""The evaluator: scores every candidate caption and keeps the best.

Scores (all in [0, 1], all recorded in the provenance):
* ``precision``: supported claims / claims of the raw candidate (the verifier's first pass), so
  a candidate that needed rewriting ranks below one that was right;
* ``coverage``: share of the record's available attribute groups the verified caption covers;
* ``length``: 1 for 12..70 words, falling linearly to 0 at 0 and at 140 words;
* ``similarity`` (optional): a vision-text score from ``embed_fn(example, captions)``, e.g. the
  cosine similarity of a GeoMeld-FM checkpoint's contrastive embeddings mapped to [0, 1], so a
  first model can re-rank the captions of the next build.
Total = weighted sum (weights renormalised over the scores present). A candidate the verifier
rejected is never selected.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

from data_prep.captioning.orchestrator import AttributeRecord
from data_prep.captioning.verifier import Verification, verify

EmbedFn = Callable[[Mapping[str, Any], Sequence[str]], Sequence[float]]
DEFAULT_WEIGHTS = {"precision": 0.5, "coverage": 0.35, "length": 0.15, "similarity": 0.3}
MIN_WORDS, MAX_WORDS = 12, 70


@dataclasses.dataclass
class ScoredCandidate:
  index: int
  text: str
  verification: Verification
  scores: dict[str, float]
  total: float  # -inf when the verifier rejected the candidate

  def to_dict(self) -> dict[str, Any]:
    return {"index": self.index, "text": self.text, "verified": self.verification.caption,
            "rejected": self.verification.reason, "scores": self.scores,
            "total": None if math.isinf(self.total) else round(self.total, 4),
            "claims": self.verification.claims}


def length_score(text: str | None) -> float:
  n = len((text or "").split())
  if MIN_WORDS <= n <= MAX_WORDS:
    return 1.0
  if n < MIN_WORDS:
    return n / MIN_WORDS
  return max(0.0, 1.0 - (n - MAX_WORDS) / MAX_WORDS)


def score_candidates(candidates: Sequence[str], record: AttributeRecord,
                     example: Mapping[str, Any] | None = None, embed_fn: EmbedFn | None = None,
                     weights: Mapping[str, float] = DEFAULT_WEIGHTS
                     ) -> tuple[list[ScoredCandidate], str]:
  """Verifies and scores each candidate. Returns (scored, similarity error or '')."""
  scored = []
  for i, text in enumerate(candidates):
    ver = verify(text, record)
    scored.append(ScoredCandidate(i, text, ver, {
        "precision": round(ver.precision, 4), "coverage": round(ver.coverage, 4),
        "length": round(length_score(ver.caption), 4)}, 0.0))
  sim_error = ""
  if embed_fn is not None:
    alive = [s for s in scored if s.verification.caption]
    if alive:
      try:
        sims = [float(x) for x in embed_fn(example or {}, [s.verification.caption for s in alive])]
        if len(sims) != len(alive) or not all(math.isfinite(x) for x in sims):
          raise ValueError(f"embed_fn returned {len(sims)} scores for {len(alive)} captions "
                           "(need one finite score each)")
        for s, x in zip(alive, sims):
          s.scores["similarity"] = round(min(1.0, max(0.0, x)), 4)
      except Exception as e:  # pylint: disable=broad-except
        # A broken re-ranking model must not stop the build: rank without it, say why.
        sim_error = f"{type(e).__name__}: {e}"
  for s in scored:
    if not s.verification.caption:
      s.total = -math.inf
      continue
    w = {k: weights[k] for k in s.scores}
    s.total = sum(w[k] * s.scores[k] for k in s.scores) / sum(w.values())
  return scored, sim_error


def best(scored: Sequence[ScoredCandidate]) -> ScoredCandidate | None:
  """The highest total; ties go to the earlier candidate (deterministic)."""
  alive = [s for s in scored if not math.isinf(s.total)]
  return max(alive, key=lambda s: (s.total, -s.index)) if alive else None

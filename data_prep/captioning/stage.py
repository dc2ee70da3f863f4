"""The caption stage of the dataset build: orchestrator -> captioner -> evaluator -> verifier.

`make_caption_stage(name, **options)` returns an object with
``process(example: dict) -> dict | Rejection`` (the build pipeline's CaptionStage interface):

* ``'agentic'``: the offline realiser (the default; deterministic for a seed);
* ``'llm'``: an OpenAI-compatible server (see `llm.LLMConfig`), with per-sample fallback to the
  realiser when the server is down, slow, answers garbage, or all its candidates fail
  verification; the reason is recorded in the provenance.

The returned example is a shallow copy with ``captions = [verified caption]`` and
``caption_provenance`` = JSON (backend, model, seed, fallback, the attribute record, every
candidate with its scores and claim table, the selected index, the final caption and its
claim table, the source's own captions). The source's own captions are NOT kept in
``captions`` by default: they were never checked against this tile's attributes, and the
contrastive objective learns from whatever is there; they stay in the provenance, and
``keep_source_captions=True`` appends them after the verified caption. If no candidate
survives verification the sample becomes ``Rejection(reason='empty_caption')``: an empty or
whitespace caption never reaches the dataset.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any, Mapping, Sequence

from data_prep.captioning import evaluator
from data_prep.captioning import geocode
from data_prep.captioning import llm as llm_lib
from data_prep.captioning import orchestrator
from data_prep.captioning import realiser
from data_prep.sources.base import Rejection

PROVENANCE_VERSION = 1
DEFAULT_K = 4


class CaptionStage:
  """Caption one record dict at a time. Picklable (Beam ships it to workers): the HTTP client
  and gazetteer are created lazily in each process."""

  def __init__(self, backend: str = "agentic", *, k: int = DEFAULT_K, seed: int = 0,
               llm_config: llm_lib.LLMConfig | None = None,
               embed_fn: evaluator.EmbedFn | None = None, keep_source_captions: bool = False,
               use_gazetteer: bool = True):
    if backend not in ("agentic", "llm"):
      raise ValueError(f"unknown caption backend {backend!r}; choose 'agentic' or 'llm'")
    if backend == "llm" and llm_config is None:
      raise ValueError("backend 'llm' needs an llm_config (or GEOMELD_LLM_* variables)")
    if int(k) < 1:
      raise ValueError(f"k (candidates per sample) must be >= 1, got {k}")
    self.backend = backend
    self.name = backend  # the build's --captioner name
    self.k = int(k)
    self.seed = int(seed)
    self.llm_config = llm_config
    self.embed_fn = embed_fn
    self.keep_source_captions = bool(keep_source_captions)
    self.use_gazetteer = bool(use_gazetteer)
    self._client: llm_lib.ChatClient | None = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_client"] = None  # locks and sockets do not travel
    return state

  def _gazetteer(self):
    return geocode.default_gazetteer() if self.use_gazetteer else None

  def client(self) -> llm_lib.ChatClient:
    if self._client is None:
      self._client = llm_lib.ChatClient(self.llm_config)
    return self._client

  # -- captioners ------------------------------------------------------------------------
  def llm_candidates(self, record: orchestrator.AttributeRecord
                     ) -> tuple[list[str], list[dict[str, Any]]]:
    """K completions; returns (texts, per-request log with cache hits and error reasons)."""
    client = self.client()

    def one(i: int):
      messages = orchestrator.render_prompt(record, variant=i)
      ph = orchestrator.prompt_hash(messages)
      try:
        text, cached = client.complete(messages, tile_id=record.tile_id, prompt_hash=ph,
                                       index=i, seed=self.seed * 1000 + i)
        return text, {"index": i, "prompt_hash": ph, "cached": cached}
      except llm_lib.LLMError as e:
        return None, {"index": i, "prompt_hash": ph, "error": e.reason, "detail": e.detail}

    workers = max(1, min(self.k, self.llm_config.max_concurrency))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      results = list(pool.map(one, range(self.k)))
    texts = [t for t, _ in results if t]
    if any(log.get("error") != "circuit_open" for _, log in results):  # an open breaker is no news
      client.record_outcome(bool(texts))
    return texts, [log for _, log in results]

  # -- the stage -------------------------------------------------------------------------
  def process(self, example: Mapping[str, Any]) -> dict[str, Any] | Rejection:
    record = orchestrator.orchestrate(example, gazetteer=self._gazetteer())
    provenance: dict[str, Any] = {"backend": self.backend, "fallback": None, "requests": []}
    candidates: list[str] = []
    if self.backend == "llm":
      provenance["model"] = self.llm_config.model
      candidates, provenance["requests"] = self.llm_candidates(record)
      if not candidates:
        reasons = sorted({r.get("error", "") for r in provenance["requests"]} - {""})
        provenance["fallback"] = {"reason": "llm_unavailable", "detail": ",".join(reasons)}
    return self.finish(example, record, candidates, provenance)

  def finish(self, example: Mapping[str, Any], record: orchestrator.AttributeRecord,
             candidates: Sequence[str], provenance: dict[str, Any]
             ) -> dict[str, Any] | Rejection:
    """Scores, verifies and selects among `candidates` (the realiser's when empty, or when
    none of the given ones survives verification: that fallback is recorded)."""
    provenance = dict(provenance)
    backend_used = "llm" if candidates else "agentic"
    if not candidates:
      candidates = realiser.realise(record, self.k, self.seed)
    scored, sim_error = evaluator.score_candidates(candidates, record, example, self.embed_fn)
    chosen = evaluator.best(scored)
    if chosen is None and backend_used == "llm":
      provenance["fallback"] = {"reason": "llm_candidates_rejected",
                                "detail": "no language-model candidate survived verification",
                                "rejected_candidates": [s.to_dict() for s in scored]}
      return self.finish(example, record, [], provenance)
    source_captions = [str(c) for c in example.get("captions", [])]
    tile_id, source = str(example.get("tile_id", "")), str(example.get("source", ""))
    if chosen is None or not (chosen.verification.caption or "").strip():
      reasons = sorted({s.verification.reason for s in scored}) or ["no_candidates"]
      return Rejection(source=source, tile_id=tile_id, reason="empty_caption",
                       detail=f"no candidate survived verification ({','.join(reasons)})")
    final = chosen.verification.caption.strip()
    provenance.update({
        "version": PROVENANCE_VERSION, "captioner": backend_used, "seed": self.seed,
        "k": self.k, "attributes": record.to_dict(),
        "candidates": [s.to_dict() for s in scored], "selected": chosen.index,
        "similarity_error": sim_error, "final_caption": final,
        "final_claims": chosen.verification.final_claims, "source_captions": source_captions,
    })
    out = dict(example)
    out["captions"] = [final] + ([c for c in source_captions if c.strip()]
                                 if self.keep_source_captions else [])
    out["caption_provenance"] = json.dumps(provenance, sort_keys=True)
    return out


def make_caption_stage(name: str, **options) -> CaptionStage:
  """'agentic' (offline realiser) or 'llm' (HTTP client, realiser fallback per sample).

  Options: k, seed, embed_fn, keep_source_captions, use_gazetteer; for 'llm' either
  llm_config=LLMConfig(...) or endpoint/model/api_key/timeout_s/retries/backoff_s/
  max_concurrency/cache_dir/... (missing ones from GEOMELD_LLM_<FIELD> environment variables).
  """
  stage_keys = ("k", "seed", "embed_fn", "keep_source_captions", "use_gazetteer")
  stage_opts = {key: options.pop(key) for key in stage_keys if key in options}
  if name == "agentic":
    if options:
      raise ValueError(f"caption stage 'agentic' got unknown options {sorted(options)}")
    return CaptionStage("agentic", **stage_opts)
  if name == "llm":
    config = options.pop("llm_config", None) or llm_lib.LLMConfig.from_env(**options)
    return CaptionStage("llm", llm_config=config, **stage_opts)
  raise ValueError(f"unknown captioner {name!r}; choose 'agentic' or 'llm'")

"""Agentic captioning of GeoMeld tiles: orchestrator -> captioners -> evaluator -> verifier.

`stage.make_caption_stage` is the entry point; importing this package registers its stages
with the build (``--captioner=agentic`` and ``--captioner=llm``, the latter configured by the
GEOMELD_LLM_* environment variables). `python -m data_prep.captioning.eval` measures claim
precision and hallucination.
"""

from data_prep import caption_stage as _build_stages
from data_prep.captioning import stage as _stage

_build_stages.register_caption_stage("agentic", lambda: _stage.make_caption_stage("agentic"))
_build_stages.register_caption_stage("llm", lambda: _stage.make_caption_stage("llm"))

"""SentencePiece caption tokenizer, trained on the train split's captions.

Unigram model, normalised by NFKC + case folding (lower case; runs of whitespace collapse to
one space), with T5-style fixed special ids so the text model can hard-code them: ``PAD_ID = 0``, ``EOS_ID = 1``, ``UNK_ID = 2`` and no BOS
(``BOS_ID = -1``). ``hard_vocab_limit=False`` lets a small corpus produce fewer pieces than
``vocab_size`` instead of failing. Training is in memory (sentence iterator + model writer)
and deterministic for a given sentence list; callers sort the sentences first.
"""

from __future__ import annotations

import io
import logging
import os
import unicodedata
from typing import Iterable

import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = -1  # no BOS piece (T5 convention)
DEFAULT_VOCAB_SIZE = 8000
MODEL_FILENAME = "tokenizer.model"
RARE_CHARACTER_COVERAGE = 0.9995
MIN_VOCAB_SIZE = 8  # the reserved pieces and a handful more


def train_tokenizer_bytes(sentences: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
  """Trains the tokenizer and returns the serialized model proto."""
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
  sentences = [s.strip() for s in sentences if s and s.strip()]
  if not sentences:
    raise ValueError("cannot train a tokenizer on no sentences")
  # Every character gets a piece when the alphabet fits the vocabulary; otherwise (place names
  # in many scripts) the rarest 0.05% of characters become <unk>, SentencePiece's CJK default.
  alphabet = len({c for s in sentences for c in unicodedata.normalize("NFKC", s).lower()} - {" "})
  coverage = 1.0 if alphabet + 3 <= vocab_size else RARE_CHARACTER_COVERAGE
  if coverage < 1.0:
    logging.warning("the captions hold %d distinct characters, more than vocab_size %d allows: "
                    "training with character_coverage %g", alphabet, vocab_size, coverage)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding: lower-case
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=coverage,
        num_threads=1,  # one thread: the model is identical across machines
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on captions with {alphabet} "
                     f"distinct characters ({e}); raise vocab_size") from None
  return model.getvalue()


def train_tokenizer(sentences: Iterable[str], output_path: str | os.PathLike,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> spm.SentencePieceProcessor:
  """Trains on `sentences`, writes the model to `output_path` and returns it loaded."""
  proto = train_tokenizer_bytes(sentences, vocab_size)
  with open(output_path, "wb") as f:
    f.write(proto)
  return load(proto)


def load(model: bytes | str | os.PathLike) -> spm.SentencePieceProcessor:
  """A tokenizer from serialized model bytes or a model file path."""
  if isinstance(model, bytes):
    return spm.SentencePieceProcessor(model_proto=model)
  return spm.SentencePieceProcessor(model_file=os.fspath(model))

"""SentencePiece tokenizer on real remote-sensing captions: fixed ids, round trip."""

import ast
import csv

import pytest

from data_prep import tokenizer


@pytest.fixture(scope="module")
def captions(shared_data):
  rows = list(csv.DictReader(open(shared_data / "rs_captions" / "UCM_captions.csv")))
  sentences = [s for r in rows for s in ast.literal_eval(r["sentence"])]
  assert len(sentences) == 10_500
  return sorted(sentences)


@pytest.fixture(scope="module")
def model(captions, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  sp = tokenizer.train_tokenizer(captions, path, vocab_size=2000)
  return sp, path


def test_fixed_special_ids(model):
  sp, _ = model
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (
      tokenizer.PAD_ID, tokenizer.EOS_ID, tokenizer.UNK_ID, tokenizer.BOS_ID) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  assert 100 < sp.get_piece_size() <= 2000


def test_round_trip_lowercase_and_file(model, captions):
  sp, path = model
  for text in captions[:50]:
    ids = sp.encode(text)
    assert all(i > 2 for i in ids)
    # Normalisation: NFKC, lower case, runs of whitespace collapsed.
    assert sp.decode(ids) == " ".join(text.lower().split())
  assert sp.encode("A Plane") == sp.encode("a plane")
  again = tokenizer.load(str(path))
  assert again.encode(captions[0]) == sp.encode(captions[0])


def test_small_corpus_and_determinism(tmp_path):
  small = ["a river next to a field", "many trees near a road"]
  sp = tokenizer.train_tokenizer(small, tmp_path / "t.model", vocab_size=8000)
  assert sp.get_piece_size() < 8000 and sp.decode(sp.encode(small[0])) == small[0]
  assert tokenizer.train_tokenizer_bytes(small, 100) == tokenizer.train_tokenizer_bytes(small, 100)
  with pytest.raises(ValueError, match="no sentences"):
    tokenizer.train_tokenizer_bytes([" ", ""], 100)


def test_an_alphabet_larger_than_the_vocabulary():
  """Place names in many scripts: the rarest characters become <unk> instead of a crash."""
  common = [f"cropland and forest near a river, tile {i}" for i in range(3000)]
  rare = "".join(chr(0x4E00 + i) for i in range(40))  # 40 CJK characters, once each
  proto = tokenizer.train_tokenizer_bytes(common + [f"near {rare}"], vocab_size=60)
  sp = tokenizer.load(proto)
  assert sp.get_piece_size() <= 60
  assert tokenizer.UNK_ID in sp.encode(rare)
  with pytest.raises(ValueError, match="distinct characters.*raise vocab_size"):
    tokenizer.train_tokenizer_bytes(["abcdefghij klmnopqrstuvwxyz"] * 3, vocab_size=12)

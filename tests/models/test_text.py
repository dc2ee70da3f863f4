"""Caption encoder: pooling index, pad invariance, causality, finiteness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geomeld_jax.models import text

PAD, EOS = 0, 1


def _tokens(lengths, width, seed=0):
  """Sticky-EOS captions: ids >= 2, EOS as the last non-pad token, pads after."""
  r = np.random.default_rng(seed)
  tok = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    if n:
      tok[i, :n - 1] = r.integers(2, 50, n - 1)
      tok[i, n - 1] = EOS
  return jnp.asarray(tok)


def _encoder(causal, pooling):
  return text.TextEncoder(64, context_length=16, width=32, layers=2, heads=4, embed_dim=24,
                          causal=causal, pooling=pooling, pad_id=PAD, rngs=nnx.Rngs(0))


def test_eos_index_points_at_eos():
  tok = _tokens([5, 12, 1], 12)
  idx = np.asarray(text.eos_index(tok, PAD))
  np.testing.assert_array_equal(idx, [4, 11, 0])
  assert np.all(np.asarray(tok)[np.arange(3), idx] == EOS)


@pytest.mark.parametrize("causal,pooling", [(True, "eos"), (False, "eos"), (False, "mean"),
                                            (True, "mean")])
def test_output_ignores_padding(causal, pooling):
  enc = _encoder(causal, pooling)
  lengths = [5, 9, 3]
  short, long = _tokens(lengths, 10), _tokens(lengths, 16)
  out_short, out_long = enc(short), enc(long)
  assert out_short.shape == (3, 24) and out_short.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out_short), np.asarray(out_long), atol=1e-5)
  # Changing a pad id to a real token changes the output: padding is masked, not ignored blindly.
  changed = long.at[0, 8].set(7)
  assert not np.allclose(np.asarray(enc(changed))[0], np.asarray(out_long)[0], atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal):
  enc = _encoder(causal, "eos")
  a = _tokens([8], 8, seed=1)
  b = a.at[0, 5].set(int(a[0, 5]) % 40 + 3)  # change token 5 only
  ha, hb = np.asarray(enc.hidden_states(a)), np.asarray(enc.hidden_states(b))
  assert not np.allclose(ha[0, 5:], hb[0, 5:], atol=1e-5)
  # Causal: positions before 5 cannot see token 5; bidirectional: they can.
  assert np.allclose(ha[0, :5], hb[0, :5], atol=1e-6) == causal
  # EOS (last) pooling sees every token in both modes.
  assert not np.allclose(np.asarray(enc(a)), np.asarray(enc(b)), atol=1e-5)


def test_empty_caption_and_gradients_are_finite():
  enc = _encoder(True, "eos")
  tok = _tokens([0, 4], 8)  # an all-pad row: no key to attend to
  out = enc(tok)
  assert np.all(np.isfinite(np.asarray(out)))
  graphdef, params = nnx.split(enc)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tok) ** 2))(params)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="exceeds the text context"):
    enc(_tokens([3], 20))

"""Caption encoder: a small pre-LN Transformer over SentencePiece ids (objectives.md §5.4).

Token ids follow the project tokenizer (T5-style: pad 0, eos 1, sticky EOS: the last non-pad
token of a caption is EOS). Attention is causal (CLIP) or bidirectional with pad keys masked;
pooling takes the last non-pad token ('eos', natural with a causal mask) or the mean over
non-pad tokens ('mean'). Softmax, norms and pooling run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32
_MASKED = -1e9  # finite: a row with no allowed key (an empty caption) stays NaN-free


def _lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """table[tokens]; on an Explicit mesh the rows follow the tokens' batch sharding."""
  spec = jax.typeof(tokens).sharding.spec
  if spec and any(s is not None for s in spec):
    out = jax.sharding.PartitionSpec(*spec, None)
    return table.at[tokens].get(out_sharding=out)
  return jnp.take(table, tokens, axis=0)


class _Attention(nnx.Module):
  """Multi-head self-attention with a boolean (B, 1, L, L) allow-mask; f32 softmax."""

  def __init__(self, width: int, heads: int, layers: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"text width {width} is not divisible by heads {heads}")
    self.heads = heads
    std = width ** -0.5
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=nnx.initializers.normal(std),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # open_clip: out_proj std width^-0.5 * (2 * layers)^-0.5 keeps the residual stream tame.
    self.out = nnx.Linear(width, width,
                          kernel_init=nnx.initializers.normal(std * (2 * layers) ** -0.5),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, allow: jax.Array) -> jax.Array:
    b, length, width = x.shape
    qkv = self.qkv(x).reshape(b, length, 3, self.heads, width // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # float32 out of the matmul itself: cast afterwards, the logits keep bf16's rounding.
    scores = (jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32)
              * (width // self.heads) ** -0.5)
    probs = jax.nn.softmax(jnp.where(allow, scores, _MASKED), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, width)
    return self.out(out)


class _Block(nnx.Module):
  """Pre-LN residual block: x + attn(LN(x)); x + MLP(LN(x))."""

  def __init__(self, width: int, heads: int, layers: int, mlp_ratio: int, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm1 = nnx.LayerNorm(width, epsilon=1e-5, dtype=F32, param_dtype=param_dtype,
                               rngs=rngs)
    self.attn = _Attention(width, heads, layers, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, epsilon=1e-5, dtype=F32, param_dtype=param_dtype,
                               rngs=rngs)
    hidden = mlp_ratio * width
    self.fc1 = nnx.Linear(width, hidden, kernel_init=nnx.initializers.normal((2 * width) ** -0.5),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width,
                          kernel_init=nnx.initializers.normal(width ** -0.5 * (2 * layers) ** -0.5),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, allow: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x).astype(self.dtype), allow).astype(x.dtype)
    h = jax.nn.gelu(self.fc1(self.norm2(x).astype(self.dtype)), approximate=False)
    return x + self.fc2(h).astype(x.dtype)


class TextEncoder(nnx.Module):
  """Token + learned position embeddings -> pre-LN Transformer -> LN -> pool -> Linear.

  Returns the UNNORMALISED joint-space embedding (B, embed_dim) in float32; the model
  L2-normalises it together with the image side.
  """

  def __init__(self, vocab_size: int, *, context_length: int = 64, width: int = 256,
               layers: int = 6, heads: int = 4, mlp_ratio: int = 4, embed_dim: int = 256,
               causal: bool = True, pooling: str = "eos", pad_id: int = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if pooling not in ("eos", "mean"):
      raise ValueError(f"text pooling must be 'eos' or 'mean', got {pooling!r}")
    self.context_length = context_length
    self.causal = causal
    self.pooling = pooling
    self.pad_id = pad_id
    self.dtype = dtype
    self.token_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (vocab_size, width), param_dtype))
    self.pos_embedding = nnx.Param(
        nnx.initializers.normal(0.01)(rngs.params(), (context_length, width), param_dtype))
    self.blocks = nnx.List([
        _Block(width, heads, layers, mlp_ratio, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(layers)
    ])
    self.final_norm = nnx.LayerNorm(width, epsilon=1e-5, dtype=F32, param_dtype=param_dtype,
                                    rngs=rngs)
    self.projection = nnx.Linear(width, embed_dim, use_bias=False,
                                 kernel_init=nnx.initializers.normal(width ** -0.5),
                                 dtype=F32, param_dtype=param_dtype, rngs=rngs)

  def hidden_states(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, L) -> final-LN token states (B, L, width) in float32."""
    _, length = tokens.shape
    if length > self.context_length:
      raise ValueError(f"text_tokens length {length} exceeds the text context "
                       f"{self.context_length}")
    not_pad = tokens != self.pad_id
    x = _lookup(self.token_embedding[...], tokens).astype(F32)
    x = x + self.pos_embedding[...][:length].astype(F32)
    allow = not_pad[:, None, None, :]  # pad keys never attended
    if self.causal:
      allow = allow & jnp.tril(jnp.ones((length, length), bool))[None, None]
    for block in self.blocks:
      x = block(x, allow)
    return self.final_norm(x)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, L) int32, L <= context_length, pads (pad_id) trailing -> (B, embed_dim) f32."""
    x = self.hidden_states(tokens)
    not_pad = tokens != self.pad_id
    if self.pooling == "eos":
      # Sticky EOS: the last non-pad token is EOS. Its index, 0 for an empty caption.
      last = eos_index(tokens, self.pad_id)
      # A one-hot sum instead of take_along_axis: no gather for sharding rules to resolve.
      pick = jnp.arange(x.shape[1])[None, :] == last[:, None]
      pooled = jnp.sum(jnp.where(pick[..., None], x, 0.0), axis=1)
    else:
      w = not_pad.astype(F32)[..., None]
      pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return self.projection(pooled)


def eos_index(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
  """Index of the last non-pad token per row (what 'eos' pooling reads)."""
  length = tokens.shape[1]
  return jnp.max(jnp.where(tokens != pad_id, jnp.arange(length)[None, :], 0), axis=1)

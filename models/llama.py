"""A Llama-family decoder in Flax NNX on the kvtpu cache.

`logits, cache = model(tokens, cache)` runs a chunk of tokens `i32[B, T]` through
every layer: q/k/v projections (optional biases, as in Qwen2), rotary embeddings at
each sequence's own positions `cache.lengths[b] + t` (optional Llama-3 frequency
scaling), `cache.update` (quantize-on-write) and `kvtpu.attend` per layer, SwiGLU
MLP, RMSNorm, tied or untied output head; then `cache.advance`. The same call serves
prefill chunks and single-token decode, for every cache format and `impl`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from kvtpu.models.config import ModelConfig, RopeScaling

import kvtpu
from kvtpu.sharding import CacheSharding

__all__ = ["Llama", "rope_frequencies", "apply_rope"]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
  """Inverse frequencies `[H/2]`, with Llama-3 scaling when given."""
  inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is None:
    return inv
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  mid = (1 - smooth) * inv / scaling.factor + smooth * inv
  return jnp.where(wavelen < high_wavelen, inv,
                   jnp.where(wavelen > low_wavelen, inv / scaling.factor, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, rotate-half convention: `x: [B, T, heads, H]`, `positions: [B, T]`."""
  angles = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, T, H/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    weight = self.weight[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (xf * weight).astype(x.dtype)


class Block(nnx.Module):
  """One decoder layer: attention over the cache, then the SwiGLU MLP."""

  def __init__(self, cfg: ModelConfig, index: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.index = index
    self.cfg = cfg
    d, h = cfg.hidden_size, cfg.head_dim
    dense = lambda i, o, bias=False: nnx.Linear(  # noqa: E731
        i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.q_proj = dense(d, cfg.num_heads * h, cfg.qkv_bias)
    self.k_proj = dense(d, cfg.num_kv_heads * h, cfg.qkv_bias)
    self.v_proj = dense(d, cfg.num_kv_heads * h, cfg.qkv_bias)
    self.o_proj = dense(cfg.num_heads * h, d)
    self.post_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.gate_proj = dense(d, cfg.intermediate_size)
    self.up_proj = dense(d, cfg.intermediate_size)
    self.down_proj = dense(cfg.intermediate_size, d)

  def __call__(self, x, cache: kvtpu.KVCache, positions, inv_freq, valid_len, impl, observe,
               cache_sharding=None):
    cfg = self.cfg
    b, t, _ = x.shape
    y = self.input_norm(x)
    q = self.q_proj(y).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(y).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(y).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if observe is not None:
      observe(self.index, "k_pre", k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if observe is not None:
      observe(self.index, "q", q)
      observe(self.index, "k", k)
      observe(self.index, "v", v)
    if cache_sharding is None:
      cache = cache.update(self.index, k, v, valid_len=valid_len)
      attn = kvtpu.attend(q, cache, self.index, valid_len=valid_len, impl=impl)
    else:
      cache = cache_sharding.update(cache, self.index, k, v, valid_len=valid_len)
      attn = cache_sharding.attend(q, cache, self.index, valid_len=valid_len, impl=impl)
    if observe is not None:
      observe(self.index, "attn", attn)
    x = x + self.o_proj(attn.reshape(b, t, cfg.num_heads * cfg.head_dim))
    y = self.post_norm(x)
    x = x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))
    return x, cache


class Llama(nnx.Module):
  """A Llama-family decoder whose KV cache is an argument and a return value.

  Args:
    cfg: the model's shapes.
    rngs: parameter initialization (random weights; loaders replace them).
    dtype: computation dtype of the projections; param_dtype: of the weights.
    weight_precision: how the weights were obtained, for reports (kept apart from
      the KV cache's precision).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, weight_precision: str = "random init (float32)"):
    self.cfg = cfg
    self.weight_precision = weight_precision
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if cfg.tie_embeddings else nnx.Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)

  def init_cache(self, fmt, *, batch: int, max_len: int, calibration=None,
                 **static_scales) -> kvtpu.KVCache | kvtpu.LayeredKVCache:
    """An empty cache for this model in `fmt`.

    Args:
      fmt: the cache format; or a `kvtpu.LayerPlan` (or plan name) of formats per layer,
        which gives a `kvtpu.LayeredKVCache` (dynamic formats only).
      batch, max_len: sequences and positions.
      calibration: a `kvtpu.calibration.CalibrationArtifact` for static formats; it
        must have been made on this model (same `cfg.name`) and format.
      **static_scales: or explicit `k_scale=`, `v_scale=`, ... (see `KVCache.init`).
    """
    plan = kvtpu.LayerPlan.parse(fmt)
    if plan.overrides:
      if calibration is not None or static_scales:
        raise ValueError(f"a layer plan ({plan.name}) takes no calibration or static scales: "
                         "its formats are dynamic")
      return kvtpu.LayeredKVCache.init(plan, num_layers=self.cfg.num_layers, batch=batch,
                                       kv_heads=self.cfg.num_kv_heads, max_len=max_len,
                                       head_dim=self.cfg.head_dim)
    fmt = plan.default
    if calibration is not None:
      calibration.check_compatible(num_layers=self.cfg.num_layers,
                                   kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
                                   model_name=self.cfg.name)
    return kvtpu.KVCache.init(fmt, num_layers=self.cfg.num_layers, batch=batch,
                              kv_heads=self.cfg.num_kv_heads, max_len=max_len,
                              head_dim=self.cfg.head_dim, calibration=calibration,
                              **static_scales)

  def __call__(self, tokens: jax.Array, cache: kvtpu.KVCache, *, valid_len=None,
               impl: str = "auto", logits_at=None,
               observe: Callable[[int, str, jax.Array], None] | None = None,
               cache_sharding: CacheSharding | None = None,
               ) -> tuple[jax.Array, kvtpu.KVCache]:
    """Runs `tokens: i32[B, T]` at positions `cache.lengths[b] + t`.

    Args:
      tokens: the chunk's token ids.
      cache: this model's cache (`init_cache`); its lengths say where each sequence is.
      valid_len: optional `i32[B]`: only the first `valid_len[b]` tokens are real
        (ragged chunks); the cache advances by it (default T).
      impl: `kvtpu.attend` implementation.
      logits_at: optional `i32[B]`: compute logits only at chunk position
        `logits_at[b]` of each sequence (e.g. the last prompt token in a prefill),
        which skips the `[B, T, vocab]` output projection.
      observe: optional hook, called while tracing as `observe(layer, kind, x)` with
        `x: [B, T, K, H]` the keys before RoPE (`kind="k_pre"`), after RoPE (`"k"`,
        what the cache stores) and the values (`"v"`), before quantization, and the
        queries after RoPE (`"q"`, `[B, T, N, H]`), and the attention output
        (`"attn"`, `[B, T, N, H]`, read from the cache). Calibration
        reduces them to statistics inside the same jitted step (see
        `kvtpu.models.calibrate`); padding rows beyond `valid_len` are included, so mask them.
      cache_sharding: for a cache laid out on a mesh (`kvtpu.sharding.CacheSharding`):
        `update`, `attend` and `advance` run on each device's block under
        `shard_map` (the weights may be sharded too: `kvtpu.models.sharding`).

    Returns:
      `logits: f32[B, T, vocab]` (`f32[B, 1, vocab]` with `logits_at`) and the
      advanced cache.
    """
    cfg = self.cfg
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer [B, T] array, got {tokens.dtype}{tokens.shape}")
    if (cache.num_layers, cache.kv_heads, cache.head_dim) != (
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
      raise ValueError(
          f"cache has L={cache.num_layers}, K={cache.kv_heads}, H={cache.head_dim}; model "
          f"{cfg.name} needs L={cfg.num_layers}, K={cfg.num_kv_heads}, H={cfg.head_dim}")
    if cache_sharding is not None and isinstance(cache, kvtpu.LayeredKVCache):
      raise ValueError(f"cache_sharding takes a KVCache; a LayeredKVCache ({cache.plan.name}) "
                       "runs unsharded")
    t = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = self.embed(tokens)
    for layer in self.layers:
      x, cache = layer(x, cache, positions, inv_freq, valid_len, impl, observe, cache_sharding)
    if logits_at is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
    x = self.norm(x)
    logits = (self.embed.attend(x) if self.lm_head is None else self.lm_head(x))
    num_new = t if valid_len is None else valid_len
    cache = (cache.advance(num_new) if cache_sharding is None
             else cache_sharding.advance(cache, num_new))
    return logits.astype(jnp.float32), cache

"""Exact memory accounting for KV caches.

`cache_layout` is the one definition of the arrays a `KVCache` holds (shape and
dtype of each): `KVCache.init` allocates exactly these, and as `ShapeDtypeStruct`s
they let a decode step be compiled ahead of time without allocating a cache. `bytes_per_token` and
`cache_bytes` are closed forms over the same layout, checked against it in tests.

Bytes are the arrays' logical bytes at each dtype's bit width: int4 counts half a
byte per value, as TPUs store it (XLA's `memory_analysis` agrees; numpy and
`jax.Array.nbytes` report one byte per int4 value, which overstates it 2x).

These are logical bytes. A TPU stores arrays in tiles, so device memory can be
larger: with max_len a multiple of 128 and head_dim 128 an AOT-compiled decode step
on v4/v5e/v5p/v6e holds exactly these bytes for K, V and scales (tests/
test_tpu_compile.py), but max_len=1000 with K=3, head_dim 64 took 2.4 % more on v5e
(tile padding of the S axis). `kvtpu.headroom` with `models.headroom.AotMeasure`
measures what a compiled step really holds (`memory_analysis`) rather than assuming
it here.

Layout (axis letters as in ARCHITECTURE.md; G = scale groups per token and head):
  k, v          [L, B, K, S, H]    storage dtype
  k_scale       dynamic [L, B, K, G, S] in the scale dtype; static [L, 1|K, 1|H]
  k_zero        like k_scale, float32 (asymmetric specs only)
  v_scale, v_zero                  likewise
  k_clip, v_clip f32[L, K]         calibrated clip ratios of dynamic specs (optional)
  lengths       i32[B]             tokens held per sequence
  overflow      bool[B]            a write or advance went past max_len
  counters      u32[L, C, 2]       64-bit counters (lo, hi words), C = COUNTERS
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu.formats import KVFormat, QuantSpec
from kvtpu.quant import ZERO_DTYPE, static_scale_shape

__all__ = ["COUNTERS", "cache_layout", "bytes_per_token", "fixed_bytes", "cache_bytes",
           "array_nbytes", "dtype_bits"]

# Per-layer counters of the cache, in the order of `counters`' axis 1. `written`
# counts values written per tensor (B*T*K*H per full write), the others count
# values that were clipped (saturated) or non-finite on the way in.
COUNTERS = ("written", "k_saturated", "k_nonfinite", "v_saturated", "v_nonfinite")


def dtype_bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bool_:
    return 8
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits
  return jnp.finfo(dtype).bits


def array_nbytes(shape, dtype) -> int:
  """Bytes of an array of `shape` and `dtype`, sub-byte dtypes packed."""
  return math.ceil(math.prod(shape) * dtype_bits(dtype) / 8)


def _check_dims(**dims: int) -> None:
  for name, value in dims.items():
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def _tensor_layout(spec: QuantSpec, prefix: str, num_layers, batch, kv_heads, max_len,
                   head_dim) -> dict[str, jax.ShapeDtypeStruct]:
  out = {prefix: jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim),
                                      spec.storage_dtype)}
  if not spec.quantized:
    return out
  if spec.dynamic:
    shape = (num_layers, batch, kv_heads, spec.num_groups(head_dim), max_len)
  else:
    shape = (num_layers, *static_scale_shape(spec, kv_heads, head_dim))
  out[f"{prefix}_scale"] = jax.ShapeDtypeStruct(shape, spec.scale_jnp_dtype)
  if not spec.symmetric:
    out[f"{prefix}_zero"] = jax.ShapeDtypeStruct(shape, ZERO_DTYPE)
  return out


def _check_clip(fmt: KVFormat, clip) -> tuple[str, ...]:
  clip = tuple(clip)
  for which in clip:
    if which not in ("k", "v") or not fmt.spec(which).dynamic:
      raise ValueError(f"clip names the dynamic specs with clip ratios, 'k' and/or 'v'; "
                       f"got {which!r} for format {fmt.name}")
  return clip


def cache_layout(fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
                 max_len: int, head_dim: int, clip=()) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of every array of a cache; absent entries are None fields.

  `clip` names the dynamic specs ("k", "v") that carry calibrated clip ratios.

  Raises:
    ValueError: for a non-positive dimension, a head_dim that the format's group
      size does not divide, or a clip entry that is not a dynamic spec.
  """
  fmt = KVFormat.parse(fmt)
  _check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
              head_dim=head_dim)
  dims = (num_layers, batch, kv_heads, max_len, head_dim)
  return {
      **_tensor_layout(fmt.k, "k", *dims),
      **_tensor_layout(fmt.v, "v", *dims),
      **{f"{w}_clip": jax.ShapeDtypeStruct((num_layers, kv_heads), jnp.float32)
         for w in _check_clip(fmt, clip)},
      "lengths": jax.ShapeDtypeStruct((batch,), jnp.int32),
      "overflow": jax.ShapeDtypeStruct((batch,), jnp.bool_),
      "counters": jax.ShapeDtypeStruct((num_layers, len(COUNTERS), 2), jnp.uint32),
  }


def _spec_bytes_per_token(spec: QuantSpec, kv_heads: int, head_dim: int) -> float:
  values = kv_heads * head_dim * spec.dtype.bits / 8
  if not spec.quantized or not spec.dynamic:
    return values
  groups = kv_heads * spec.num_groups(head_dim)
  per_group = jnp.dtype(spec.scale_jnp_dtype).itemsize
  if not spec.symmetric:
    per_group += jnp.dtype(ZERO_DTYPE).itemsize
  return values + groups * per_group


def bytes_per_token(fmt: KVFormat | str, *, kv_heads: int, head_dim: int) -> float:
  """Bytes one token adds to one layer: K and V values plus their per-token scales.

  Exact (a multiple of 0.5 for int4); static scales are per layer, in `fixed_bytes`.
  """
  fmt = KVFormat.parse(fmt)
  _check_dims(kv_heads=kv_heads, head_dim=head_dim)
  return (_spec_bytes_per_token(fmt.k, kv_heads, head_dim)
          + _spec_bytes_per_token(fmt.v, kv_heads, head_dim))


def fixed_bytes(fmt: KVFormat | str, *, kv_heads: int, head_dim: int, clip=()) -> int:
  """Bytes per layer that do not grow with tokens: static scales, zero points, clip
  ratios (of the dynamic specs named in `clip`), counters."""
  fmt = KVFormat.parse(fmt)
  _check_dims(kv_heads=kv_heads, head_dim=head_dim)
  total = len(COUNTERS) * 2 * 4 + len(_check_clip(fmt, clip)) * kv_heads * 4
  for spec in (fmt.k, fmt.v):
    if spec.static:
      n = math.prod(static_scale_shape(spec, kv_heads, head_dim))
      total += n * jnp.dtype(spec.scale_jnp_dtype).itemsize
      if not spec.symmetric:
        total += n * jnp.dtype(ZERO_DTYPE).itemsize
  return total


# lengths (int32) + overflow flag (bool) per sequence.
PER_SEQUENCE_BYTES = 4 + 1


def cache_bytes(fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
                max_len: int, head_dim: int, clip=()) -> int:
  """Total bytes of a cache; equals `KVCache.init(...).nbytes` (`clip` as in
  `cache_layout`)."""
  fmt = KVFormat.parse(fmt)
  _check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
              head_dim=head_dim)
  tokens = num_layers * batch * max_len
  # Rounded up per tensor, as each of K and V is its own array: two int4 arrays of an
  # odd number of values take one byte more than the ceiling of their sum.
  return (sum(math.ceil(tokens * _spec_bytes_per_token(spec, kv_heads, head_dim))
              for spec in (fmt.k, fmt.v))
          + num_layers * fixed_bytes(fmt, kv_heads=kv_heads, head_dim=head_dim, clip=clip)
          + batch * PER_SEQUENCE_BYTES)

"""Argument checks, byte counts and 64-bit counters that several kvtpu modules share.

Private to the package: users reach these through the public modules (`memory`
re-exports `array_nbytes` and `dtype_bits`).
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

_U32 = jnp.uint32


# ------------------------------------------------------------------ arguments
def check_layer(layer, num_layers: int) -> None:
  """Raises for a layer index that is not an integer scalar in `[0, num_layers)`.

  A traced index is checked for rank and dtype only (its value is unknown).
  """
  if isinstance(layer, jax.core.Tracer) or isinstance(layer, jax.Array):
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
      raise TypeError(f"layer must be an int or an integer scalar, got {jax.typeof(layer)}")
    if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < num_layers:
      raise IndexError(f"layer={int(layer)} is out of range for num_layers={num_layers}")
    return
  try:
    index = operator.index(layer)
  except TypeError:
    raise TypeError(f"layer must be an int or an integer scalar, got layer={layer!r}") from None
  if not 0 <= index < num_layers:
    raise IndexError(f"layer={index} is out of range for num_layers={num_layers}")


def saturating_count(name: str, value, batch: int, *, limit: int) -> tuple[jax.Array, jax.Array]:
  """A count per sequence (an int or an integer `[B]` array of any integer dtype) as
  `(i32[B] in [0, limit], negative: bool[B])`, without wrapping.

  Values above `limit` become `limit` before any narrowing conversion, so 2**31 - 1,
  `np.uint32(2**32 - 1)` or a uint64 count never turn into small or negative int32s.
  A concrete negative value raises; a traced one (unknown until run time) becomes 0
  and is reported in `negative` for the caller to flag.
  """
  if not 0 <= limit < 2**31:
    raise ValueError(f"limit must be in [0, 2**31), got {limit}")
  if not isinstance(value, jax.core.Tracer):
    if isinstance(value, bool) or isinstance(value, np.bool_):
      raise TypeError(f"{name} must be an int or an integer array, got {name}={value!r}")
    if isinstance(value, int):  # Python ints of any size.
      if value < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value}")
      return jnp.full((batch,), min(value, limit), jnp.int32), jnp.zeros((batch,), bool)
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
      raise TypeError(f"{name} must be an int or an integer array, got {name}.dtype={arr.dtype}")
    if arr.ndim == 0:
      arr = np.broadcast_to(arr, (batch,))
    if arr.shape != (batch,):
      raise ValueError(f"{name} must be a scalar or have shape (batch,)=({batch},), got "
                       f"{arr.shape}")
    if np.issubdtype(arr.dtype, np.signedinteger) and (arr < 0).any():
      raise ValueError(f"{name} must be >= 0, got {name}={arr.tolist()}")
    if np.issubdtype(arr.dtype, np.unsignedinteger):
      arr = np.minimum(arr.astype(np.uint64), np.uint64(limit))
    return jnp.asarray(np.minimum(arr.astype(np.int64), limit), jnp.int32), jnp.zeros((batch,), bool)
  dtype = jnp.result_type(value)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name} must be an int or an integer array, got {name}.dtype={dtype}")
  arr = jnp.broadcast_to(value, (batch,)) if jnp.ndim(value) == 0 else value
  if arr.shape != (batch,):
    raise ValueError(f"{name} must be a scalar or have shape (batch,)=({batch},), got {arr.shape}")
  negative = (arr < 0) if jnp.issubdtype(dtype, jnp.signedinteger) else jnp.zeros((batch,), bool)
  clamped = jnp.clip(arr, 0, min(limit, int(jnp.iinfo(dtype).max)))  # In the input's dtype.
  return clamped.astype(jnp.int32), negative


def check_dims(**dims: int) -> None:
  """Raises a ValueError naming the first dimension that is not a positive int."""
  for name, value in dims.items():
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


# ---------------------------------------------------------------------- bytes
def dtype_bits(dtype) -> int:
  """Bits per value of `dtype` (bool: 8, int4: 4)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bool_:
    return 8
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits
  return jnp.finfo(dtype).bits


def array_nbytes(shape, dtype) -> int:
  """Bytes of an array of `shape` and `dtype`, sub-byte dtypes packed."""
  return math.ceil(math.prod(shape) * dtype_bits(dtype) / 8)


# ------------------------------------------------------------ 64-bit counters
def add_u64(counter: jax.Array, inc: jax.Array) -> jax.Array:
  """`counter: u32[..., 2]` (lo, hi words) plus `inc: u32[...]`, with carry."""
  lo, hi = counter[..., 0], counter[..., 1]
  new_lo = lo + inc  # uint32 arithmetic wraps.
  new_hi = hi + (new_lo < lo).astype(_U32)
  return jnp.stack([new_lo, new_hi], axis=-1)


def add_u64_pair(a: jax.Array, b: jax.Array) -> jax.Array:
  """Two 64-bit counters `u32[..., 2]` (lo, hi) added, with carry."""
  return add_u64(a, b[..., 0]).at[..., 1].add(b[..., 1])


def u64_to_int64(words) -> np.ndarray:
  """`u32[..., 2]` (lo, hi) counters on the host -> `int64[...]`."""
  c = np.asarray(jax.device_get(words)).astype(np.uint64)
  return ((c[..., 1] << np.uint64(32)) | c[..., 0]).astype(np.int64)


def psum_u64(words: jax.Array, axes) -> jax.Array:
  """Sums 64-bit counters `u32[..., 2]` (lo, hi) over mesh `axes`, carries included.

  The low word is summed as two 16-bit halves so no partial sum overflows (for fewer
  than 65536 devices).
  """
  if not axes:
    return words
  lo, hi = words[..., 0], words[..., 1]
  a = jax.lax.psum(lo & _U32(0xFFFF), axes)
  b = jax.lax.psum(lo >> _U32(16), axes)
  shifted = (b & _U32(0xFFFF)) << _U32(16)
  new_lo = a + shifted
  carry = (new_lo < shifted).astype(_U32)
  new_hi = jax.lax.psum(hi, axes) + (b >> _U32(16)) + carry
  return jnp.stack([new_lo, new_hi], axis=-1)

"""The quantized KV cache: a functional pytree holding every layer's keys and values.

Decode-step data flow: for each layer, `cache = cache.update(layer, k, v)` writes
the new tokens' K/V at each sequence's own length, `out = kvtpu.attend(q, cache,
layer)` reads them back, and after the last layer `cache = cache.advance(T)` moves
the lengths. Every method returns a new cache; nothing is mutated, so the cache
works under `jax.jit` (donate it: `jax.jit(step, donate_argnums=...)` turns the
scatters into in-place writes, no copy of the cache per step), `lax.scan` over
layers or steps, `vmap` over stacked caches, and `shard_map`.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu import quant
from kvtpu.formats import KVFormat, QuantSpec
from kvtpu.memory import COUNTERS, array_nbytes, cache_layout

__all__ = ["KVCache"]

_U32 = jnp.uint32


def _add_u64(counter: jax.Array, inc: jax.Array) -> jax.Array:
  """`counter: u32[..., 2]` (lo, hi words) plus `inc: u32[...]`, with carry."""
  lo, hi = counter[..., 0], counter[..., 1]
  new_lo = lo + inc  # uint32 arithmetic wraps.
  new_hi = hi + (new_lo < lo).astype(_U32)
  return jnp.stack([new_lo, new_hi], axis=-1)


def _add_u64_pair(a: jax.Array, b: jax.Array) -> jax.Array:
  """Two 64-bit counters `u32[..., 2]` (lo, hi) added, with carry."""
  return _add_u64(a, b[..., 0]).at[..., 1].add(b[..., 1])


def _scatter_bits(store: jax.Array, index, values: jax.Array) -> jax.Array:
  """`store.at[index].set(values, mode="drop")`, moving bits, not numbers.

  Sub-32-bit floats (bf16, fp8) scatter as unsigned integers of the same width: the
  same bytes, but XLA's CPU backend would otherwise widen the whole cache to f32 and
  back around every scatter (measured on SmolLM2's 30 layers at 4096 positions: 0.38 s
  per decode step for bf16, 1.2 s for fp8, vs 0.06 ms for int8).
  """
  dtype = jnp.dtype(store.dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    bits = jnp.dtype(f"uint{8 * dtype.itemsize}")
    out = jax.lax.bitcast_convert_type(store, bits).at[index].set(
        jax.lax.bitcast_convert_type(values.astype(dtype), bits), mode="drop")
    return jax.lax.bitcast_convert_type(out, dtype)
  return store.at[index].set(values, mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Placement:
  """Where a chunk of T tokens goes, per sequence (all `[B, T]` but `start: [B]`).

  target: the token's position, or max_len (dropped) when past max_len or valid_len.
  start: the first position of the sequence's block of T positions, `lengths` clamped
    to `max_len - T` so the block fits.
  token: the chunk token that row r of the block holds; rows: whether it holds one
    (row r of a block clamped back from the end holds an earlier token, kept).
  """

  target: jax.Array
  start: jax.Array
  token: jax.Array
  rows: jax.Array

  @classmethod
  def of(cls, lengths: jax.Array, valid_len: jax.Array, t: int, max_len: int) -> _Placement:
    steps = jnp.arange(t, dtype=jnp.int32)[None, :]
    pos = lengths[:, None] + steps
    target = jnp.where((pos < max_len) & (steps < valid_len[:, None]), pos, max_len)
    start = jnp.minimum(lengths, max_len - t)
    token = start[:, None] + steps - lengths[:, None]
    rows = (token >= 0) & (token < valid_len[:, None])
    return cls(target=target, start=start, token=jnp.clip(token, 0, t - 1), rows=rows)


# How `update` writes on each platform (`_write_chunk`): XLA's CPU backend scatters
# in place; TPU (and GPU) get per-sequence dynamic-update-slices.
WRITE_METHODS = ("scatter", "blocks")


def _write_chunk(store: jax.Array, layer, values: jax.Array, where: _Placement, seq_axis: int,
                 method: str | None = None) -> jax.Array:
  """Writes a chunk `values: [B, T, K, X]` into `store: [L, B, K, ...]`.

  `seq_axis` is the store's position axis: 3 for K/V `[L, B, K, S, H]`, 4 for
  dynamic scales `[L, B, K, G, S]`. `method`: "scatter", "blocks", or None for the
  platform's choice when lowering (scatter on CPU, blocks elsewhere).

  Why two: XLA's TPU scatter picks a layout of its own for the cache array and
  copies the whole `[L, B, K, S, H]` array into and out of it around every layer's
  write (measured ahead of time on v5e: temporaries of 3x the cache for
  Llama-3.1-8B's decode step, 5x for SmolLM2's), while one dynamic-update-slice per
  sequence updates in place in the layout the attention kernels read. On CPU it is
  the other way round: the blocks' read-modify-write costs a copy, the scatter none.
  """
  if method is None:
    def write(method):
      return lambda store, values: _write_chunk(store, layer, values, where, seq_axis, method)

    return jax.lax.platform_dependent(store, values, cpu=write("scatter"),
                                      default=write("blocks"))
  if method == "scatter":
    rows = jnp.arange(store.shape[1])[:, None]  # [B, 1]
    index = (layer, rows) + (slice(None),) * (seq_axis - 2) + (where.target,)
    return _scatter_bits(store, index, values)
  if method != "blocks":
    raise ValueError(f"method must be one of {WRITE_METHODS} or None, got method={method!r}")
  blocks = jnp.take_along_axis(values, where.token[:, :, None, None], axis=1)
  blocks = jnp.moveaxis(blocks, 1, seq_axis - 1).astype(store.dtype)  # [B, K, ...T...]
  t = values.shape[1]
  keep_shape = [1] * (blocks.ndim - 1)
  keep_shape[seq_axis - 2] = t
  zeros = [0] * (store.ndim - 2)
  for b in range(store.shape[1]):
    index = list(zeros)
    index[seq_axis - 2] = where.start[b]
    index = (layer, b, *index)
    old = jax.lax.dynamic_slice(store, index, (1, 1, *blocks.shape[1:]))[0, 0]
    block = jnp.where(where.rows[b].reshape(keep_shape), blocks[b], old)
    store = jax.lax.dynamic_update_slice(store, block[None, None], index)
  return store


def check_layer(layer, num_layers: int) -> None:
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


def _per_sequence(name: str, value, batch: int, *, allow_negative: bool = False) -> jax.Array:
  """An int or `i32[B]` -> `i32[B]`, validated (concrete values also for sign)."""
  arr = jnp.asarray(value)
  if not jnp.issubdtype(arr.dtype, jnp.integer):
    raise TypeError(f"{name} must be an int or an integer array, got {name}.dtype={arr.dtype}")
  if arr.ndim == 0:
    arr = jnp.broadcast_to(arr, (batch,))
  if arr.shape != (batch,):
    raise ValueError(f"{name} must be a scalar or have shape (batch,)=({batch},), got {arr.shape}")
  if not allow_negative and not isinstance(arr, jax.core.Tracer) and bool((arr < 0).any()):
    raise ValueError(f"{name} must be >= 0, got {name}={np.asarray(arr).tolist()}")
  return arr.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of all layers, stored in `fmt`, with per-sequence lengths.

  Shapes use L layers, B sequences, K kv heads, S = max_len positions, H head dim,
  G scale groups per token and head; `kvtpu.memory` documents the layout.

  Invariants:
    * `k`, `v: [L, B, K, S, H]` in the storage dtypes of `fmt.k`, `fmt.v`; per
      (layer, sequence, kv head) a contiguous `[S, H]` slab.
    * Position `s` of sequence `b` holds a token iff `s < lengths[b]` (plus, between
      `update` and `advance`, the chunk just written). Other positions hold stale
      or uninitialized data; nothing may read them unmasked.
    * Scales: dynamic specs `[L, B, K, G, S]`, one per token, head and group,
      written with the token; static specs `[L, 1|K, 1|H]`, finite and > 0,
      fixed at `init`. bf16 specs have no scale (None). Zero points (asymmetric
      specs only) are float32 and shaped like the scales.
    * Clip ratios: a dynamic spec calibrated for clipping (`k_clip`, `v_clip`)
      holds float32 `[L, K]` ratios in (0, 1], fixed at `init`: each token's scale
      covers that fraction of its group's range (`quant.quantize`), and values
      beyond it are clipped and counted as saturated. None: plain absmax scales.
    * `0 <= lengths[b] <= max_len`. A write past `max_len` is dropped, and an
      `advance` past it clamps the length to `max_len` and sets `overflow[b]`;
      other sequences are never touched.
    * `counters[l, c]` is a 64-bit count (lo, hi uint32 words) per layer of
      `memory.COUNTERS`: values written, and values saturated (clipped to the
      storage range: static scales the data outgrew, or a calibrated clip ratio) or
      non-finite (stored as 0)
      on the way in, for K and V. `counts()` reads them.
    * `nbytes == memory.cache_bytes(fmt, ...)`, int4 at half a byte per value.
  """

  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None
  k_zero: jax.Array | None
  v_scale: jax.Array | None
  v_zero: jax.Array | None
  k_clip: jax.Array | None
  v_clip: jax.Array | None
  lengths: jax.Array
  overflow: jax.Array
  counters: jax.Array
  fmt: KVFormat = dataclasses.field(metadata=dict(static=True))

  # ----------------------------------------------------------------- creation
  @classmethod
  def init(cls, fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
           max_len: int, head_dim: int, k_scale=None, k_zero=None, v_scale=None,
           v_zero=None, k_clip=None, v_clip=None, calibration=None) -> KVCache:
    """An empty cache (all lengths 0).

    Args:
      fmt: a `KVFormat` or a format name (`"int8"`, `"k8v4"`, ...).
      num_layers, batch, kv_heads, max_len, head_dim: the cache's dimensions.
      k_scale, k_zero, v_scale, v_zero: calibrated scales (and zero points, for
        asymmetric specs) of static specs, shaped `[L, 1|K, 1|H]` as the spec's
        granularity says, or without the leading L to share them across layers.
        Required for static specs, rejected for dynamic ones.
      k_clip, v_clip: optional calibrated clip ratios of dynamic specs, in (0, 1],
        shaped `[L, K]` (or `[K]`, shared across layers); rejected for static and
        bf16 specs.
      calibration: instead of the six above, a
        `kvtpu.calibration.CalibrationArtifact`; its layer count, kv heads, head dim
        and format must match this cache.

    Raises:
      ValueError: for an invalid format name or dimension, a missing, extra or
        misshaped scale, a scale that is 0, negative, NaN or inf, a clip ratio
        outside (0, 1], or a calibration
        artifact made for another model shape or format.
    """
    fmt = KVFormat.parse(fmt)
    if calibration is not None:
      if any(s is not None for s in (k_scale, k_zero, v_scale, v_zero, k_clip, v_clip)):
        raise ValueError("pass either calibration= or explicit k_/v_ scales and clips, not both")
      calibration.check_compatible(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim,
                                   fmt=fmt)
      k_scale, k_zero, v_scale, v_zero, k_clip, v_clip = (calibration.scales.get(n) for n in (
          "k_scale", "k_zero", "v_scale", "v_zero", "k_clip", "v_clip"))
    clip = tuple(w for w, c in (("k", k_clip), ("v", v_clip)) if c is not None)
    bad_clip = [w for w in clip if not fmt.spec(w).dynamic]
    if bad_clip:
      raise ValueError(
          f"{bad_clip[0]}_clip given, but format {fmt.name} stores {bad_clip[0].upper()} as "
          f"{fmt.spec(bad_clip[0]).name}: clip ratios are for dynamic (per-token) specs only")
    layout = cache_layout(fmt, num_layers=num_layers, batch=batch, kv_heads=kv_heads,
                          max_len=max_len, head_dim=head_dim, clip=clip)
    given = {"k_scale": k_scale, "k_zero": k_zero, "v_scale": v_scale, "v_zero": v_zero,
             "k_clip": k_clip, "v_clip": v_clip}
    arrays: dict[str, Any] = {}
    for name, sds in layout.items():
      if name.endswith("_clip"):
        arrays[name] = cls._static_param(name, given.pop(name), sds, fmt)
      elif name in given and not cls._spec_of(fmt, name).dynamic:
        arrays[name] = cls._static_param(name, given.pop(name), sds, fmt)
      else:
        arrays[name] = jnp.zeros(sds.shape, sds.dtype)
    extra = [n for n, val in given.items() if val is not None]
    if extra:
      raise ValueError(
          f"{', '.join(extra)} given, but format {fmt.name} has no static parameter of that name "
          "(dynamic or bf16 specs take none; symmetric specs take no zero)")
    return cls(fmt=fmt, **{f.name: arrays.get(f.name) for f in dataclasses.fields(cls)
                           if f.name != "fmt"})

  @staticmethod
  def _spec_of(fmt: KVFormat, name: str) -> QuantSpec:
    return fmt.k if name.startswith("k") else fmt.v

  @staticmethod
  def _static_param(name: str, value, sds: jax.ShapeDtypeStruct, fmt: KVFormat) -> jax.Array:
    spec = KVCache._spec_of(fmt, name)
    if value is None:
      raise ValueError(
          f"format {fmt.name} stores {name[0].upper()} with static {spec.granularity.value} "
          f"scales: pass {name} with shape {sds.shape} (or {sds.shape[1:]}), e.g. from "
          "calibration; kvtpu never assumes a default scale")
    arr = jnp.asarray(value, dtype=jnp.float32)
    if arr.shape not in (sds.shape, sds.shape[1:]):
      raise ValueError(f"{name} must have shape {sds.shape} or {sds.shape[1:]}, got {arr.shape}")
    if name.endswith("clip"):
      quant.validate_clip(name, arr)
      return jnp.broadcast_to(arr, sds.shape)
    quant.validate_scale(name, arr, is_zero=name.endswith("zero"))
    stored = jnp.broadcast_to(arr, sds.shape).astype(sds.dtype)
    if name.endswith("scale"):  # Rounding into a narrower dtype must not make it 0 or inf.
      quant.validate_scale(f"{name} (as {sds.dtype})", stored)
    return stored

  # --------------------------------------------------------------- properties
  @property
  def num_layers(self) -> int:
    return self.k.shape[-5]

  @property
  def batch(self) -> int:
    return self.k.shape[-4]

  @property
  def kv_heads(self) -> int:
    return self.k.shape[-3]

  @property
  def max_len(self) -> int:
    return self.k.shape[-2]

  @property
  def head_dim(self) -> int:
    return self.k.shape[-1]

  @property
  def nbytes(self) -> int:
    """Bytes of all arrays, int4 at half a byte per value."""
    return sum(array_nbytes(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(self))

  # ------------------------------------------------------------------ writing
  def update(self, layer, k: jax.Array, v: jax.Array, *, valid_len=None) -> KVCache:
    """Quantizes and writes a chunk of new tokens for one layer.

    Token `t` of sequence `b` goes to position `lengths[b] + t`. Call `advance`
    after the last layer to make the chunk part of the sequences.

    Args:
      layer: layer index, an int (checked) or an integer scalar under `lax.scan`
        (must be in range: a traced index cannot be checked).
      k, v: `[B, T, K, H]` floating point, the keys (after RoPE) and values.
      valid_len: optional int or `i32[B]`: only the first `valid_len[b]` tokens of
        sequence `b` are written and counted (ragged chunks); default all T.

    Returns:
      The new cache (when the old one is donated, written in place). Writes at
      positions >= max_len are dropped; `advance` then flags the sequence.

    Raises:
      TypeError, ValueError, IndexError: for a bad layer, rank, shape or dtype,
        or a chunk longer than max_len (T > max_len).
    """
    check_layer(layer, self.num_layers)
    for name, x in (("k", k), ("v", v)):
      if not isinstance(x, (jax.Array, np.ndarray)) or x.ndim != 4:
        raise ValueError(f"{name} must be a [B, T, K, H] array, got {name}.shape={jnp.shape(x)}")
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
      b, t, kh, h = x.shape
      if (b, kh, h) != (self.batch, self.kv_heads, self.head_dim):
        raise ValueError(
            f"{name}.shape={x.shape} does not match the cache: expected "
            f"[B={self.batch}, T, K={self.kv_heads}, H={self.head_dim}]")
    if k.shape != v.shape:
      raise ValueError(f"k.shape={k.shape} and v.shape={v.shape} differ")
    t = k.shape[1]
    if t > self.max_len:
      raise ValueError(f"a chunk of T={t} tokens cannot fit in a cache of max_len={self.max_len}")
    if valid_len is None:
      valid_len = t
    return _write(self, layer, k, v, _per_sequence("valid_len", valid_len, self.batch))

  def _write(self, layer, k: jax.Array, v: jax.Array, valid_len: jax.Array) -> KVCache:
    """`update` after validation; jitted (below) so that eager calls compile once."""
    t = k.shape[1]
    where = _Placement.of(self.lengths, valid_len, t, self.max_len)
    written = where.target < self.max_len  # [B, T]

    new: dict[str, Any] = {}
    counts = [jnp.sum(written, dtype=_U32) * _U32(self.kv_heads * self.head_dim)]
    for name, x in (("k", k), ("v", v)):
      spec = self.fmt.spec(name)
      scale, zero = getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero")
      clip = getattr(self, f"{name}_clip")
      if spec.static:
        params = dict(scale=scale[layer], zero=None if zero is None else zero[layer])
      else:
        params = {} if clip is None else dict(clip=clip[layer])  # [K] against [B, T, K].
      res = quant.quantize(x, spec, **params)
      # [B, T, K, H] rows go to [layer, b, :, pos[b, t], :].
      new[name] = _write_chunk(getattr(self, name), layer, res.q, where, 3)
      if spec.dynamic:  # [B, T, K, G] rows go to [layer, b, :, :, pos[b, t]].
        new[f"{name}_scale"] = _write_chunk(scale, layer, res.scale, where, 4)
        if zero is not None:
          new[f"{name}_zero"] = _write_chunk(zero, layer, res.zero, where, 4)
      mask = written[:, :, None, None]
      counts += [jnp.sum(res.saturated & mask, dtype=_U32), jnp.sum(res.nonfinite & mask, dtype=_U32)]
    counters = self.counters.at[layer].set(_add_u64(self.counters[layer], jnp.stack(counts)))
    return dataclasses.replace(self, counters=counters, **new)

  def advance(self, num_new) -> KVCache:
    """Adds `num_new` (an int or `i32[B]`, >= 0) tokens to each sequence's length.

    A length that would pass `max_len` is clamped to it and sets `overflow[b]`.
    """
    new = self.lengths + _per_sequence("num_new", num_new, self.batch)
    return dataclasses.replace(
        self, lengths=jnp.clip(new, 0, self.max_len), overflow=self.overflow | (new > self.max_len))

  def reset(self, sequences=None) -> KVCache:
    """Empties the given sequences (bool `[B]` mask; default all) for reuse.

    Lengths and overflow flags go to 0; stale data stays but is masked. Counters are
    per layer and keep counting.
    """
    keep = jnp.zeros((self.batch,), bool) if sequences is None else ~jnp.asarray(sequences, bool)
    if keep.shape != (self.batch,):
      raise ValueError(f"sequences must be a bool mask of shape ({self.batch},), got {keep.shape}")
    return dataclasses.replace(self, lengths=jnp.where(keep, self.lengths, 0),
                               overflow=self.overflow & keep)

  # ------------------------------------------------------------------ reading
  def dequantized(self, layer, which: str, dtype=jnp.float32) -> jax.Array:
    """One layer's keys or values, dequantized: `[B, K, S, H]` (reference path).

    Positions that hold no token are whatever the memory holds; mask them.
    """
    check_layer(layer, self.num_layers)
    spec = self.fmt.spec(which)
    data = getattr(self, which)[layer]
    scale, zero = getattr(self, f"{which}_scale"), getattr(self, f"{which}_zero")
    if not spec.quantized:
      return quant.dequantize(data, spec, dtype=dtype)

    def per_position(p):
      if p is None:
        return None
      p = p[layer]
      # Dynamic [B, K, G, S] -> [B, K, S, G]; static [1|K, 1|H] -> [1|K, 1, 1|H].
      return jnp.swapaxes(p, -1, -2) if spec.dynamic else p[:, None, :]

    return quant.dequantize(data, spec, per_position(scale), per_position(zero), dtype=dtype)

  def per_token_scales(self) -> dict[str, jax.Array | None]:
    """The kernels' scale arguments: dynamic specs' `[L, B, K, G, S]` scales and zero
    points; None for bf16 and static specs (whose scales `kvtpu.attend` folds
    around the kernel)."""
    out = {}
    for name in ("k", "v"):
      dynamic = self.fmt.spec(name).dynamic
      for part in ("scale", "zero"):
        out[f"{name}_{part}"] = getattr(self, f"{name}_{part}") if dynamic else None
    return out

  def counts(self) -> dict[str, np.ndarray]:
    """The counters on the host: `{name: int64[L]}` for each of `memory.COUNTERS`."""
    c = np.asarray(jax.device_get(self.counters)).astype(np.uint64)
    total = (c[..., 1] << np.uint64(32)) | c[..., 0]
    return {name: total[..., i].astype(np.int64) for i, name in enumerate(COUNTERS)}

  def saturation_rates(self) -> dict[str, np.ndarray]:
    """Per layer, the fraction of written K and V values that were clipped (by static
    scales the data outgrew, or by calibrated clip ratios)."""
    c = self.counts()
    written = np.maximum(c["written"], 1)
    return {"k": c["k_saturated"] / written, "v": c["v_saturated"] / written}


# Eager callers get one compiled executable per shape instead of an op-by-op dispatch;
# under an outer jit this inlines. The layer index is traced: one executable serves
# every layer.
_write = jax.jit(KVCache._write)

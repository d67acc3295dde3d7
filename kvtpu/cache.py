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

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu._shared import (
  add_u64,
  array_nbytes,
  check_dims,
  check_layer,
  saturating_count,
  u64_to_int64,
)
from kvtpu.formats import KVFormat
from kvtpu.pallas_kernels import decode_attention
from kvtpu.qtensor import Placement, QuantizedKV, params_by_tensor

__all__ = ["KVCache", "COUNTERS", "ERRORS", "check_clip"]

_U32 = jnp.uint32

# Per-layer counters of the cache, in the order of `counters`' axis 1. `written`
# counts values written per tensor (B*T*K*H per full write), the others count
# values that were clipped (saturated) or non-finite on the way in.
COUNTERS = ("written", "k_saturated", "k_nonfinite", "v_saturated", "v_nonfinite")

# Bits of `errors` per sequence, in order: what a traced argument asked for that the
# cache could not do. Concrete arguments raise instead; traced ones are known only at
# run time, so the cache records them and does the safe thing.
#   layer_out_of_range: `update` with a layer index outside [0, num_layers): nothing
#     is written and nothing counted (set on every sequence).
#   negative_count: a negative `valid_len` (`update`) or `num_new` (`advance`): taken
#     as 0 for that sequence.
ERRORS = ("layer_out_of_range", "negative_count")
_LAYER_BIT, _NEGATIVE_BIT = (np.uint8(1 << i) for i in range(len(ERRORS)))


def check_clip(fmt: KVFormat, clip) -> tuple[str, ...]:
  """`clip` (names of tensors with calibrated clip ratios) as a tuple, checked to name
  range-scaled dynamic specs of `fmt` only (`QuantSpec.clippable`)."""
  clip = tuple(clip)
  for which in clip:
    if which not in ("k", "v") or not fmt.spec(which).clippable:
      raise ValueError(f"clip names the tensors with clip ratios, 'k' and/or 'v', whose specs "
                       f"are dynamic and range-scaled (not static, unquantized or non-uniform); "
                       f"got {which!r} for format {fmt.name}")
  return clip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of all layers, stored in `fmt`, with per-sequence lengths.

  Shapes use L layers, B sequences, K kv heads, S = max_len positions, H head dim,
  G scale groups per token and head (`kvtpu.qtensor` documents each array).

  Invariants:
    * `k`, `v`: one `QuantizedKV` each, in the specs `fmt.k`, `fmt.v`; their values
      are `[L, B, K, S, H]`, per (layer, sequence, kv head) a contiguous `[S, H]` slab,
      or `[L, B, K, H, S]` where `QuantizedKV.transposed` (head_dim not a multiple of
      128; `shape` stays logical).
      `fmt` is derived from their specs, so a cache cannot claim one format and
      store another.
    * Position `s` of sequence `b` holds a token iff `s < lengths[b]` (plus, between
      `update` and `advance`, the chunk just written). Other positions hold stale
      or uninitialized data; nothing may read them unmasked.
    * Scales: per-token specs hold one per token, head and group, written with the
      token; token-grouped (`c<N>`) specs one per channel and head over each group of
      N positions, written when the group fills; static specs hold calibrated scales,
      finite and > 0, fixed at `init`;
      clip ratios of dynamic specs, in (0, 1], are fixed at `init` too: each token's
      scale covers that fraction of its group's range (`quant.quantize`), and values
      beyond it are clipped and counted as saturated.
    * `0 <= lengths[b] <= max_len`. A write past `max_len` is dropped, and an
      `advance` past it clamps the length to `max_len` and sets `overflow[b]`;
      other sequences are never touched. Counts saturate: no count of any integer
      dtype or size wraps around, eagerly or under jit.
    * `errors[b]` holds bits of `ERRORS`: traced arguments that were out of range and
      what was done instead (`error_flags()` reads them; `reset` clears them).
    * `counters[l, c]` is a 64-bit count (lo, hi uint32 words) per layer of
      `COUNTERS`: values written, and values saturated (clipped to the storage
      range: static scales the data outgrew, or a calibrated clip ratio) or
      non-finite (stored as 0) on the way in, for K and V. `counts()` reads them.
    * `nbytes == memory.cache_bytes(fmt, ...)`, int4 at half a byte per value.

  Paged (`page_table` not None; `init(..., page_len=Z, num_pages=P)`): `k` and `v`
  are pools of P pages of Z positions (`kvtpu.qtensor`), and `page_table[b, w]` is the
  page holding positions `[w Z, (w + 1) Z)` of sequence b; `max_len` is Z times the
  table's width. Page 0 is the null page; a sequence's capacity is Z times the count
  of leading entries in `[1, P)`, the pages it was given (`kvtpu.paging.PageAllocator`
  gives them and sets the table with `with_page_table`). Writes past the capacity are
  dropped and `advance` clamps to it and sets `overflow`, as at `max_len`.
  """

  k: QuantizedKV
  v: QuantizedKV
  lengths: jax.Array
  overflow: jax.Array
  errors: jax.Array
  counters: jax.Array
  page_table: jax.Array | None = None

  # ----------------------------------------------------------------- creation
  @classmethod
  def layout(cls, fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
             max_len: int, head_dim: int, clip=(), page_len: int | None = None,
             num_pages: int | None = None) -> KVCache:
    """The cache's arrays as `jax.ShapeDtypeStruct`s (absent ones None): the one
    definition of its layout. `clip` names the dynamic tensors ("k", "v") that
    carry calibrated clip ratios; `page_len` and `num_pages` make it paged (`init`).

    Raises:
      ValueError: for a non-positive dimension, a head_dim that a group size does
        not divide, a clip entry whose spec takes no clip ratios (`QuantSpec.clippable`),
        or paging arguments that do not fit (`init`).
    """
    fmt = KVFormat.parse(fmt)
    clip = check_clip(fmt, clip)
    check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
               head_dim=head_dim)
    slab, table = max_len, None
    sds = jax.ShapeDtypeStruct
    if page_len is not None or num_pages is not None:
      check_dims(page_len=page_len, num_pages=num_pages)
      if max_len % page_len:
        raise ValueError(f"max_len={max_len} must be a multiple of page_len={page_len} (the "
                         "page table holds max_len / page_len pages per sequence)")
      if num_pages < 2:
        raise ValueError(f"num_pages must be at least 2 (page 0 is the null page), got "
                         f"num_pages={num_pages}")
      slab, table = page_len, sds((batch, max_len // page_len), jnp.int32)
    dims = dict(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=slab,
                head_dim=head_dim, sink=fmt.sink, recent=fmt.recent, pages=num_pages)
    return cls(k=QuantizedKV.layout(fmt.k, clip="k" in clip, **dims),
               v=QuantizedKV.layout(fmt.v, clip="v" in clip, **dims),
               lengths=sds((batch,), jnp.int32), overflow=sds((batch,), jnp.bool_),
               errors=sds((batch,), jnp.uint8), counters=sds((num_layers, len(COUNTERS), 2), jnp.uint32),
               page_table=table)

  @classmethod
  def init(cls, fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
           max_len: int, head_dim: int, k_scale=None, k_zero=None, v_scale=None,
           v_zero=None, k_clip=None, v_clip=None, calibration=None,
           page_len: int | None = None, num_pages: int | None = None) -> KVCache:
    """An empty cache (all lengths 0).

    Args:
      fmt: a `KVFormat` or a format name (`"int8"`, `"k8v4"`, ...).
      num_layers, batch, kv_heads, max_len, head_dim: the cache's dimensions.
      k_scale, k_zero, v_scale, v_zero: calibrated scales (and zero points, for
        asymmetric specs) of static specs, shaped `[L, 1|K, 1|H]` as the spec's
        granularity says, or without the leading L to share them across layers.
        Required for static specs, rejected for dynamic ones.
      k_clip, v_clip: optional calibrated clip ratios of dynamic specs, in (0, 1],
        shaped `[L, K]` (or `[K]`, shared across layers); rejected for static,
        unquantized and non-uniform (`nu`) specs.
      calibration: instead of the six above, a
        `kvtpu.calibration.CalibrationArtifact` or the folder it was saved to (a str or
        `os.PathLike`, loaded and verified by `CalibrationArtifact.load`); its layer
        count, kv heads, head dim and format must match this cache.
      page_len, num_pages: for a paged cache, both: a pool of `num_pages` pages of
        `page_len` positions (page 0 the null page, so `num_pages - 1` to give out),
        and a page table of `max_len / page_len` entries per sequence, all 0 (no
        sequence holds a page until `with_page_table`). `page_len` must be a
        multiple of what the format's layout needs (`QuantizedKV.max_len_multiple`).

    Raises:
      ValueError: for an invalid format name or dimension, a missing, extra or
        misshaped scale, a scale that is 0, negative, NaN or inf, a clip ratio
        outside (0, 1], or a calibration artifact made for another model shape or
        format.
      FileNotFoundError: `calibration` is a path that holds no artifact.
      TypeError: `calibration` is neither an artifact nor a path.
    """
    fmt = KVFormat.parse(fmt)
    if calibration is not None:
      import os  # noqa: PLC0415 (the artifact module is only needed for a calibrated cache)

      from kvtpu.calibration.artifact import CalibrationArtifact  # noqa: PLC0415
      if isinstance(calibration, str | os.PathLike):
        calibration = CalibrationArtifact.load(calibration)
      elif not isinstance(calibration, CalibrationArtifact):
        raise TypeError(f"calibration must be a CalibrationArtifact or the path of a saved "
                        f"one, got {type(calibration).__name__}")
    params = params_by_tensor(dict(k_scale=k_scale, k_zero=k_zero, v_scale=v_scale,
                                   v_zero=v_zero, k_clip=k_clip, v_clip=v_clip))
    if calibration is not None:
      if params["k"] or params["v"]:
        raise ValueError("pass either calibration= or explicit k_/v_ scales and clips, not both")
      calibration.check_compatible(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim,
                                   fmt=fmt)
      params = {which: dict(calibration.scales.get(which, {})) for which in ("k", "v")}
    layout = cls.layout(fmt, num_layers=num_layers, batch=batch, kv_heads=kv_heads,
                        max_len=max_len, head_dim=head_dim, page_len=page_len,
                        num_pages=num_pages)
    dims = dict(num_layers=num_layers, batch=batch, kv_heads=kv_heads,
                max_len=max_len if page_len is None else page_len, head_dim=head_dim,
                sink=fmt.sink, recent=fmt.recent, pages=num_pages)
    tensors = {which: QuantizedKV.init(fmt.spec(which), name=which, **dims, **params[which])
               for which in ("k", "v")}
    return cls(**tensors, **{f: None if getattr(layout, f) is None else
                             jnp.zeros(getattr(layout, f).shape, getattr(layout, f).dtype)
                             for f in ("lengths", "overflow", "errors", "counters", "page_table")})

  # --------------------------------------------------------------- properties
  @property
  def fmt(self) -> KVFormat:
    """The storage format, from the specs and windows of `k` and `v`."""
    sink, recent = self.k.window_sizes()
    return KVFormat(self.k.spec, self.v.spec, sink=sink, recent=recent)

  @property
  def num_layers(self) -> int:
    return self.k.shape[-5]

  @property
  def batch(self) -> int:
    return self.lengths.shape[-1]

  @property
  def kv_heads(self) -> int:
    return self.k.shape[-3]

  @property
  def max_len(self) -> int:
    """Positions per sequence: S, or Z times the page table's width."""
    return self.k.shape[-2] * (1 if self.page_table is None else self.page_table.shape[-1])

  @property
  def paged(self) -> bool:
    return self.page_table is not None

  @property
  def page_len(self) -> int | None:
    """Z, positions per page (None: contiguous)."""
    return self.k.shape[-2] if self.paged else None

  @property
  def num_pages(self) -> int | None:
    """P, pages in the pool, the null page 0 included (None: contiguous)."""
    return self.k.shape[-4] if self.paged else None

  def capacity(self) -> jax.Array:
    """`i32[B]`: positions each sequence can hold: `max_len`, or for a paged cache Z
    times its leading table entries that are pages it holds (in `[1, P)`)."""
    if not self.paged:
      return jnp.full(self.lengths.shape, self.max_len, jnp.int32)
    held = (self.page_table >= 1) & (self.page_table < self.num_pages)
    return jnp.sum(jnp.cumprod(held, axis=-1), axis=-1, dtype=jnp.int32) * self.page_len

  def with_page_table(self, page_table) -> KVCache:
    """This paged cache with a new page table (`[B, pages_per_sequence]` integers, e.g.
    `PageAllocator.table`): the pages each sequence holds.

    Raises:
      ValueError: for a contiguous cache, or a table of another shape.
    """
    if not self.paged:
      raise ValueError("with_page_table is for paged caches (KVCache.init(..., page_len=, "
                       "num_pages=))")
    table = jnp.asarray(page_table)
    if table.shape != self.page_table.shape or not jnp.issubdtype(table.dtype, jnp.integer):
      raise ValueError(f"page_table must be integers of shape {self.page_table.shape}, got "
                       f"{table.dtype}{list(table.shape)}")
    return dataclasses.replace(self, page_table=table.astype(jnp.int32))

  @property
  def head_dim(self) -> int:
    return self.k.shape[-1]

  @property
  def nbytes(self) -> int:
    """Bytes of all arrays, int4 at half a byte per value."""
    return sum(array_nbytes(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(self))

  @property
  def clip(self) -> tuple[str, ...]:
    """The tensors ("k", "v") that carry calibrated clip ratios."""
    return tuple(w for w in ("k", "v") if getattr(self, w).clip is not None)

  def tensor(self, which: str) -> QuantizedKV:
    """`k` or `v` by name."""
    if which not in ("k", "v"):
      raise ValueError(f"which must be 'k' or 'v', got which={which!r}")
    return self.k if which == "k" else self.v

  def logical_axes(self) -> KVCache:
    """Each array's axes by logical name (`kvtpu.qtensor.LOGICAL_AXES`), as
    `PartitionSpec`s; `kvtpu.sharding` maps the names to mesh axes."""
    from jax.sharding import PartitionSpec as P

    return dataclasses.replace(self, k=self.k.logical_axes(), v=self.v.logical_axes(),
                               lengths=P("batch"), overflow=P("batch"), errors=P("batch"),
                               counters=P(), page_table=None if self.page_table is None else
                               P("batch", None))

  # ------------------------------------------------------------------ writing
  def update(self, layer, k: jax.Array, v: jax.Array, *, valid_len=None,
             kv_span=None) -> KVCache:
    """Quantizes and writes a chunk of new tokens for one layer.

    Token `t` of sequence `b` goes to position `lengths[b] + t`. Call `advance`
    after the last layer to make the chunk part of the sequences.

    Args:
      layer: layer index, an int (checked) or an integer scalar under `lax.scan`
        (a traced index out of range writes nothing and sets `layer_out_of_range`
        in `errors`).
      k, v: `[B, T, K, H]` floating point, the keys (after RoPE) and values.
      valid_len: optional int or integer `[B]`: only the first `valid_len[b]` tokens
        of sequence `b` are written and counted (ragged chunks); default all T; values
        above T count as T. A traced negative value writes nothing for its sequence
        and sets `negative_count` (a concrete one raises).
      kv_span: paged caches only: None, or `(start, stop)`, integer scalars or `[B]`,
        multiples of page_len: the positions whose pages this cache's pool holds (one
        device's share of a sequence-sharded cache, `kvtpu.sharding`). Tokens outside
        are not written to the pool nor counted; the windows, which every holder
        keeps whole, are written as usual. Table entries outside the span may be any
        page id of the sequence's holder; capacity is read from the whole table.

    Returns:
      The new cache (when the old one is donated, written in place). Writes at
      positions >= max_len are dropped; `advance` then flags the sequence.

    Raises:
      TypeError, ValueError, IndexError: for a bad layer, rank, shape or dtype,
        or a chunk longer than max_len (T > max_len).
    """
    check_layer(layer, self.num_layers)
    self.check_chunk(k, v)
    t = k.shape[1]
    valid_len, negative = saturating_count("valid_len", t if valid_len is None else valid_len,
                                           self.batch, limit=t)
    span = None
    if kv_span is not None:
      span = self._check_write_span(kv_span)
    return _write(self, layer, k, v, valid_len, negative, span)

  def _check_write_span(self, kv_span) -> tuple[jax.Array, jax.Array]:
    if not self.paged:
      raise ValueError("kv_span is for paged caches (a device's pages of a sequence-sharded "
                       "cache); a contiguous cache holds every position")
    start, stop = decode_attention.check_span(kv_span, self.batch, scalars=True)
    for name, x in (("start", start), ("stop", stop)):
      if not isinstance(x, jax.core.Tracer) and np.any(np.asarray(x) % self.page_len):
        raise ValueError(f"kv_span's {name} must be a multiple of page_len={self.page_len}, got "
                         f"{np.asarray(x).tolist()}")
    return start, stop

  def check_chunk(self, k, v) -> None:
    """Raises for a chunk `k, v` that `update` cannot take: not `[B, T, K, H]` floating
    point arrays of this cache's B, K and H, with equal shapes and T <= max_len.
    Shapes are the global ones (also under `kvtpu.sharding`)."""
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
    if k.shape[1] > self.max_len:
      raise ValueError(f"a chunk of T={k.shape[1]} tokens cannot fit in a cache of "
                       f"max_len={self.max_len}")

  def _write(self, layer, k: jax.Array, v: jax.Array, valid_len: jax.Array,
             negative: jax.Array, span=None) -> KVCache:
    """`update` after validation; jitted (below) so that eager calls compile once."""
    in_range = (layer >= 0) & (layer < self.num_layers)  # Always true for a checked int.
    valid_len = jnp.where(in_range, valid_len, 0)  # Negative counts are already 0.
    if self.paged:  # Nothing past the pages a sequence holds.
      valid_len = jnp.clip(self.capacity() - self.lengths, 0, valid_len)
    errors = (self.errors | jnp.where(in_range, np.uint8(0), _LAYER_BIT)
              | jnp.where(negative, _NEGATIVE_BIT, np.uint8(0)))
    sink, recent = self.k.window_sizes()
    where = Placement.of(self.lengths, valid_len, k.shape[1], self.max_len, sink=sink,
                         recent=recent)
    kept = where.target < self.max_len  # [B, T]: tokens kept.
    table = self.page_table
    if span is not None:  # Pages outside the span are written to the null page.
      start, stop = span
      kept &= (where.target >= start[:, None]) & (where.target < stop[:, None])
      first = jnp.arange(table.shape[1], dtype=jnp.int32)[None, :] * self.page_len
      table = jnp.where((first >= start[:, None]) & (first < stop[:, None]), table, 0)
    mask = kept[:, :, None, None]
    counts = [jnp.sum(mask, dtype=_U32) * _U32(self.kv_heads * self.head_dim)]
    new = {}
    for name, x in (("k", k), ("v", v)):
      new[name], res = self.tensor(name).write(layer, x, where, table)
      counts += [jnp.sum(res.saturated & mask, dtype=_U32),
                 jnp.sum(res.nonfinite & mask, dtype=_U32)]
    counters = self.counters.at[layer].set(add_u64(self.counters[layer], jnp.stack(counts)))
    return dataclasses.replace(self, counters=counters, errors=errors, **new)

  def advance(self, num_new) -> KVCache:
    """Adds `num_new` (an int or integer `[B]` array, >= 0) tokens to each sequence's length.

    A length that would pass `max_len` (a paged sequence's `capacity`) is clamped to
    it and sets `overflow[b]`, for any integer dtype and value (nothing wraps). A
    traced negative `num_new[b]` adds nothing and sets `negative_count` in
    `errors[b]`; a concrete one raises.
    """
    num, negative = saturating_count("num_new", num_new, self.batch, limit=self.max_len + 1)
    room = jnp.maximum(self.capacity() - self.lengths, 0)
    return dataclasses.replace(
        self, lengths=self.lengths + jnp.minimum(num, room), overflow=self.overflow | (num > room),
        errors=self.errors | jnp.where(negative, _NEGATIVE_BIT, np.uint8(0)))

  def reset(self, sequences=None) -> KVCache:
    """Empties the given sequences (bool `[B]` mask; default all) for reuse.

    Lengths, overflow flags and error bits go to 0; stale data stays but is masked.
    Counters are per layer and keep counting.
    """
    keep = jnp.zeros((self.batch,), bool) if sequences is None else ~jnp.asarray(sequences, bool)
    if keep.shape != (self.batch,):
      raise ValueError(f"sequences must be a bool mask of shape ({self.batch},), got {keep.shape}")
    return dataclasses.replace(self, lengths=jnp.where(keep, self.lengths, 0),
                               overflow=self.overflow & keep,
                               errors=jnp.where(keep, self.errors, np.uint8(0)))

  # ------------------------------------------------------------------ reading
  def dequantized(self, layer, which: str, dtype=jnp.float32, *, held=None) -> jax.Array:
    """One layer's keys or values as attention reads them: `[B, K, S, H]` (reference
    path), in the model's coordinates, window positions from the windows.

    Args:
      held: `i32[B]` tokens each sequence holds, which places the recent windows;
        default `lengths` (between `update` and `advance`, pass `lengths + chunk`).

    Positions that hold no token are whatever the memory holds; mask them.
    """
    if self.fmt.windowed and held is None:
      held = self.lengths
    return self.tensor(which).dequantize(layer, dtype, held=held, page_table=self.page_table)

  def counts(self) -> dict[str, np.ndarray]:
    """The counters on the host: `{name: int64[L]}` for each of `COUNTERS`."""
    total = u64_to_int64(self.counters)
    return {name: total[..., i] for i, name in enumerate(COUNTERS)}

  def error_flags(self) -> dict[str, np.ndarray]:
    """On the host: `{name: bool[B]}` for each of `ERRORS`, which sequences it hit."""
    bits = np.asarray(jax.device_get(self.errors))
    return {name: (bits & (1 << i)) != 0 for i, name in enumerate(ERRORS)}

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

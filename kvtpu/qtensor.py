"""`QuantizedKV`: one cached tensor (K or V) of every layer, as one pytree value.

The seam between the cache, the kernels and everything that passes cached tensors
along. It holds the stored values with whatever gives them meaning (scales, zero
points, clip ratios) and its `QuantSpec` as static metadata, so that memory
accounting, sharding, artifacts and kernel wrappers map over it instead of naming
fields. A new per-tensor option changes the spec (`formats`), the math (`quant`),
this type, and the kernel body only where the in-VMEM math changes.

Arrays (axis letters as in ARCHITECTURE.md; G = scale groups per token and head):

  values  [L, B, K, S, H]   storage dtype; per (layer, sequence, kv head) a
                            contiguous `[S, H]` slab, the block a kernel DMAs;
                            transposed (`transposed`, `lanes_transposed`): [L, B, K, H, S].
  scale   per-token specs: [L, B, K, G, S] in the scale dtype, one per token and group,
                            positions in lanes (never broadcast to H);
          token-grouped (`c<N>`): [L, B, K, S/N, H], one per channel and group of N
                            positions, written when the group fills;
          static specs:  [L, 1|K, 1|H], calibrated, fixed at `init`;
          unquantized:   None.
  zero    like `scale`, float32; asymmetric specs only, else None.
  clip    f32 [L, K]: calibrated clip ratios in (0, 1] of a dynamic spec, or None.
  sink    [L, B, K, slots, H] bf16 (f32 for an f32 spec): the first W_s positions of
          each sequence, unquantized, in the stored (rotated) coordinates; or None.
  recent  [L, B, K, slots, H], likewise: position p of the sequence's last W_r in slot
          p mod W_r (a ring); or None.
          A window of W positions stores `window_slots(W)` slots (W rounded up to a
          multiple of 8; the rest never written or read), `[.., H, slots]` where
          `window_transposed` (head_dim not a multiple of 128 and below the slots): the
          layouts XLA's TPU backend keeps as the kernels read them (see
          `pallas_kernels.decode_attention.reference`); `windows` holds the sizes.

Transposed values: TPUs tile the two minor axes in (sublane, 128-lane) tiles, so an
`[S, 64]` slab fills half of each tile's lanes. XLA then stores it channel-major (a
layout with positions minor) and copies the whole cache into and out of the kernels'
row-major layout around every call: temporaries of about twice the cache and that
traffic every step. Where head_dim is not a multiple of 128 lanes (and the slab is a
multiple of 128 positions, and the scales are per token), the values are therefore
stored `[S, H]`-transposed, positions in lanes: whole tiles in HBM and VMEM, the
layout XLA and the kernels agree on. Everything else about the tensor is unchanged;
`shape` stays the logical `[L, B|P, K, S|Z, H]`.

Every array carries the layer axis first, so one `QuantizedKV` serves a whole
model under `lax.scan` over layers.

Paged (`paged=True`): axis 1 of the values and of per-token or token-grouped scales
is a pool of P pages and their position axis holds Z positions (`[L, P, K, Z, H]`,
`[L, P, K, G, Z]`, `[L, P, K, Z/N, H]`); a page table `[B, pages_per_sequence]`
(held by the cache) says which page holds positions `[w Z, (w + 1) Z)` of sequence b.
Windows stay per sequence (axis 1 is B). Page 0 is the null page: never owned,
read for table entries a sequence does not hold and written by writes that write
nothing. A contiguous tensor is the one-page-per-sequence case of the same kernels.

Writing (`write`) quantizes a chunk `[B, T, K, H]` with `quant.quantize` and puts
each token at its sequence's position (`Placement`); on CPU by a scatter, on TPU by
one in-place Pallas kernel call for the whole batch (`write_rows`). A token-grouped spec
instead quantizes each group of N positions that the chunk completes, gathering the
group's earlier positions from the recent window (which holds the open group: the
format has at least N ring slots), and writes the whole group with its scales.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from kvtpu import quant, rotation
from kvtpu._shared import array_nbytes, check_dims, check_layer
from kvtpu.formats import Granularity, QuantSpec
from kvtpu.pallas_kernels import cache_write as cw
from kvtpu.pallas_kernels.decode_attention.reference import (
  Window,
  gather_pages,
  overlay_windows,
  window_slots,
  window_transposed,
)

__all__ = ["QuantizedKV", "Placement", "WRITE_METHODS", "write_rows", "write_window",
           "PARAM_FIELDS",
           "INT2_MIN_ROWS", "INT2_MAX_LEN_MULTIPLE", "INT2_PAGE_MULTIPLE",
           "LOGICAL_AXES", "params_by_tensor", "check_param", "lanes_transposed"]

# Fields fixed when a tensor is created (calibrated), as opposed to written per token.
PARAM_FIELDS = ("scale", "zero", "clip")

# Logical axis names that `logical_axes` uses; `kvtpu.sharding` maps them to mesh axes.
LOGICAL_AXES = ("layers", "batch", "pages", "kv_heads", "positions", "head_dim", "groups",
                "window", "token_groups")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a chunk of T tokens goes, per sequence (all `[B, T]` but `start: [B]`).

  target: the token's position, or max_len (dropped) when past max_len or valid_len.
  start: the first position of the sequence's block of T positions, `lengths` clamped
    to `max_len - T` so the block fits.
  token: the chunk token that row r of the block holds; rows: whether it holds one
    (row r of a block clamped back from the end holds an earlier token, kept).
  sink_target: the token's sink slot (its position) if it is among the first `sink`
    positions, else `sink` (dropped); None without a sink.
  recent_target: the token's ring slot (position mod `recent`) if it is among the
    sequence's last `recent` positions after this chunk, else `recent` (dropped): of
    a chunk longer than the ring only its last `recent` tokens are written, so no
    slot is written twice. None without a ring.
  lengths: `[B]` tokens each sequence held before the chunk; end: `[B]` after it
    (clamped to max_len).
  """

  target: jax.Array
  start: jax.Array
  token: jax.Array
  rows: jax.Array
  sink_target: jax.Array | None = None
  recent_target: jax.Array | None = None
  lengths: jax.Array | None = None
  end: jax.Array | None = None

  @classmethod
  def of(cls, lengths: jax.Array, valid_len: jax.Array, t: int, max_len: int, *, sink: int = 0,
         recent: int = 0) -> Placement:
    steps = jnp.arange(t, dtype=jnp.int32)[None, :]
    pos = lengths[:, None] + steps
    kept = (pos < max_len) & (steps < valid_len[:, None])
    target = jnp.where(kept, pos, max_len)
    start = jnp.minimum(lengths, max_len - t)
    token = start[:, None] + steps - lengths[:, None]
    rows = (token >= 0) & (token < valid_len[:, None])
    sink_target = recent_target = None
    if sink:
      sink_target = jnp.where(kept & (pos < sink), pos, sink)
    end = jnp.minimum(lengths + valid_len, max_len)
    if recent:
      recent_target = jnp.where(kept & (pos >= end[:, None] - recent), jax.lax.rem(pos, recent),
                                recent)
    return cls(target=target, start=start, token=jnp.clip(token, 0, t - 1), rows=rows,
               sink_target=sink_target, recent_target=recent_target, lengths=lengths, end=end)


def _scatter_bits(store: jax.Array, index, values: jax.Array) -> jax.Array:
  """`store.at[index].set(values, mode="drop")`, moving bits, not numbers.

  Sub-32-bit floats (bf16, fp8) scatter as unsigned integers of the same width: the
  same bytes, but XLA's CPU backend would otherwise widen the whole cache to f32 and
  back around every scatter (many times slower than the integer scatter).
  """
  dtype = jnp.dtype(store.dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    bits = jnp.dtype(f"uint{8 * dtype.itemsize}")
    out = jax.lax.bitcast_convert_type(store, bits).at[index].set(
        jax.lax.bitcast_convert_type(values.astype(dtype), bits), mode="drop")
    return jax.lax.bitcast_convert_type(out, dtype)
  return store.at[index].set(values.astype(dtype), mode="drop")


# int2 stores: the fewest positions a written block spans, and the multiple of
# positions their max_len must be (XLA's TPU layouts of int2 arrays; the compiler
# aborts rather than raises on others). A pool's pages may be half that: a decode or
# prefill step over pages of 64 (update and attend) compiles for v5e and v6e.
INT2_MIN_ROWS = 16
INT2_MAX_LEN_MULTIPLE = 128
INT2_PAGE_MULTIPLE = 64

_LANES = 128


def lanes_transposed(spec: QuantSpec, head_dim: int, slab: int) -> bool:
  """Whether a tensor of `spec` stores its values transposed, `[.., H, S]` (see the module
  docstring): head_dim not a multiple of the 128 lanes, `slab` (S, or a page's Z) a
  multiple of them, and scales per token or none (per-channel scales over token groups
  keep `[S, H]` values, which their `[S / N, H]` scales follow)."""
  return head_dim % _LANES != 0 and slab % _LANES == 0 and spec.token_group is None


# How a chunk is written (`write_rows`): "scatter" (XLA's CPU backend scatters in
# place; every platform but TPU), "pallas" (one in-place Pallas kernel call for the
# batch, on TPU), "interpret" (that kernel in Pallas interpret mode), "blocks" (one
# dynamic-update-slice per sequence: TPU stores the kernel cannot take).
WRITE_METHODS = ("scatter", "pallas", "interpret", "blocks")


def write_rows(store: jax.Array, layer, values: jax.Array, where: Placement, seq_axis: int,
               method: str | None = None, page_table: jax.Array | None = None) -> jax.Array:
  """Writes a chunk `values: [B, T, K, X]` into `store: [L, B, K, ...]`.

  `seq_axis` is the store's position axis: 3 for values `[L, B, K, S, H]`, 4 for
  dynamic scales `[L, B, K, G, S]` and transposed values `[L, B, K, H, S]`. `method`:
  one of `WRITE_METHODS`, or None for the platform's choice when lowering: on TPU the
  Pallas kernel (`pallas_kernels.cache_write`) where its `layout_error` is None, else
  blocks; the scatter elsewhere (two branches: `platform_dependent` traces every branch
  of every write). Every method stores the same bits. With `page_table` the store is a
  pool of pages (`[L, P, K, Z, H]`, ...) and `where` counts positions of the sequence
  (dropped ones at Z x the table's width); "blocks" then scatters.

  Why several: XLA's TPU scatter picks a layout of its own for the cache array and
  copies the whole `[L, B, K, S, H]` array into and out of it around every layer's
  write (temporaries of several times the cache in an ahead-of-time compile). One
  dynamic-update-slice per sequence updates in place, but the compiled step grows
  with the batch (and its compile time with it), and XLA converts a whole int2 array
  around each one. The kernel is one call for the batch that touches only the tiles
  the chunk lands in. On CPU the scatter is in place and the cheapest.
  """
  if method is None:
    def write(method):
      return lambda store, values: write_rows(store, layer, values, where, seq_axis, method,
                                              page_table)

    tpu = "blocks" if cw.layout_error(store.shape, store.dtype, seq_axis) else "pallas"
    return jax.lax.platform_dependent(store, values, tpu=write(tpu), default=write("scatter"))
  if method == "scatter" or (method == "blocks" and page_table is not None):
    target = where.target
    if page_table is None:
      rows = jnp.arange(store.shape[1])[:, None]  # [B, 1]
    else:  # Position p of sequence b: offset p % Z of page table[b, p // Z].
      z = store.shape[seq_axis]
      slot = jnp.minimum(jax.lax.div(target, z), page_table.shape[1] - 1)
      rows = jnp.take_along_axis(page_table, slot, axis=1)
      dropped = (target >= z * page_table.shape[1]) | (rows < 0) | (rows >= store.shape[1])
      target = jnp.where(dropped, z, jax.lax.rem(target, z))  # z: out of the page, dropped.
      rows = jnp.clip(rows, 0, store.shape[1] - 1)
    index = (layer, rows) + (slice(None),) * (seq_axis - 2) + (target,)
    return _scatter_bits(store, index, values)
  if method in ("pallas", "interpret"):
    error = cw.layout_error(store.shape, store.dtype, seq_axis)
    if error is not None:
      raise ValueError(error)
    # A layer out of range writes nothing: `Placement.of` got valid_len 0 for it
    # (`KVCache.update`), so end == lengths, and the kernel clamps the index.
    return cw.cache_write(store, values, layer, where.lengths, where.end, seq_axis=seq_axis,
                          page_table=page_table,
                          interpret=pltpu.InterpretParams() if method == "interpret" else False)
  if method != "blocks":
    raise ValueError(f"method must be one of {WRITE_METHODS} or None, got method={method!r}")
  start, token, rows = where.start, where.token, where.rows
  t = values.shape[1]
  if jnp.dtype(store.dtype) == jnp.int2 and t < INT2_MIN_ROWS:
    # XLA's TPU layouts of int2 need at least 16 rows: write a block of 16 positions
    # that holds the chunk's, each row taking the chunk token whose target it is.
    t = INT2_MIN_ROWS
    start = jnp.minimum(start, store.shape[seq_axis] - t)
    match = where.target[:, None, :] == (start[:, None] + jnp.arange(t)[None, :])[:, :, None]
    token, rows = jnp.argmax(match, axis=-1), match.any(axis=-1)
  # An int2 block is merged in the values' dtype (int8), so that the only int2 arrays
  # are whole blocks.
  carrier = values.dtype if jnp.dtype(store.dtype) == jnp.int2 else store.dtype
  blocks = jnp.take_along_axis(values, token[:, :, None, None], axis=1)
  blocks = jnp.moveaxis(blocks, 1, seq_axis - 1).astype(carrier)  # [B, K, ...T...]
  keep_shape = [1] * (blocks.ndim - 1)
  keep_shape[seq_axis - 2] = t
  zeros = [0] * (store.ndim - 2)
  for b in range(store.shape[1]):
    index = list(zeros)
    index[seq_axis - 2] = start[b]
    index = (layer, b, *index)
    old = jax.lax.dynamic_slice(store, index, (1, 1, *blocks.shape[1:]))[0, 0].astype(carrier)
    block = jnp.where(rows[b].reshape(keep_shape), blocks[b], old).astype(store.dtype)
    store = jax.lax.dynamic_update_slice(store, block[None, None], index)
  return store


def write_window(store: jax.Array, layer, values: jax.Array, target: jax.Array,
                 method: str | None = None, transposed: bool = False) -> jax.Array:
  """Writes a chunk `values: [B, T, K, H]` into a window `store: [L, B, K, W, H]` (`[L,
  B, K, H, W]` when `transposed`), token t of sequence b into slot `target[b, t]` (W,
  the stored slots, or more: dropped; from `Placement.sink_target` or `recent_target`,
  which never name a slot twice and mark a dropped token with the window's size: remap
  those to W on a padded store, as `QuantizedKV.write` does).

  `method`: "scatter" (XLA), "pallas" or "interpret" (`cache_write.window_write`: a
  sequence's window in VMEM, in place), or None for the platform's choice when
  lowering: the kernel on TPU, where XLA's scatter copies the whole window array into
  a layout of its own and back around every write, unless no block of the window fits
  the kernel's VMEM budget (`cache_write.window_blocks`); the scatter elsewhere. Every
  method stores the same bits.
  """
  if method is None:
    def write(method):
      return lambda store, values: write_window(store, layer, values, target, method, transposed)

    k = store.shape[2]
    width, h = (store.shape[4], store.shape[3]) if transposed else store.shape[3:]
    blocks = cw.window_blocks(k, width, h, store.dtype, transposed=transposed)
    tpu = "scatter" if blocks is None else "pallas"
    return jax.lax.platform_dependent(store, values, tpu=write(tpu), default=write("scatter"))
  if method == "scatter":
    rows = jnp.arange(store.shape[1])[:, None]  # [B, 1]
    # Both index lists broadcast to [B, T] ahead of the sliced axes: values [B, T, K, H].
    index = (layer, rows, slice(None), *((slice(None),) if transposed else ()), target)
    return _scatter_bits(store, index, values)
  if method not in ("pallas", "interpret"):
    raise ValueError(f"method must be 'scatter', 'pallas', 'interpret' or None, got "
                     f"method={method!r}")
  b, width = store.shape[1], store.shape[4 if transposed else 3]
  # Slot w's token (-1: none), by scattering the small [B, T] targets.
  token = jnp.full((b, width + 1), -1, jnp.int32).at[jnp.arange(b)[:, None], target].set(
      jnp.broadcast_to(jnp.arange(values.shape[1], dtype=jnp.int32), target.shape), mode="drop")
  token = token[:, :width]
  placed = jnp.take_along_axis(values, jnp.maximum(token, 0)[:, :, None, None], axis=1)
  placed = jnp.swapaxes(placed, 1, 2).astype(store.dtype)  # [B, K, W, H]
  keep = (token >= 0).astype(jnp.int32)[:, :, None]  # [B, W, 1]
  if transposed:
    placed, keep = jnp.swapaxes(placed, -1, -2), jnp.swapaxes(keep, -1, -2)
  return cw.window_write(store, placed, keep, layer, transposed=transposed,
                         interpret=pltpu.InterpretParams() if method == "interpret" else False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """One cached tensor (K or V) of all layers: stored values and their meaning.

  Attributes:
    values: `[L, B, K, S, H]` in `spec.storage_dtype`, or `[L, B, K, H, S]` when
      `transposed`.
    scale: per-token specs `[L, B, K, G, S]`, token-grouped specs `[L, B, K, S/N, H]`,
      static specs `[L, 1|K, 1|H]` (finite, > 0), in the spec's scale dtype; None when
      unquantized.
    zero: integer-valued float32 zero points shaped like `scale` (asymmetric specs),
      else None.
    clip: float32 `[L, K]` clip ratios in (0, 1] of a dynamic spec, or None (plain
      absmax scales).
    sink, recent: the unquantized windows, `[L, B, K, slots, H]` or `[L, B, K, H,
      slots]` (see the module docstring), or None.
    spec: how the values are stored (static pytree metadata).
    paged: whether axis 1 of the values and scales is a pool of pages (static; see
      the module docstring).
    transposed: whether the values are stored positions-minor, `[.., H, S]` (static;
      `lanes_transposed`).
    windows: `(sink, recent)` window sizes in positions (static; 0: none); each window
      has `window_slots` of them stored, `window_transposed` or not.

  Invariant: a stored value `q` means `(q - zero) * scale` (`quant.dequantize`).
  `shape` is the values' logical `[L, B|P, K, S|Z, H]` (whatever the storage order),
  `dtype` and `ndim` the stored values', so code that only sizes a tensor does not
  unpack it.
  """

  values: jax.Array
  scale: jax.Array | None
  zero: jax.Array | None
  clip: jax.Array | None
  sink: jax.Array | None
  recent: jax.Array | None
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
  paged: bool = dataclasses.field(default=False, metadata=dict(static=True))
  transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))
  windows: tuple[int, int] = dataclasses.field(default=(0, 0), metadata=dict(static=True))

  # ----------------------------------------------------------------- creation
  @classmethod
  def layout(cls, spec: QuantSpec, *, num_layers: int, batch: int, kv_heads: int, max_len: int,
             head_dim: int, clip: bool = False, sink: int = 0, recent: int = 0,
             pages: int | None = None) -> QuantizedKV:
    """The tensor's arrays as `jax.ShapeDtypeStruct`s: the one definition of its layout.

    With `pages`, a paged tensor: a pool of `pages` pages of `max_len` (Z) positions,
    windows for `batch` sequences.

    Raises:
      ValueError: for a non-positive dimension, a head_dim the spec's group size
        does not divide, a max_len a token-grouped spec's group does not divide,
        `clip` on a spec that is not dynamic, a window on a static spec, or int2
        storage with max_len not a multiple of 128 (page_len: 64).
    """
    check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
               head_dim=head_dim, **({} if pages is None else {"pages": pages}))
    rows = batch if pages is None else pages
    if clip and not spec.clippable:
      raise ValueError(f"clip ratios are for range-scaled dynamic (per-token) specs, not {spec.name}")
    what = "max_len" if pages is None else "page_len"  # The positions of one slab.
    multiple = INT2_MAX_LEN_MULTIPLE if pages is None else INT2_PAGE_MULTIPLE
    if spec.dtype.value == "int2" and max_len % multiple:
      raise ValueError(f"int2 storage needs {what} a multiple of {multiple} (the TPU layout "
                       f"of int2 arrays), got {what}={max_len} ({spec.name})")
    n = spec.token_group
    if n is not None and max_len % n:
      raise ValueError(f"{spec.name} scales groups of {n} positions: {what} must be a multiple "
                       f"of {n}, got {what}={max_len}")
    sds = jax.ShapeDtypeStruct
    transposed = lanes_transposed(spec, head_dim, max_len)
    slab = (head_dim, max_len) if transposed else (max_len, head_dim)
    values = sds((num_layers, rows, kv_heads, *slab), spec.storage_dtype)
    scale = zero = None
    if spec.quantized:
      if n is not None:
        shape = (num_layers, rows, kv_heads, max_len // n, head_dim)
      elif spec.dynamic:
        shape = (num_layers, rows, kv_heads, spec.num_groups(head_dim), max_len)
      else:
        shape = (num_layers, *quant.static_scale_shape(spec, kv_heads, head_dim))
      scale = sds(shape, spec.scale_jnp_dtype)
      zero = None if spec.symmetric else sds(shape, quant.ZERO_DTYPE)
    if (sink or recent) and spec.static:
      raise ValueError(f"sink/recent windows are for dynamic or unquantized specs, not {spec.name}")
    window_dtype = jnp.float32 if spec.storage_dtype == jnp.float32 else jnp.bfloat16

    def window(size: int) -> jax.ShapeDtypeStruct | None:
      if not size:
        return None
      slots = window_slots(size)
      minor = (head_dim, slots) if window_transposed(head_dim, slots) else (slots, head_dim)
      return sds((num_layers, batch, kv_heads, *minor), window_dtype)

    return cls(values=values, scale=scale, zero=zero,
               clip=sds((num_layers, kv_heads), jnp.float32) if clip else None,
               sink=window(sink), recent=window(recent), spec=spec, paged=pages is not None,
               transposed=transposed, windows=(sink, recent))

  @staticmethod
  def max_len_multiple(spec: QuantSpec, *, paged: bool = False) -> int:
    """What `max_len` (with `paged`, a pool's `page_len`) must be a multiple of for
    `spec`: 128 for int2 storage (64 for its pages; TPU layouts), N for per-channel
    scales over N positions (whole groups), else 1."""
    int2 = ((INT2_PAGE_MULTIPLE if paged else INT2_MAX_LEN_MULTIPLE)
            if spec.dtype.value == "int2" else 1)
    return math.lcm(int2, spec.token_group or 1)

  @staticmethod
  def param_names(spec: QuantSpec, *, clip: bool = False) -> tuple[str, ...]:
    """The calibrated fields of a tensor of `spec`: static scales (and zero points),
    or the clip ratios of a dynamic spec that has them."""
    if spec.static:
      return ("scale",) if spec.symmetric else ("scale", "zero")
    return ("clip",) if clip and spec.clippable else ()

  @classmethod
  def init(cls, spec: QuantSpec, *, name: str = "x", num_layers: int, batch: int, kv_heads: int,
           max_len: int, head_dim: int, scale=None, zero=None, clip=None, sink: int = 0,
           recent: int = 0, pages: int | None = None) -> QuantizedKV:
    """An empty tensor: zero values and per-token scales, validated calibrated fields.

    Args:
      spec: the storage spec.
      name: "k" or "v", for messages (`k_scale must ...`).
      num_layers, batch, kv_heads, max_len, head_dim: dimensions.
      scale, zero: a static spec's calibrated scale (and zero point, asymmetric
        specs), `[L, 1|K, 1|H]` or without the leading L (shared by all layers).
      clip: optional clip ratios of a dynamic spec, `[L, K]` or `[K]`.
      sink, recent: window sizes (0: none).
      pages: None, or the pool size of a paged tensor (`max_len` is then its Z).

    Raises:
      ValueError: for a missing, extra or misshaped parameter, a scale that is 0,
        negative, NaN or inf (also once rounded into the scale dtype), a zero point
        that is not an integer, or a clip ratio outside (0, 1].
    """
    given = {"scale": scale, "zero": zero, "clip": clip}
    names = cls.param_names(spec, clip=clip is not None)
    if clip is not None and not spec.clippable:
      raise ValueError(
          f"{name}_clip given, but {name.upper()} is stored as {spec.name}: clip ratios are "
          "for range-scaled dynamic (per-token) specs only (not static or non-uniform ones)")
    extra = [f"{name}_{p}" for p, v in given.items() if v is not None and p not in names]
    if extra:
      raise ValueError(
          f"{', '.join(extra)} given, but {name.upper()} is stored as {spec.name}, which has no "
          "static parameter of that name (dynamic or bf16 specs take none; symmetric specs "
          "take no zero)")
    shape = cls.layout(spec, num_layers=num_layers, batch=batch, kv_heads=kv_heads,
                       max_len=max_len, head_dim=head_dim, clip=clip is not None, sink=sink,
                       recent=recent, pages=pages)
    _check_open_group(spec, recent)

    def make(field: str, sds: jax.ShapeDtypeStruct | None):
      if sds is None:
        return None
      if field in names:
        return _calibrated(f"{name}_{field}", given[field], sds, spec)
      return jnp.zeros(sds.shape, sds.dtype)

    return dataclasses.replace(shape, **{f: make(f, getattr(shape, f)) for f in _ARRAYS})

  # --------------------------------------------------------------- properties
  @property
  def shape(self) -> tuple[int, ...]:
    """The values' logical shape `[L, B|P, K, S|Z, H]` (stored `[.., H, S]` if transposed)."""
    shape = tuple(self.values.shape)
    return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else shape

  @property
  def values_seq_axis(self) -> int:
    """The position axis of `values` (3, or 4 when transposed)."""
    return 4 if self.transposed else 3

  def relayout(self, transposed: bool) -> QuantizedKV:
    """This tensor with its values stored the other way round (`transposed`: `[.., H,
    S]`), same meaning; for comparing layouts and converting stored caches.

    Raises:
      ValueError: for a `transposed` that is not a bool, or True for per-channel scales
        over token groups (their `[S / N, H]` scales follow `[S, H]` values).
    """
    if not isinstance(transposed, bool):
      raise ValueError(f"transposed must be a bool, got {transposed!r}")
    if transposed and self.spec.token_group is not None:
      raise ValueError(f"transposed=True: {self.spec.name} keeps per-channel scales over "
                       f"groups of {self.spec.token_group} tokens, which need [S, H] values")
    if transposed == self.transposed:
      return self
    return dataclasses.replace(self, values=jnp.swapaxes(self.values, -1, -2),
                               transposed=transposed)

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.values.dtype)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

  def window_sizes(self) -> tuple[int, int]:
    """`(sink, recent)` window sizes in positions (0: none)."""
    return self.windows

  def window(self, field: str) -> Window | None:
    """The `sink` or `recent` window as the kernels read it (its stored array, size and
    layout), or None."""
    data = getattr(self, field)
    if data is None:
      return None
    size = self.windows[("sink", "recent").index(field)]
    if not size:  # (Not checked at construction: JAX rebuilds pytrees with placeholders.)
      raise ValueError(f"this tensor holds a {field} array but windows={self.windows} gives it "
                       "no size; build tensors with QuantizedKV.layout / init")
    return Window(data, size, window_transposed(self.shape[-1], window_slots(size)))

  @property
  def nbytes(self) -> int:
    """Bytes of all arrays, int4 at half a byte per value."""
    return sum(array_nbytes(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(self))

  @property
  def codes(self) -> tuple[float, ...] | None:
    """The codebook a non-uniform spec's stored integers index (`quant.codebook`),
    which the kernels decode in VMEM; None for a uniform grid."""
    return quant.codebook(self.spec)

  @property
  def token_group(self) -> int | None:
    """Positions per per-channel scale of a token-grouped spec (`c<N>`), which the kernels
    read as `[L, B, K, S / N, H]` scales; None for every other spec."""
    return self.spec.token_group

  @property
  def per_token_scale(self) -> jax.Array | None:
    """The `[L, B, K, G, S]` scales of a per-token spec, else None."""
    return self.scale if self.spec.per_token else None

  @property
  def per_token_zero(self) -> jax.Array | None:
    """The `[L, B, K, G, S]` zero points of a per-token asymmetric spec, else None."""
    return self.zero if self.spec.per_token else None

  def params(self) -> dict[str, jax.Array]:
    """The calibrated fields present (`param_names`), by field name."""
    return {f: getattr(self, f) for f in self.param_names(self.spec, clip=self.clip is not None)}

  def logical_axes(self) -> QuantizedKV:
    """Each array's axes by logical name (`LOGICAL_AXES`), as `PartitionSpec`s.

    A size-1 broadcast axis (a static scale shared by heads or channels) is None.
    Works on a real or an abstract (`ShapeDtypeStruct`) tensor.
    """
    rows = "pages" if self.paged else "batch"
    per_position = P("layers", rows, "kv_heads",
                     *(("head_dim", "positions") if self.transposed else ("positions", "head_dim")))
    scale = None
    if self.scale is not None:
      if self.spec.token_group is not None:
        scale = P("layers", rows, "kv_heads", "token_groups", "head_dim")
      elif self.spec.dynamic:
        scale = P("layers", rows, "kv_heads", "groups", "positions")
      else:
        g = self.spec.granularity
        scale = P("layers", "kv_heads" if g is not Granularity.TENSOR else None,
                  "head_dim" if g is Granularity.CHANNEL else None)
    def window(field: str):
      w = self.window(field)
      if w is None:
        return None
      minor = ("head_dim", "window") if w.transposed else ("window", "head_dim")
      return P("layers", "batch", "kv_heads", *minor)

    return dataclasses.replace(
        self, values=per_position, scale=scale, zero=None if self.zero is None else scale,
        clip=None if self.clip is None else P("layers", "kv_heads"),
        sink=window("sink"), recent=window("recent"))

  # ---------------------------------------------------------------- reading
  def dequantize(self, layer, dtype=jnp.float32, *, held=None, page_table=None) -> jax.Array:
    """One layer's tensor, dequantized: `[B, K, S, H]` (the reference path), in the
    model's coordinates (a rotated spec's values rotated back).

    Args:
      held: optional `i32[B]` tokens each sequence holds: positions in its windows
        are then read from them (what attention reads); without it, every position
        from the quantized store.
      page_table: a paged tensor's `[B, pages_per_sequence]` table (required for
        one; S is then Z x pages_per_sequence).

    Positions that hold no token are whatever the memory holds; mask them.
    """
    out = self.dequantize_stored(layer, jnp.float32, held=held, page_table=page_table)
    return (rotation.unrotate(out) if self.spec.rotation else out).astype(dtype)

  def dequantize_stored(self, layer, dtype=jnp.float32, *, held=None,
                        page_table=None) -> jax.Array:
    """One layer's tensor as stored, dequantized: `[B, K, S, H]`, still rotated for a
    rotated spec (what the kernels' logits and outputs are computed over); `held`
    and `page_table` as in `dequantize`."""
    check_layer(layer, self.shape[0])
    self._check_table(page_table)
    out = self._dequantize_store(layer, dtype, page_table)
    return out if held is None else self._overlay_windows(out, layer, held)

  def _check_table(self, page_table) -> None:
    if self.paged and page_table is None:
      raise ValueError(f"this {self.spec.name} tensor is paged: pass its page_table "
                       "([B, pages_per_sequence], from the cache)")
    if not self.paged and page_table is not None:
      raise ValueError("page_table given for a contiguous (unpaged) tensor")

  def _per_sequence(self, x: jax.Array | None, layer, page_table, seq_axis: int):
    """One layer of a per-position array (values, per-token or token-grouped scales)
    as per-sequence slabs `[B, K, ...S...]`: a paged tensor's pages gathered through
    `page_table` (positions on `seq_axis` of the layer's array)."""
    if x is None:
      return None
    return x[layer] if page_table is None else gather_pages(x[layer], page_table, seq_axis)

  def _overlay_windows(self, out: jax.Array, layer, held) -> jax.Array:
    """`out: [B, K, S, H]` with each sequence's window positions read from the windows."""
    pick = lambda w: None if w is None else w.layer(layer)  # noqa: E731
    return overlay_windows(out, pick(self.window("sink")), pick(self.window("recent")), held)

  def _dequantize_store(self, layer, dtype, page_table=None) -> jax.Array:
    data = self._per_sequence(self.values, layer, page_table, self.values_seq_axis - 1)
    if self.transposed:
      data = jnp.swapaxes(data, -1, -2)
    if not self.spec.quantized:
      return quant.dequantize(data, self.spec, dtype=dtype)

    n = self.spec.token_group
    if n is not None:  # [B, K, S, H] as groups [B, K, S/N, N, H], scales [B, K, S/N, 1, H].
      def per_group(p):
        return None if p is None else self._per_sequence(p, layer, page_table, 2)[..., None, :]
      b, k, s, h = data.shape
      out = quant.dequantize(data.reshape(b, k, s // n, n, h), self.spec,
                             per_group(self.scale), per_group(self.zero), dtype=dtype)
      return out.reshape(b, k, s, h)

    def per_position(p):
      if p is None:
        return None
      if self.spec.dynamic:  # Per-token [B, K, G, S] -> [B, K, S, G].
        return jnp.swapaxes(self._per_sequence(p, layer, page_table, 3), -1, -2)
      return p[layer][:, None, :]  # Static [1|K, 1|H] -> [1|K, 1, 1|H].

    return quant.dequantize(data, self.spec, per_position(self.scale), per_position(self.zero),
                            dtype=dtype)

  # ------------------------------------------------- static scales, outside kernels
  @property
  def kernel_operand(self) -> QuantizedKV:
    """What the attention kernels read: this tensor with its per-token scales, or, for
    a static spec, without its scales (folded around the kernel by `scale_queries` and
    `scale_output`)."""
    return dataclasses.replace(self, scale=None, zero=None) if self.spec.static else self

  def _static(self, p: jax.Array | None, layer) -> jax.Array | None:
    """A static `[L, 1|K, 1|H]` parameter at `layer`, as `[1, 1, 1|K, 1, 1|H]` against
    grouped queries `[B, T, K, G, H]`."""
    return None if p is None else p[layer].astype(jnp.float32)[None, None, :, None, :]

  def scale_queries(self, qg: jax.Array, layer) -> jax.Array:
    """Grouped queries `[B, T, K, G, H]` in the keys' stored coordinates: rotated for a
    rotated key spec (`(q R) . (k R) = q . k`), then times a static key scale (per
    head and channel), so that logits over the raw stored keys equal logits over the
    dequantized ones up to a per-row constant: the key zero point shifts every logit
    of a query row by the same amount, which softmax ignores. Identity for other
    specs."""
    if self.spec.rotation:
      qg = rotation.rotate(qg)
    return qg if not self.spec.static else qg * self._static(self.scale, layer)

  def scale_output(self, og: jax.Array, layer, has_keys: jax.Array) -> jax.Array:
    """Attention output over raw stored values `[B, T, K, G, H]` -> over the values in
    model coordinates: for a static value spec `(out - zero) * scale`, exact because
    each row's probabilities sum to 1, rows with no keys (`has_keys` False) staying
    0; then rotated back for a rotated spec (`(o R) R.T = o`). Identity for other
    specs."""
    if self.spec.static:
      if self.zero is not None:
        og = og - self._static(self.zero, layer)
      og = jnp.where(has_keys, og * self._static(self.scale, layer), 0.0)
    return rotation.unrotate(og) if self.spec.rotation else og

  # ---------------------------------------------------------------- writing
  def write(self, layer, x: jax.Array, where: Placement,
            page_table=None) -> tuple[QuantizedKV, quant.Quantized]:
    """Quantizes a chunk `x: [B, T, K, H]` of one layer and writes it at `where`
    (positions of the sequences; a paged tensor's through `page_table`).

    Returns the new tensor and the `quant.Quantized` result (its `saturated` and
    `nonfinite` masks are over the whole chunk: mask them with `where`; its `q` is
    int8 for an int2 spec; a token-grouped spec's `q`, `scale` and `zero` are those of
    the groups the chunk may complete, `_write_groups`). A rotated spec quantizes
    `x @ R` (computed in float32) with non-finite inputs taken as 0 first; windows
    store non-finite values as 0, as the quantized store does.
    """
    spec = self.spec
    self._check_table(page_table)
    nonfinite = ~jnp.isfinite(x)
    if spec.rotation:  # Non-finite inputs become 0 before the rotation spreads them.
      x = rotation.rotate(jnp.where(nonfinite, 0.0, x), jnp.float32)
    windows = {}
    for field, target in (("sink", where.sink_target), ("recent", where.recent_target)):
      w = self.window(field)
      if w is not None:  # Dropped tokens (target = size) past the stored slots too.
        target = jnp.where(target < w.size, target, w.slots)
        windows[field] = write_window(w.data, layer, jnp.where(jnp.isfinite(x), x, 0.0), target,
                                      transposed=w.transposed)
    if spec.token_group is not None:
      _check_open_group(spec, self.window_sizes()[1])
      return self._write_groups(layer, x, nonfinite, where, windows, page_table)
    if spec.static:
      params = dict(scale=self.scale[layer], zero=None if self.zero is None else self.zero[layer])
    else:
      params = {} if self.clip is None else dict(clip=self.clip[layer])  # [K] vs [B, T, K].
    # int2 values travel as int8 until they are written (`quant.quantize`'s q_dtype;
    # the write kernel narrows int2 and int4 rows in VMEM).
    narrow = spec.storage_dtype == jnp.int2
    res = quant.quantize(x, spec, **params, q_dtype=jnp.int8 if narrow else None)
    if spec.rotation:  # Counted where they came in, not over the rotated coordinates.
      res = res._replace(nonfinite=nonfinite)
    # [B, T, K, H] rows go to [layer, b, :, pos[b, t], :].
    new = {"values": write_rows(self.values, layer, res.q, where, self.values_seq_axis,
                                page_table=page_table),
           **windows}
    if spec.dynamic:  # [B, T, K, G] rows go to [layer, b, :, :, pos[b, t]].
      new["scale"] = write_rows(self.scale, layer, res.scale, where, 4, page_table=page_table)
      if self.zero is not None:
        new["zero"] = write_rows(self.zero, layer, res.zero, where, 4, page_table=page_table)
    return dataclasses.replace(self, **new), res

  def _write_groups(self, layer, x: jax.Array, nonfinite: jax.Array, where: Placement,
                    windows: dict, page_table=None) -> tuple[QuantizedKV, quant.Quantized]:
    """`write` for a token-grouped spec, after the chunk went to the windows (`windows`:
    the new window arrays; `self` still holds the old ones): each group of N positions
    the chunk completes is quantized per channel and written whole.

    A chunk of T tokens completes at most M = ceil(T / N) groups, the ones ending in
    `(lengths, end]`; they are the M groups from `lengths // N` on, the first
    `end // N - lengths // N` of them complete. Their positions before `lengths` are
    read from the ring as it was before this chunk (it holds the sequence's last
    `recent >= N` positions, so every position of the open group), the others from
    the chunk, all as their window copies hold them (bf16), so what is stored does not
    depend on how the sequence was chunked. The M groups are quantized, and the
    complete ones written with their scales; the rest are dropped (`Placement` of a
    shorter valid length).
    """
    spec, n = self.spec, self.spec.token_group
    b, t, kh, h = x.shape
    m = -(-t // n)
    ring = self.window("recent").layer(layer)  # [B, K, W_r, H], before this chunk.
    # Every position is quantized from its window copy (bf16), whether it comes from
    # this chunk or from the ring: what is stored does not depend on the chunking.
    x = jnp.where(jnp.isfinite(x), x, 0.0).astype(ring.dtype).astype(jnp.float32)
    first = jax.lax.div(where.lengths, n)  # [B] the first group the chunk may complete.
    pos = first[:, None] * n + jnp.arange(m * n, dtype=jnp.int32)[None, :]  # [B, M*N]
    old = pos < where.lengths[:, None]
    slot = jax.lax.rem(pos, ring.shape[2])
    from_ring = jnp.take_along_axis(ring, slot[:, None, :, None], axis=2)  # [B, K, M*N, H]
    from_chunk = jnp.take_along_axis(
        x, jnp.clip(pos - where.lengths[:, None], 0, t - 1)[:, :, None, None], axis=1)
    groups = jnp.where(old[:, :, None, None], jnp.swapaxes(from_ring, 1, 2).astype(jnp.float32),
                       from_chunk)  # [B, M*N, K, H]
    groups = groups.reshape(b, m, n, kh, h).transpose(0, 1, 3, 2, 4)  # [B, M, K, N, H]
    narrow = spec.storage_dtype == jnp.int2
    res = quant.quantize(groups, spec, q_dtype=jnp.int8 if narrow else None)
    complete = jax.lax.div(where.end, n) - first  # [B] in [0, M]
    max_len = self.shape[3] * (1 if page_table is None else page_table.shape[1])
    positions = Placement.of(first * n, complete * n, m * n, max_len)
    slots = Placement.of(first, complete, m, max_len // n)
    q = res.q.transpose(0, 1, 3, 2, 4).reshape(b, m * n, kh, h)
    put = functools.partial(write_rows, layer=layer, seq_axis=3, page_table=page_table)
    new = {"values": put(self.values, values=q, where=positions), **windows,
           "scale": put(self.scale, values=res.scale[:, :, :, 0, :], where=slots)}
    if self.zero is not None:
      new["zero"] = put(self.zero, values=res.zero[:, :, :, 0, :], where=slots)
    return dataclasses.replace(self, **new), res._replace(saturated=jnp.zeros(x.shape, bool),
                                                          nonfinite=nonfinite)


def _check_open_group(spec: QuantSpec, recent: int) -> None:
  """A token-grouped spec reads its open group from the ring: at least N slots."""
  n = spec.token_group
  if n is not None and recent < n:
    raise ValueError(f"{spec.name} holds each open group of {n} positions in the recent window "
                     f"until it fills: it needs recent >= {n}, got recent={recent}")


_ARRAYS = ("values", "scale", "zero", "clip", "sink", "recent")


def check_param(name: str, field: str, value) -> None:
  """Validates a calibrated field's values (concrete arrays): scales finite and > 0,
  zero points finite integers, clip ratios in (0, 1].

  Raises:
    ValueError: naming `name`, the count of bad entries and the first one.
  """
  if field == "clip":
    quant.validate_clip(name, value)
  elif field in ("scale", "zero"):
    quant.validate_scale(name, value, is_zero=field == "zero")
  else:
    raise ValueError(f"unknown calibrated field {field!r} of {name}; fields: {PARAM_FIELDS}")


def _calibrated(name: str, value, sds: jax.ShapeDtypeStruct, spec: QuantSpec) -> jax.Array:
  """A calibrated parameter `[L, ...]` (or `[...]`, shared by layers), validated."""
  if value is None:
    raise ValueError(
        f"{name[0].upper()} is stored as {spec.name}, with static {spec.granularity.value} "
        f"scales: pass {name} with shape {sds.shape} (or {sds.shape[1:]}), e.g. from "
        "calibration; kvtpu never assumes a default scale")
  arr = jnp.asarray(value, dtype=jnp.float32)
  if arr.shape not in (sds.shape, sds.shape[1:]):
    raise ValueError(f"{name} must have shape {sds.shape} or {sds.shape[1:]}, got {arr.shape}")
  field = name.partition("_")[2]
  check_param(name, field, arr)
  stored = jnp.broadcast_to(arr, sds.shape).astype(sds.dtype)
  if field == "scale":  # Rounding into a narrower dtype must not make it 0 or inf.
    check_param(f"{name} (as {sds.dtype})", field, stored)
  return stored


def params_by_tensor(flat: Mapping[str, object]) -> dict[str, dict[str, object]]:
  """`{"k_scale": a, "v_clip": b}` -> `{"k": {"scale": a}, "v": {"clip": b}}` (None dropped)."""
  out: dict[str, dict[str, object]] = {"k": {}, "v": {}}
  for key, value in flat.items():
    which, _, field = key.partition("_")
    if which not in out or field not in PARAM_FIELDS:
      raise ValueError(f"unknown calibrated parameter {key!r}; expected k_/v_ + one of "
                       f"{PARAM_FIELDS}")
    if value is not None:
      out[which][field] = value
  return out

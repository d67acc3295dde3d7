"""Writing a chunk of new tokens into a cache array in place, as a Pallas TPU kernel.

What it computes: for every sequence b, rows `new[b, t]` go to positions
`lo[b] + t` of layer `layer` of `store`, for the positions in `[lo[b], hi[b])`; every
other position keeps its bytes. Same contract as `reference.ref_cache_write`.

Why a kernel: XLA's TPU backend writes a chunk into a big cache array either by a
scatter, which picks a layout of its own and copies the whole array in and out of it
around every write, or by one dynamic-update-slice per sequence, which keeps the
array in place but makes the compiled step (and its compile time) grow with the
batch, and which XLA rewrites as a conversion of the whole array when it is int2.
This kernel is one call for the whole batch whose output is the input array itself
(`input_output_aliases`): only the tiles the chunk touches travel between HBM and
VMEM, and the program does not grow with B.

Layout and traffic:
  * The store's position axis is either its second-minor axis (values
    `[L, B, K, S, H]`, positions in sublanes) or its minor axis (per-token scales
    `[L, B, K, G, S]`, and values stored transposed, `[L, B, K, H, S]`: positions in
    lanes). A block is one tile of positions of all
    K heads: `tile_rows(dtype)` rows (8 for 32-bit, 16 for 16-bit, 32 for 8-bit,
    64 for 4-bit, 128 for 2-bit values: one native TPU tile of the packed dtype) or
    128 lanes, or all S when S is smaller.
  * Grid `(B, M)` with M the most tiles a chunk of T positions can touch,
    `ceil((T - 1) / tile) + 1`. The layer and `lo`, `hi` are scalar-prefetched. Step
    (b, j) holds tile `lo[b] // tile + j`, clamped to the last tile holding a written
    position: the store's tile is copied in, the written rows replaced by a select,
    and the tile copied back. A clamped step repeats the previous tile index, so
    Pallas neither copies it again nor writes it back in between, and the body is
    skipped. A sequence that writes nothing still visits one tile and writes back its
    own bytes.
  * Paged stores: with a page table the store is a pool of pages of Z positions
    (`[L, P, K, Z, H]`, `[L, P, K, G, Z]`), and tile i of a sequence is tile
    `i % (Z / tile)` of page `table[b, i // (Z / tile)]`: the same grid, with the
    table scalar-prefetched and read by the index map. A slab is the one-page case
    (the table `[[0], [1], ...]`, Z = S).
  * The new rows arrive already placed in tile coordinates (`placed`, built by XLA from
    the chunk: a gather over B x M x tile rows, small next to the cache), so the body
    is a select, with no data-dependent shift in VMEM.

Quantization of the chunk stays outside (`kvtpu.quant`, the one source of what a
stored value means): the chunk is B x T rows, read once either way; the kernel is
about not touching the rest of the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["cache_write", "layout_error", "tile_positions", "tiles_touched", "hbm_bytes", "place_chunk",
           "window_blocks", "window_vmem_bytes", "window_write"]

_LANES = 128
_SUBLANES = 8


def _bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8


def tile_positions(dtype, seq_axis_minor: bool, max_len: int) -> int:
  """Positions per block: one native TPU tile of `dtype` along the position axis (8
  rows at 32 bits, twice as many per halving of the width; 128 lanes when positions
  are the minor axis), or all of `max_len` when it is shorter."""
  tile = _LANES if seq_axis_minor else _SUBLANES * max(1, 32 // _bits(dtype))
  return max_len if max_len <= tile else tile


def layout_error(store_shape, dtype, seq_axis: int) -> str | None:
  """Why `cache_write` cannot write a store of `store_shape` and `dtype` with positions
  on axis `seq_axis`, or None.

  The positions must be whole tiles, or fewer than one tile: an aliased output cannot
  take a partial edge block. int2 values need rows of whole 128-lane tiles: Mosaic
  aborts the process (rather than raising) on the copy of a narrower int2 block.
  """
  if seq_axis not in (3, 4) or len(store_shape) != 5:
    return (f"the Pallas cache write takes [L, B, K, S, H] (seq_axis=3) or [L, B, K, G, S] "
            f"(seq_axis=4) stores, got shape {tuple(store_shape)} with seq_axis={seq_axis}")
  max_len, minor = store_shape[seq_axis], store_shape[-1]
  tile = tile_positions(dtype, seq_axis == 4, max_len)
  if max_len % tile:
    return (f"the Pallas cache write needs max_len a multiple of {tile} (one TPU tile of "
            f"{jnp.dtype(dtype).name} positions) or at most {tile}, got max_len={max_len}")
  if jnp.dtype(dtype) == jnp.int2 and minor % _LANES:
    return (f"the Pallas cache write needs int2 rows of a multiple of {_LANES} lanes (Mosaic "
            f"cannot copy narrower int2 blocks), got a minor dimension of {minor}")
  return None


def tiles_touched(t: int, tile: int, max_len: int) -> int:
  """M: the most tiles a chunk of `t` consecutive positions can touch."""
  if t <= 1:
    return 1
  return min((t + tile - 2) // tile + 1, pl.cdiv(max_len, tile))


def place_chunk(new: jax.Array, lo: jax.Array, tile: int, m: int) -> jax.Array:
  """`new: [B, T, ...]` -> `[B, M * tile, ...]`: row r of sequence b holds the token
  meant for position `(lo[b] // tile) * tile + r` (token index clipped; the kernel's
  mask keeps only rows in `[lo, hi)`)."""
  t = new.shape[1]
  base = jax.lax.div(lo, tile) * tile
  token = base[:, None] + jnp.arange(m * tile, dtype=jnp.int32)[None, :] - lo[:, None]
  index = jnp.clip(token, 0, max(t - 1, 0)).reshape(token.shape + (1,) * (new.ndim - 2))
  return jnp.take_along_axis(new, index, axis=1)


def _carrier(dtype):
  """The dtype the placed rows travel in: the store's, but int8 for int2 and int4 (the
  kernel narrows each tile in VMEM). XLA's TPU layouts of int2 need 16 rows in the
  second-minor axis, which the transposition into tile coordinates does not give; for
  an int4 chunk XLA picks layouts whose copy of the placed rows overflows scoped VMEM
  in a whole model's step (SmolLM2, 64 sequences, bf16 scales)."""
  return jnp.dtype(jnp.int8) if jnp.dtype(dtype) in (jnp.int2, jnp.int4) else jnp.dtype(dtype)


def _tile_range(lo, hi, tile: int, last_tile: int):
  """The first and last tile a sequence's step visits: the tiles holding positions
  `[lo, hi)`, or one tile (its own bytes written back) when it writes nothing."""
  last = jnp.minimum(jax.lax.div(jnp.maximum(hi - 1, lo), tile), last_tile)
  return jnp.minimum(jax.lax.div(lo, tile), last), last


def _kernel(layer_ref, lo_ref, hi_ref, table_ref, placed_ref, old_ref, out_ref, *, tile: int,
            last_tile: int, minor: bool):
  del layer_ref, table_ref
  b, j = pl.program_id(0), pl.program_id(1)
  lo, hi = lo_ref[b], hi_ref[b]
  first, last = _tile_range(lo, hi, tile, last_tile)

  @pl.when(first + j <= last)
  def _():
    index = first + j
    axis = old_ref.ndim - 1 if minor else old_ref.ndim - 2
    pos = index * tile + jax.lax.broadcasted_iota(jnp.int32, old_ref.shape, axis)
    keep = (pos >= lo) & (pos < hi)
    placed = placed_ref[...]
    if placed.dtype != old_ref.dtype:
      placed = placed.astype(old_ref.dtype)
    out_ref[...] = jnp.where(keep, placed, old_ref[...])


@functools.partial(jax.jit, static_argnames=("seq_axis", "interpret"))
def cache_write(store: jax.Array, new: jax.Array, layer, lo: jax.Array, hi: jax.Array, *,
                seq_axis: int, page_table: jax.Array | None = None, interpret=False) -> jax.Array:
  """`store` with `new` written into it.

  The output is the store's buffer (`input_output_aliases`): inside a jit that
  donates the store (a decode step donating its cache) the write is in place; called
  on its own, XLA first copies the store, which the caller still owns.

  Args:
    store: `[L, B, K, S, H]` (`seq_axis=3`) or `[L, B, K, G, S]` (`seq_axis=4`; also
      values stored transposed, `[L, B, K, H, S]`): a slab of S positions per sequence; or, with `page_table`, a pool `[L, P, K, Z,
      H]` / `[L, P, K, G, Z]` of P pages of Z positions.
    new: the chunk `[B, T, K, H]` or `[B, T, K, G]` (token t of sequence b is meant for
      position `lo[b] + t`), converted to the store's dtype (values outside int2's
      range wrap, as `astype` does: callers pass codes already in range).
    layer: int32 scalar, clamped to `[0, L)` (callers pass `hi = lo` to write nothing).
    lo, hi: int32 `[B]`: the positions written are `[lo[b], min(hi[b], lo[b] + T))`,
      with `0 <= lo[b]` and `hi[b]` at most the sequence's capacity (S, or Z times the
      table's width; callers clamp).
    seq_axis: 3 or 4, the store's position axis.
    page_table: None, or int32 `[B, pages_per_sequence]`: position p of sequence b
      lives at offset `p % Z` of page `page_table[b, p // Z]`. Every page holding a
      written position must be the sequence's own (no two sequences share a written
      page). A sequence that writes nothing, or an entry out of `[0, P)`, visits page 0
      and writes back its own bytes there: a pool keeps page 0 as a null page.
    interpret: False on TPU; a `pltpu.InterpretParams` to run in interpret mode.
  """
  if seq_axis not in (3, 4) or store.ndim != 5:
    raise ValueError(f"store must be [L, B, K, S, H] (seq_axis=3) or [L, B, K, G, S] "
                     f"(seq_axis=4), got store.shape={store.shape}, seq_axis={seq_axis}")
  num_layers, rows, kv_heads = store.shape[:3]
  batch = new.shape[0] if new.ndim else 0
  x = store.shape[7 - seq_axis]  # H or G: the non-position minor axis.
  page_len = store.shape[seq_axis]
  expected_b = batch if page_table is not None else rows
  if new.ndim != 4 or (new.shape[0], new.shape[2], new.shape[3]) != (expected_b, kv_heads, x):
    raise ValueError(f"new must be [B={expected_b}, T, K={kv_heads}, {x}], got "
                     f"new.shape={new.shape}")
  paged = page_table is not None
  if not paged:
    page_table = jnp.arange(batch, dtype=jnp.int32)[:, None]  # One page of S per sequence.
  elif (page_table.ndim != 2 or page_table.shape[0] != batch
        or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(f"page_table must be an integer [B={batch}, pages_per_sequence] array, got "
                     f"{jax.typeof(page_table)}")
  error = layout_error(store.shape, store.dtype, seq_axis)
  if error is not None:
    raise ValueError(error)
  t = new.shape[1]
  minor = seq_axis == 4
  tile = tile_positions(store.dtype, minor, page_len)
  capacity = page_table.shape[1] * page_len
  m = tiles_touched(t, tile, capacity)
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(hi.astype(jnp.int32), lo + t)
  carrier = _carrier(store.dtype)
  placed = place_chunk(new.astype(carrier), lo, tile, m)  # [B, M * tile, K, X]
  # To the store's layout: [B, K, M * tile, H] or [B, K, G, M * tile].
  placed = jnp.moveaxis(placed, 1, 3 if minor else 2)
  # [B, K, M, G, tile] or [B, K, M, tile, H]: a block is then the whole of the two minor
  # axes even when a tile is shorter than a TPU tile (pages of fewer positions than 128
  # lanes or 8 sublanes), as Mosaic's blocks need.
  if minor:
    placed = placed.reshape(*placed.shape[:3], m, tile).transpose(0, 1, 3, 2, 4)
  else:
    placed = placed.reshape(placed.shape[0], placed.shape[1], m, tile, placed.shape[3])
  last_tile = pl.cdiv(capacity, tile) - 1
  tiles_per_page = page_len // tile
  pages_per_seq = page_table.shape[1]
  sq = pl.Squeezed()

  def store_index(b, j, layer_ref, lo_ref, hi_ref, table_ref):
    lo_b, hi_b = lo_ref[b], hi_ref[b]
    first, last = _tile_range(lo_b, hi_b, tile, last_tile)
    i = jnp.minimum(first + j, last)  # The tile of the sequence's positions.
    if paged:  # A slab is the sequence's own even when it writes nothing; a page may not be.
      page = table_ref[b * pages_per_seq + jax.lax.div(i, tiles_per_page)]
      page = jnp.where((hi_b > lo_b) & (page >= 0) & (page < rows), page, 0)
      within = jax.lax.rem(i, tiles_per_page)
    else:  # The one-page table, not read: sequence b's slab is row b.
      page, within = b, i
    layer_i = jnp.clip(layer_ref[0], 0, num_layers - 1)
    return (layer_i, page, 0, 0, within) if minor else (layer_i, page, 0, within, 0)

  def placed_index(b, j, layer_ref, lo_ref, hi_ref, table_ref):
    first, last = _tile_range(lo_ref[b], hi_ref[b], tile, last_tile)
    i = jnp.minimum(j, last - first)
    return b, 0, i, 0, 0

  if minor:
    store_block, placed_block = (sq, sq, kv_heads, x, tile), (sq, kv_heads, sq, x, tile)
  else:
    store_block, placed_block = (sq, sq, kv_heads, tile, x), (sq, kv_heads, sq, tile, x)
  store_spec = pl.BlockSpec(store_block, store_index)
  kernel = functools.partial(_kernel, tile=tile, last_tile=last_tile, minor=minor)
  return pl.pallas_call(
      kernel,
      # The output is the store (aliased), varying over the same mesh axes inside a
      # `shard_map`.
      out_shape=jax.ShapeDtypeStruct(store.shape, store.dtype,
                                     manual_axis_type=jax.typeof(store).mat),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, m),
          in_specs=[pl.BlockSpec(placed_block, placed_index), store_spec],
          out_specs=store_spec,
      ),
      input_output_aliases={5: 0},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), lo, hi,
    page_table.astype(jnp.int32).reshape(-1), placed, store)


def hbm_bytes(store_shape, dtype, t: int, lo, hi, *, seq_axis: int,
              pages_per_sequence: int = 1) -> dict[str, int]:
  """Bytes one call moves between HBM and VMEM, for concrete `lo`, `hi` (numpy ints):
  per sequence, each distinct tile visited is read and written back once (store,
  `[K, tile, H]` or `[K, G, tile]` values), and its placed rows read once (int8 for an
  int2 or int4 store, `_carrier`). A paged store (`pages_per_sequence` the page table's width) moves the
  same tiles: its page of Z positions is the slab's unit."""
  import numpy as np  # noqa: PLC0415

  minor = seq_axis == 4
  page_len = store_shape[seq_axis]
  tile = tile_positions(dtype, minor, page_len)
  max_len = page_len * pages_per_sequence
  kv_heads, x = store_shape[2], store_shape[7 - seq_axis]
  tile_bytes = kv_heads * x * tile * _bits(dtype) // 8
  placed_bytes = kv_heads * x * tile * _bits(_carrier(dtype)) // 8
  lo, hi = np.asarray(lo, np.int64), np.minimum(np.asarray(hi, np.int64), np.asarray(lo) + t)
  last = np.minimum(np.maximum(hi - 1, lo) // tile, -(-max_len // tile) - 1)
  tiles = int(np.sum(last - np.minimum(lo // tile, last) + 1))
  return {"store_read": tiles * tile_bytes, "store_written": tiles * tile_bytes,
          "placed_read": tiles * placed_bytes}


def _window_kernel(layer_ref, keep_ref, placed_ref, old_ref, out_ref):
  del layer_ref
  out_ref[...] = jnp.where(keep_ref[...][None] > 0, placed_ref[...], old_ref[...])


# VMEM a window write's blocks may take (double-buffered keep, placed, store and
# output blocks): half of v5e's default scoped VMEM, the smallest of the generations.
WINDOW_VMEM_BUDGET = 8 * 1024 * 1024


def window_vmem_bytes(heads: int, slots: int, head_dim: int, dtype,
                      transposed: bool = False) -> int:
  """VMEM of a window write whose blocks hold `heads` kv heads x `slots` slots: the
  placed, store and output blocks (`[slots, H]`, or `[H, slots]` when `transposed`,
  padded to whole tiles of `tile_positions` rows and 128 lanes) and the keep mask
  (`[slots, 1]` int32, one lane tile per 8 slots; `[1, slots]` when transposed),
  double-buffered."""
  tile = _SUBLANES * max(1, 32 // _bits(dtype))
  rows, lanes = (head_dim, slots) if transposed else (slots, head_dim)
  block = heads * (-(-rows // tile) * tile) * (-(-lanes // _LANES) * _LANES) * _bits(dtype) // 8
  keep = (_SUBLANES * -(-slots // _LANES) * _LANES if transposed
          else -(-slots // _SUBLANES) * _SUBLANES * _LANES) * 4
  return 2 * (3 * block + keep)


def window_blocks(kv_heads: int, width: int, head_dim: int, dtype,
                  budget: int = WINDOW_VMEM_BUDGET,
                  transposed: bool = False) -> tuple[int, int] | None:
  """`(heads, slots)` per block of a window write, or None when no block fits `budget`:
  the whole window of the most kv heads (a divisor of K) that fit; when not even one
  head's does, the largest divisor of W that is a whole number of tiles (`tile_positions`
  rows; 128 lanes for a `transposed` window), so that no block is partial."""
  for heads in sorted((d for d in range(1, kv_heads + 1) if kv_heads % d == 0), reverse=True):
    if window_vmem_bytes(heads, width, head_dim, dtype, transposed) <= budget:
      return heads, width
  tile = _LANES if transposed else _SUBLANES * max(1, 32 // _bits(dtype))
  for slots in range(width - width % tile, 0, -tile):
    if width % slots == 0 and window_vmem_bytes(1, slots, head_dim, dtype, transposed) <= budget:
      return 1, slots
  return None


@functools.partial(jax.jit, static_argnames=("interpret", "budget", "transposed"))
def window_write(store: jax.Array, placed: jax.Array, keep: jax.Array, layer, *,
                 transposed: bool = False, interpret=False,
                 budget: int = WINDOW_VMEM_BUDGET) -> jax.Array:
  """`store` with the slots `keep` selects replaced by `placed`, in place.

  For the unquantized sink and recent windows (`[L, B, K, W, H]`, a few hundred slots
  per sequence): XLA's TPU scatter copies a whole window array into a layout of its
  own and back around every layer's write (temporaries of several times the windows).
  Grid `(B, K / heads, W / slots)` (`window_blocks`: the whole window of as many heads
  as fit `budget` bytes of VMEM, usually all K): a step copies its block of layer
  `layer` into VMEM, selects, and writes it back (the output is the store's buffer,
  `input_output_aliases`). A write reads the layer's window and `placed` and writes the
  window: 3 x B x K x W x H values, besides the `placed` XLA gathers from the chunk.

  Args:
    store: `[L, B, K, W, H]`, or `[L, B, K, H, W]` when `transposed`.
    placed: `[B, K, W, H]` (`[B, K, H, W]`) in the store's dtype: slot w of sequence b's
      new value.
    keep: int32 `[B, W, 1]` (`[B, 1, W]`), nonzero where slot w is written.
    layer: int32 scalar, clamped to `[0, L)`.
    transposed: static; the layout of `store`, `placed` and `keep`.
    interpret: False on TPU; a `pltpu.InterpretParams` to run in interpret mode.
    budget: VMEM bytes the blocks may take (`window_blocks`).
  """
  if store.ndim != 5:
    raise ValueError(f"store must be a window [L, B, K, W, H], got store.shape={store.shape}")
  if transposed:
    num_layers, batch, kv_heads, head_dim, width = store.shape
    minor, keep_shape, what = (head_dim, width), (batch, 1, width), "H={h}, W={w}"
  else:
    num_layers, batch, kv_heads, width, head_dim = store.shape
    minor, keep_shape, what = (width, head_dim), (batch, width, 1), "W={w}, H={h}"
  if placed.shape != (batch, kv_heads, *minor) or placed.dtype != store.dtype:
    raise ValueError(f"placed must be {store.dtype}[B={batch}, K={kv_heads}, "
                     f"{what.format(w=width, h=head_dim)}], got {placed.dtype}{list(placed.shape)}")
  if keep.shape != keep_shape:
    raise ValueError(f"keep must be {list(keep_shape)}, got keep.shape={keep.shape}")
  blocks = window_blocks(kv_heads, width, head_dim, store.dtype, budget, transposed)
  if blocks is None:
    raise ValueError(f"a window of W={width} slots of head_dim={head_dim} ({store.dtype}) has no "
                     f"block within budget={budget} bytes of VMEM: W needs a divisor that is a "
                     "whole number of tiles; write it with XLA's scatter")
  heads, slots = blocks
  sq = pl.Squeezed()
  if transposed:
    block, keep_block = (heads, head_dim, slots), (1, slots)
    at = lambda k, w: (k, 0, w)  # noqa: E731
    keep_at = lambda b, w: (b, 0, w)  # noqa: E731
  else:
    block, keep_block = (heads, slots, head_dim), (slots, 1)
    at = lambda k, w: (k, w, 0)  # noqa: E731
    keep_at = lambda b, w: (b, w, 0)  # noqa: E731
  store_spec = pl.BlockSpec(
      (sq, sq, *block),
      lambda b, k, w, layer_ref: (jnp.clip(layer_ref[0], 0, num_layers - 1), b, *at(k, w)))
  return pl.pallas_call(
      _window_kernel,
      out_shape=jax.ShapeDtypeStruct(store.shape, store.dtype,
                                     manual_axis_type=jax.typeof(store).mat),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, kv_heads // heads, width // slots),
          in_specs=[pl.BlockSpec((sq, *keep_block), lambda b, k, w, layer_ref: keep_at(b, w)),
                    pl.BlockSpec((sq, *block), lambda b, k, w, layer_ref: (b, *at(k, w))),
                    store_spec],
          out_specs=store_spec,
      ),
      input_output_aliases={3: 0},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), keep.astype(jnp.int32),
    placed, store)

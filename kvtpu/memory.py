"""Exact memory accounting for KV caches.

`cache_layout` is the one definition of the arrays a `KVCache` holds (shape and
dtype of each): `KVCache.init` allocates exactly these, and as `ShapeDtypeStruct`s
they let a decode step be compiled ahead of time without allocating a cache. `bytes_per_token` and
`cache_bytes` are closed forms over the same layout, checked against it in tests.

Bytes are the arrays' logical bytes at each dtype's bit width: int4 counts half a
byte per value and int2 a quarter, as TPUs store them (XLA's `memory_analysis` agrees; numpy and
`jax.Array.nbytes` report one byte per int4 or int2 value, which overstates it 2x or 4x).

These are logical bytes. A TPU stores arrays in tiles, so device memory can be
larger: with max_len a multiple of 128 and head_dim 128 an AOT-compiled decode step
on v4/v5e/v5p/v6e holds exactly these bytes for K, V and scales (tests/
test_tpu_compile.py), but max_len=1000 with K=3, head_dim 64 took 2.4 % more on v5e
(tile padding of the S axis). `kvtpu.headroom` with `kvtpu.models.headroom.AotMeasure`
measures what a compiled step really holds (`memory_analysis`) rather than assuming
it here.

The layout itself (which arrays a cache holds, their shapes and dtypes) is
defined once, by `KVCache.layout` over `QuantizedKV.layout` (`kvtpu.qtensor`
documents each array); `cache_layout` returns it here.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from kvtpu._shared import array_nbytes, check_dims, dtype_bits
from kvtpu.cache import COUNTERS, KVCache, check_clip
from kvtpu.formats import KVFormat, LayerPlan, QuantSpec
from kvtpu.qtensor import QuantizedKV

__all__ = ["COUNTERS", "cache_layout", "bytes_per_token", "window_bytes", "fixed_bytes",
           "cache_bytes", "effective_bits", "tpu_layout_copy_bytes", "array_nbytes", "dtype_bits",
           "plan_bytes_per_token", "plan_effective_bits", "plan_cache_bytes"]


def cache_layout(fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
                 max_len: int, head_dim: int, clip=(), page_len: int | None = None,
                 num_pages: int | None = None) -> KVCache:
  """Shapes and dtypes of every array of a cache: a `KVCache` whose arrays are
  `jax.ShapeDtypeStruct`s (absent ones None), `KVCache.layout`.

  `clip` names the dynamic specs ("k", "v") that carry calibrated clip ratios;
  `page_len` and `num_pages` give a paged cache's layout.

  Raises:
    ValueError: for a non-positive dimension, a head_dim that the format's group
      size does not divide, or a clip entry that is not a dynamic spec.
  """
  return KVCache.layout(fmt, num_layers=num_layers, batch=batch, kv_heads=kv_heads,
                        max_len=max_len, head_dim=head_dim, clip=clip, page_len=page_len,
                        num_pages=num_pages)


def _tensor_bytes(spec: QuantSpec, kv_heads: int, head_dim: int, clip: bool = False,
                  sink: int = 0, recent: int = 0) -> tuple[float, float, float]:
  """(bytes per position and sequence, per sequence, fixed) of one tensor of `spec`, per
  layer, read off its layout: arrays with a positions axis grow with tokens, other
  arrays with a batch axis (the windows) with sequences, and the rest (calibrated
  scales, clip ratios) with neither. Exact in bits (int4: half bytes, int2: quarter bytes)."""
  # Any max_len the layout accepts; divided out below.
  positions = QuantizedKV.max_len_multiple(spec)
  layout = QuantizedKV.layout(spec, num_layers=1, batch=1, kv_heads=kv_heads, max_len=positions,
                              head_dim=head_dim, clip=clip, sink=sink, recent=recent)
  axes = jax.tree.leaves(layout.logical_axes(), is_leaf=lambda x: isinstance(x, P))
  per_position = per_sequence = fixed = 0.0
  for arr, names in zip(jax.tree.leaves(layout), axes, strict=True):
    nbytes = math.prod(arr.shape) * dtype_bits(arr.dtype) / 8
    if "positions" in names or "token_groups" in names:
      per_position += nbytes / positions
    elif "batch" in names:
      per_sequence += nbytes
    else:
      fixed += nbytes
  return per_position, per_sequence, fixed


def bytes_per_token(fmt: KVFormat | str, *, kv_heads: int, head_dim: int) -> float:
  """Bytes one token adds to one layer: K and V values plus their per-token scales.

  Exact (a multiple of 0.25 for int2); static scales are per layer, in `fixed_bytes`.
  """
  fmt = KVFormat.parse(fmt)
  check_dims(kv_heads=kv_heads, head_dim=head_dim)
  return sum(_tensor_bytes(spec, kv_heads, head_dim)[0] for spec in (fmt.k, fmt.v))


def window_bytes(fmt: KVFormat | str, *, kv_heads: int, head_dim: int) -> int:
  """Bytes one sequence holds per layer whatever its length: its sink and recent
  windows of K and V (0 without windows)."""
  fmt = KVFormat.parse(fmt)
  check_dims(kv_heads=kv_heads, head_dim=head_dim)
  return math.ceil(sum(_tensor_bytes(spec, kv_heads, head_dim, sink=fmt.sink,
                                     recent=fmt.recent)[1] for spec in (fmt.k, fmt.v)))


def fixed_bytes(fmt: KVFormat | str, *, kv_heads: int, head_dim: int, clip=()) -> int:
  """Bytes per layer that grow with neither tokens nor sequences: static scales, zero
  points, clip ratios (of the dynamic specs named in `clip`), counters."""
  fmt = KVFormat.parse(fmt)
  check_dims(kv_heads=kv_heads, head_dim=head_dim)
  clip = check_clip(fmt, clip)
  tensors = sum(_tensor_bytes(fmt.spec(w), kv_heads, head_dim, clip=w in clip)[2]
                for w in ("k", "v"))
  return len(COUNTERS) * 2 * 4 + math.ceil(tensors)


# lengths (int32) + overflow flag (bool) + error bits (uint8) per sequence.
PER_SEQUENCE_BYTES = 4 + 1 + 1


def cache_bytes(fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
                max_len: int, head_dim: int, clip=(), page_len: int | None = None,
                num_pages: int | None = None) -> int:
  """Total bytes of a cache; equals `KVCache.init(...).nbytes` (`clip`, `page_len` and
  `num_pages` as in `cache_layout`). A paged cache holds `num_pages x page_len`
  positions in its pool, whatever `max_len`, plus a page-table entry (int32) per
  sequence and `max_len / page_len` pages."""
  fmt = KVFormat.parse(fmt)
  check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
              head_dim=head_dim)
  tokens = num_layers * batch * max_len
  table = 0
  if page_len is not None or num_pages is not None:
    check_dims(page_len=page_len, num_pages=num_pages)
    tokens = num_layers * num_pages * page_len
    table = batch * (max_len // page_len) * 4
  # Rounded up per tensor, as each of K and V is its own array: two int4 arrays of an
  # odd number of values take one byte more than the ceiling of their sum.
  return (sum(math.ceil(tokens * _tensor_bytes(spec, kv_heads, head_dim)[0])
              for spec in (fmt.k, fmt.v))
          + num_layers * batch * window_bytes(fmt, kv_heads=kv_heads, head_dim=head_dim)
          + num_layers * fixed_bytes(fmt, kv_heads=kv_heads, head_dim=head_dim, clip=clip)
          + batch * PER_SEQUENCE_BYTES + table)


def tpu_layout_copy_bytes(fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
                          max_len: int, head_dim: int) -> int:
  """Bytes of the temporary copies a compiled TPU step makes of 16-bit per-token scales.

  XLA stores a `[L, B, K, G, S]` scale array with the kv heads in sublanes, while the
  attention kernels read `[G, block_s]` blocks, which need G in sublanes; a 16-bit
  dtype packs sublanes in pairs, so for an odd G the step copies each such array
  (scales; zero points are float32) into a layout padded to an even G and works on
  the copy. Float32 scales need no copy. Observed in the compiled decode steps of
  Llama-3.1-8B on v5e-8 (the copies were 92 % of what the headroom's count missed);
  small steps (a 2-layer model at 32K positions) compile without them, so counting
  the copies is exact at deployment scale and conservative below it.
  """
  fmt = KVFormat.parse(fmt)
  check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
             head_dim=head_dim)
  total = 0
  for spec in (fmt.k, fmt.v):
    if spec.per_token and spec.scale_jnp_dtype.itemsize == 2:
      groups = spec.num_groups(head_dim)
      if groups % 2:
        total += num_layers * batch * kv_heads * (groups + 1) * max_len * 2
  return total


def effective_bits(fmt: KVFormat | str, *, context: int, kv_heads: int, head_dim: int) -> float:
  """Bits per stored K or V value of one sequence at `context` tokens: its values,
  per-token scales and zero points, plus its windows spread over the context (per
  layer; calibrated per-layer parameters, shared by every sequence, are left out).
  bf16 is 16; int4 with float32 per-token scales at head_dim 128 is 4.25."""
  if not isinstance(context, int) or isinstance(context, bool) or context < 1:
    raise ValueError(f"context must be a positive int, got context={context!r}")
  per_token = bytes_per_token(fmt, kv_heads=kv_heads, head_dim=head_dim)
  windows = window_bytes(fmt, kv_heads=kv_heads, head_dim=head_dim)
  return (per_token * context + windows) * 8 / (context * 2 * kv_heads * head_dim)


def plan_bytes_per_token(plan, *, num_layers: int, kv_heads: int, head_dim: int) -> float:
  """Bytes one token adds to all `num_layers` layers of a `LayerPlan` (or plan name):
  the sum of each layer's `bytes_per_token`."""
  plan = LayerPlan.parse(plan)
  check_dims(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
  return sum(bytes_per_token(fmt, kv_heads=kv_heads, head_dim=head_dim) * len(layers)
             for fmt, layers in plan.groups(num_layers))


def plan_effective_bits(plan, *, context: int, num_layers: int, kv_heads: int,
                        head_dim: int) -> float:
  """`effective_bits` of a `LayerPlan` (or plan name): the mean over its layers (each
  layer stores as many values)."""
  plan = LayerPlan.parse(plan)
  check_dims(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
  return sum(effective_bits(fmt, context=context, kv_heads=kv_heads, head_dim=head_dim)
             * len(layers) for fmt, layers in plan.groups(num_layers)) / num_layers


def plan_cache_bytes(plan, *, num_layers: int, batch: int, kv_heads: int, max_len: int,
                     head_dim: int) -> int:
  """Total bytes of a `LayeredKVCache` of `plan`: its groups' `cache_bytes`; equals
  `LayeredKVCache.init(...).nbytes`."""
  plan = LayerPlan.parse(plan)
  check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
             head_dim=head_dim)
  return sum(cache_bytes(fmt, num_layers=len(layers), batch=batch, kv_heads=kv_heads,
                         max_len=max_len, head_dim=head_dim)
             for fmt, layers in plan.groups(num_layers))

"""Sharded KV caches on a (`data`, `model`) mesh.

Batch goes over the `data` axis and kv heads over the `model` axis, so each device
holds a `[L, B/D, K/M, S, H]` block of K and V with the matching blocks of their
scales, and runs the ordinary single-device cache code and Pallas kernels on it
under `jax.shard_map`: no gather, no cross-device traffic except summing the
saturation counters (a few bytes per layer) and, under the `"sequence"` strategy,
merging each layer's attention partials across the model axis.

Kv heads and the model axis (strategies):

* `"heads"`: each `model` device holds K/M kv heads and computes attention for the
  N/M query heads that read them (query head n reads kv head n // (N/K), so
  contiguous blocks line up). Needs K % M == 0.
* `"replicate"`: fewer kv heads than `model` devices, or a count M does not divide
  (SmolLM2's 3 heads on 2 or 4 devices). Every `model` device holds all K heads of
  its batch shard and computes attention for all N query heads (decode attention is
  bound by reading the cache, not by compute). The memory cost is M/ K-sharding's:
  the cache takes K heads per device instead of K/M, which `per_device_bytes`
  (and so the headroom solver) counts.
* `"sequence"` (paged caches): the positions of every sequence are split over the
  `model` axis instead, so the memory stays at 1/M of the cache whatever K (Llama-3.1-
  70B's 8 kv heads on 16 chips). Model device m holds, for every sequence of its
  batch shard and every kv head, the pages of table columns `[m W/M, (m+1) W/M)`
  (positions `[m S/M, (m+1) S/M)`, W the table's width): the pool's pages go over
  both axes, page ids are local to the device's block of the pool (`PageAllocator(...,
  model_shards=M)`, or `CacheSharding.allocator`), and the page table is replicated
  over `model`. A write lands on
  the device holding its position (the others write the null page); `attend` runs
  the kernel over each device's span with its log-sum-exps and combines the partial
  outputs across `model` (`merge_partials`, as a max and two sums of `[B, T, N]`
  and `[B, T, N, H]` per layer). Queries are replicated over `model` (every device
  attends with all N heads). The unquantized windows (sink, recent ring) and open
  key groups are small and replicated; each device reads only the window positions
  inside its span. Positions are split evenly, not tokens: with ragged lengths the
  first devices hold more pages (pools are per device, so size each for its share).

`"auto"` picks `"heads"` when K % M == 0, else `"replicate"` (`"sequence"` is chosen
explicitly: it needs a paged cache and costs the cross-device softmax).

Paged caches (`KVCache.init(..., page_len=, num_pages=)`): the pool's pages go over
the data axis with the sequences, so data shard s holds pages `[s P/D, (s+1) P/D)`
and the page tables of its sequences hold page ids local to that block (its own page
0 the null page): `kvtpu.paging.PageAllocator(..., shards=D)` hands them out. Each
device then runs the single-device paged code on its block, as for slabs.

Partition specs come from the cache's logical axes (`KVCache.logical_axes`, the
same tree as the cache): logical `batch` goes to the data axis D, `kv_heads` to
the model axis M when heads are sharded (else replicated), every other axis is
replicated. So values `[L, B, K, S, H]` (or transposed, `[L, B, K, H, S]`) and
per-token scales `[L, B, K, G, S]` are `P(None, D, M, None, None)` (pools `[L, P, K, Z, H]` likewise, logical `pages` on D;
on (D, M) under `"sequence"`),
static scales `[L, 1|K, 1|H]` and clip ratios `[L, K]`
follow their heads, lengths and overflow flags `P(D)`, and the counters are
replicated (every device holds the global sum). A new array in the cache needs no
change here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvtpu import memory
from kvtpu._shared import add_u64_pair, check_layer, psum_u64, saturating_count
from kvtpu.attention import attend as _attend
from kvtpu.attention import check_query
from kvtpu.cache import KVCache
from kvtpu.formats import KVFormat
from kvtpu.paging import PageAllocator
from kvtpu.qtensor import QuantizedKV

__all__ = ["STRATEGIES", "CacheSharding", "resolve_strategy", "per_device_dims",
           "per_device_bytes"]

STRATEGIES = ("auto", "heads", "replicate", "sequence")


def resolve_strategy(strategy: str, *, kv_heads: int, model: int) -> str:
  """`"auto"` -> `"heads"` if `model` divides `kv_heads`, else `"replicate"`; checks the rest.

  Raises:
    ValueError: for an unknown strategy, or `"heads"` when `model` does not divide
      `kv_heads`.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
  if strategy == "auto":
    return "heads" if kv_heads % model == 0 else "replicate"
  if strategy == "heads" and kv_heads % model:
    raise ValueError(
        f"strategy='heads' shards kv heads over the model axis, but the model axis has "
        f"{model} devices and the cache has kv_heads={kv_heads} (not a multiple): use "
        "strategy='replicate' (or 'auto'), or a model axis that divides kv_heads")
  return strategy


def _check_batch(batch: int, data: int, num_pages: int | None = None, model: int = 1) -> None:
  """`model` > 1: the sequence strategy, pages over both axes."""
  if batch % data:
    raise ValueError(f"batch={batch} must be a multiple of the data axis size {data}: each "
                     "data shard holds batch / data whole sequences")
  shards = data * model
  if num_pages is not None and (num_pages % shards or num_pages // shards < 2):
    what = "data axis size" if model == 1 else "number of devices (data x model)"
    raise ValueError(f"num_pages={num_pages} must be a multiple of the {what} {shards} "
                     "with at least 2 pages per shard: each shard holds num_pages / "
                     f"{shards} pages, its first the null page")


def _check_sequence(strategy: str, *, paged: bool, pages_per_sequence: int | None,
                    model: int) -> None:
  if strategy != "sequence":
    return
  if not paged:
    raise ValueError("strategy='sequence' splits each sequence's pages over the model axis: "
                     "use a paged cache (page_len=, num_pages=)")
  if pages_per_sequence % model:
    raise ValueError(f"strategy='sequence' gives each of the {model} model devices an equal "
                     f"share of a sequence's pages: max_len / page_len={pages_per_sequence} "
                     f"must be a multiple of {model}")


def per_device_dims(*, batch: int, kv_heads: int, data: int, model: int,
                    strategy: str = "auto") -> tuple[int, int]:
  """(sequences, kv heads) one device holds."""
  strategy = resolve_strategy(strategy, kv_heads=kv_heads, model=model)
  _check_batch(batch, data)
  return batch // data, kv_heads // model if strategy == "heads" else kv_heads


def per_device_bytes(fmt: KVFormat | str, *, num_layers: int, batch: int, kv_heads: int,
                     max_len: int, head_dim: int, data: int = 1, model: int = 1,
                     strategy: str = "auto", clip=(), page_len: int | None = None,
                     num_pages: int | None = None) -> int:
  """Bytes of a sharded cache on one device: the block of B/D sequences (and P/D
  pages of a paged cache) and K/M kv heads (all K under `"replicate"`), with the
  per-layer arrays (counters, and static scales and clip ratios of its heads) it holds.
  Under `"sequence"`: P/(D M) pages of all K heads, with the windows and page table
  of its B/D sequences."""
  b, k = per_device_dims(batch=batch, kv_heads=kv_heads, data=data, model=model,
                         strategy=strategy)
  strategy = resolve_strategy(strategy, kv_heads=kv_heads, model=model)
  paged = {}
  if (page_len is None) != (num_pages is None):
    raise ValueError("a paged cache takes both page_len and num_pages, got "
                     f"page_len={page_len!r}, num_pages={num_pages!r}")
  _check_sequence(strategy, paged=num_pages is not None,
                  pages_per_sequence=None if page_len is None else max_len // page_len,
                  model=model)
  if num_pages is not None:
    shards = data * (model if strategy == "sequence" else 1)
    _check_batch(batch, data, num_pages, shards // data)
    paged = dict(page_len=page_len, num_pages=num_pages // shards)
  return memory.cache_bytes(fmt, num_layers=num_layers, batch=b, kv_heads=k, max_len=max_len,
                            head_dim=head_dim, clip=clip, **paged)


@dataclasses.dataclass(frozen=True)
class CacheSharding:
  """How a cache lies on a mesh, and its methods that keep it there.

  Attributes:
    mesh: a mesh with (at least) the two named axes.
    data_axis, model_axis: the axis names for sequences and kv heads.
    strategy: `"auto"`, `"heads"`, `"replicate"` or `"sequence"` (module docstring).

  Use `init` (or `put`) for a cache laid out on the mesh, then inside `jax.jit`:
  `cache = sh.update(cache, layer, k, v)`, `out = sh.attend(q, cache, layer)`, and
  `cache = sh.advance(cache, n)`. Under jit, pass `sh.shardings(cache)` as the
  cache's in/out shardings (and donate it).
  """

  mesh: Mesh
  data_axis: str = "data"
  model_axis: str = "model"
  strategy: str = "auto"

  def __post_init__(self):
    for name in ("data_axis", "model_axis"):
      axis = getattr(self, name)
      if axis not in self.mesh.shape:
        raise ValueError(f"{name}={axis!r} is not an axis of the mesh; its axes are "
                         f"{tuple(self.mesh.shape)}")
    if self.data_axis == self.model_axis:
      raise ValueError(f"data_axis and model_axis must differ, both are {self.data_axis!r}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={self.strategy!r}")

  @property
  def data(self) -> int:
    return self.mesh.shape[self.data_axis]

  @property
  def model(self) -> int:
    return self.mesh.shape[self.model_axis]

  def resolved(self, kv_heads: int) -> str:
    """The strategy used for a cache of `kv_heads` kv heads."""
    return resolve_strategy(self.strategy, kv_heads=kv_heads, model=self.model)

  def _axes(self, kv_heads: int) -> tuple[str, str | None]:
    heads = self.resolved(kv_heads) == "heads"
    return self.data_axis, (self.model_axis if heads else None)

  def _sequence(self, cache: KVCache) -> bool:
    """Whether `cache` is sequence-sharded here (checked to be able to be)."""
    strategy = self.resolved(cache.kv_heads)
    _check_sequence(strategy, paged=cache.paged,
                    pages_per_sequence=None if not cache.paged else cache.page_table.shape[-1],
                    model=self.model)
    return strategy == "sequence"

  def _span(self, cache: KVCache) -> tuple[jax.Array, jax.Array]:
    """Inside the shard_map of a sequence-sharded cache: this device's positions
    `[start, stop)`, as `i32[B]` each."""
    share = cache.max_len // self.model
    start = jax.lax.axis_index(self.model_axis).astype(jnp.int32) * share
    start = jnp.full(cache.lengths.shape, start, jnp.int32)
    return start, start + share

  # ------------------------------------------------------------------ specs
  def specs(self, cache: KVCache) -> KVCache:
    """The cache's `PartitionSpec`s, as a `KVCache` pytree (None fields stay None).

    `cache` may be a real cache or `jax.eval_shape` of one.

    Raises:
      ValueError: when the batch is not a multiple of the data axis, or strategy
        `"heads"` does not fit the kv heads.
    """
    if not isinstance(cache, KVCache):
      raise TypeError(f"CacheSharding shards a KVCache, got {type(cache).__name__} (a "
                      "LayeredKVCache runs unsharded)")
    sequence = self._sequence(cache)
    _check_batch(cache.batch, self.data, cache.num_pages, self.model if sequence else 1)
    d, m = self._axes(cache.kv_heads)
    mesh_axis = {"batch": d, "pages": (d, self.model_axis) if sequence else d, "kv_heads": m}
    return jax.tree.map(lambda axes: P(*(mesh_axis.get(a) for a in axes)),
                        cache.logical_axes(), is_leaf=lambda x: isinstance(x, P))

  def shardings(self, cache: KVCache) -> KVCache:
    """`NamedSharding`s of the cache's arrays (for `jax.jit` in/out shardings)."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.specs(cache),
                        is_leaf=lambda x: isinstance(x, P))

  def put(self, cache: KVCache) -> KVCache:
    """`cache` moved onto the mesh."""
    return jax.device_put(cache, self.shardings(cache))

  def init(self, fmt: KVFormat | str, **kwargs) -> KVCache:
    """`KVCache.init(fmt, **kwargs)` allocated directly in its sharded layout: no
    device ever holds more than its block."""
    # KVCache.init checks static scales and clip ratios only when they are concrete, and
    # under eval_shape and jit they are traced: check them eagerly on a one-sequence,
    # shortest cache first (their shapes do not depend on batch or max_len).
    parsed = KVFormat.parse(fmt)
    shortest = math.lcm(*(QuantizedKV.max_len_multiple(s) for s in (parsed.k, parsed.v)))
    KVCache.init(fmt, **{**kwargs, "batch": 1, "max_len": shortest, "page_len": None,
                         "num_pages": None})
    abstract = jax.eval_shape(functools.partial(KVCache.init, fmt, **kwargs))
    return jax.jit(functools.partial(KVCache.init, fmt, **kwargs),
                   out_shardings=self.shardings(abstract))()

  def allocator(self, cache: KVCache) -> PageAllocator:
    """A `PageAllocator` for this paged cache (real or abstract) as it lies on this
    mesh: a free list per data shard, or per (data, model) block of the pool under
    `"sequence"`; all pages free."""
    sequence = self._sequence(cache)
    if not cache.paged:
      raise ValueError("allocator is for paged caches (init(..., page_len=, num_pages=))")
    _check_batch(cache.batch, self.data, cache.num_pages, self.model if sequence else 1)
    return PageAllocator.for_cache(cache, shards=self.data,
                                   model_shards=self.model if sequence else 1)

  def per_device_bytes(self, cache: KVCache) -> int:
    """`per_device_bytes` for this cache (real or abstract) on this mesh."""
    return per_device_bytes(cache.fmt, num_layers=cache.num_layers, batch=cache.batch,
                            kv_heads=cache.kv_heads, max_len=cache.max_len,
                            head_dim=cache.head_dim, data=self.data, model=self.model,
                            strategy=self.strategy, clip=cache.clip, page_len=cache.page_len,
                            num_pages=cache.num_pages)

  # ---------------------------------------------------------------- methods
  def _shard_map(self, fn, in_specs, out_specs, *, check_vma=True):
    """`jax.shard_map` whose inputs are first placed as `in_specs` say: a no-op for
    inputs already there, a reshard (of activations such as k, v, q) otherwise."""
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=check_vma)

    def call(*args):
      placed = jax.tree.map(self._place, in_specs, args, is_leaf=lambda x: isinstance(x, P))
      return mapped(*placed)

    return call

  def _place(self, spec: P | None, x):
    if spec is None:
      return x
    sharding = NamedSharding(self.mesh, spec)
    if jax.sharding.AxisType.Explicit in self.mesh.axis_types:
      return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)

  def update(self, cache: KVCache, layer, k: jax.Array, v: jax.Array, *,
             valid_len=None) -> KVCache:
    """`cache.update(layer, k, v, valid_len=...)` on each device's block.

    `k`, `v: [B, T, K, H]` (any sharding: they are resharded to the cache's). The
    counters are summed over the devices that hold distinct data.
    """
    check_layer(layer, cache.num_layers)
    cache.check_chunk(k, v)
    valid = _signed_count("valid_len", k.shape[1] if valid_len is None else valid_len,
                          cache.batch, limit=k.shape[1])
    d, m = self._axes(cache.kv_heads)
    specs = self.specs(cache)
    sequence = self._sequence(cache)
    # Devices holding distinct data; under "sequence" each counts its own pages' tokens.
    axes = (d, self.model_axis) if sequence else tuple(a for a in (d, m) if a is not None)

    def local(cache, layer, k, v, valid):
      counters = cache.counters
      new = dataclasses.replace(cache, counters=jnp.zeros_like(counters)).update(
          layer, k, v, valid_len=valid, kv_span=self._span(cache) if sequence else None)
      return dataclasses.replace(new, counters=add_u64_pair(counters,
                                                        psum_u64(new.counters, axes)))

    kv = P(d, None, m, None)
    return self._shard_map(local, (specs, P(), kv, kv, P(d)), specs)(
        cache, jnp.asarray(layer, jnp.int32), k, v, valid)

  def attend(self, q: jax.Array, cache: KVCache, layer, *, valid_len=None,
             scale: float | None = None, impl: str = "auto", precision=None) -> jax.Array:
    """`kvtpu.attend(q, cache, layer, ...)` with each device attending over its block.

    `q: [B, T, N, H]`; the output has q's shape and is sharded like the cache
    (batch over data; query heads over model under `"heads"`).
    """
    check_query(q, cache, layer, impl)
    valid = _signed_count("valid_len", q.shape[1] if valid_len is None else valid_len,
                          cache.batch, limit=q.shape[1])
    d, m = self._axes(cache.kv_heads)
    qs = P(d, None, m, None)

    def local(q, cache, layer, valid):
      return _attend(q, cache, layer, valid_len=valid, scale=scale, impl=impl,
                     precision=precision)

    if self._sequence(cache):
      model = self.model_axis

      def local(q, cache, layer, valid):  # noqa: F811 (the sequence strategy's)
        out, lse = _attend(q.astype(jnp.float32), cache, layer, valid_len=valid, scale=scale,
                           impl=impl, precision=precision, kv_span=self._span(cache),
                           return_lse=True)
        # merge_partials across devices: each span's output weighted by its share of
        # the softmax. A device that sees nothing of a row outputs 0 with weight 0, so
        # a row no device sees stays 0, and a NaN output (a NaN query, whose lse is
        # -inf too) stays NaN (0 * NaN), as unsharded.
        peak = jax.lax.pmax(jnp.where(jnp.isfinite(lse), lse, -jnp.inf), model)
        weight = jnp.exp(lse - jnp.where(jnp.isfinite(peak), peak, 0.0))
        weight = jnp.where(jnp.isneginf(lse), 0.0, weight)
        total = jax.lax.psum(weight, model)
        out = jax.lax.psum(weight[..., None] * out, model)
        out = out / jnp.where(total > 0, total, 1.0)[..., None]
        return jnp.where(jnp.isnan(lse)[..., None], jnp.nan, out).astype(q.dtype)

    # Pallas kernels declare unannotated outputs: no varying-axes check in here (the
    # output is sharded exactly like q, every device computing its own block).
    return self._shard_map(local, (qs, self.specs(cache), P(), P(d)), qs, check_vma=False)(
        q, cache, jnp.asarray(layer, jnp.int32), valid)

  def advance(self, cache: KVCache, num_new) -> KVCache:
    """`cache.advance(num_new)` on each device's sequences."""
    num = _signed_count("num_new", num_new, cache.batch, limit=cache.max_len + 1)
    d, _ = self._axes(cache.kv_heads)
    specs = self.specs(cache)
    return self._shard_map(lambda c, n: c.advance(n), (specs, P(d)), specs)(cache, num)


def _signed_count(name: str, value, batch: int, *, limit: int) -> jax.Array:
  """A count as `i32[B]` in [0, limit] for the per-device call, with a traced negative
  value passed on as -1 so that the per-device cache flags it (`KVCache.errors`)."""
  count, negative = saturating_count(name, value, batch, limit=limit)
  return jnp.where(negative, -1, count)

"""Attention timing over quantized caches: the library side of experiments/kernel_bench.py.

`attention_rows` times `kvtpu.attend` for decode (T = 1) and chunked prefill (T =
chunk) per format, context length and batch on the present backend, and accounts
the HBM bytes each call must move: the kernels' exact account (`hbm_bytes`) under
`impl="pallas"`, else the minimum (each held token's K, V and scales once). On a
known accelerator it reports achieved bandwidth as a fraction of the HBM roofline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu import accelerators, reports
from kvtpu._shared import dtype_bits
from kvtpu.attention import attend
from kvtpu.cache import KVCache
from kvtpu.formats import KVFormat
from kvtpu.paging import PageAllocator
from kvtpu.pallas_kernels.decode_attention import (
  BlockSizes,
  default_block_sizes,
  hbm_bytes,
  min_hbm_bytes,
  validate_inputs,
)
from kvtpu.pallas_kernels.prefill_attention import default_prefill_block_sizes
from kvtpu.qtensor import QuantizedKV

__all__ = ["random_cache", "time_call", "attention_rows", "markdown_table", "traffic_rows",
           "traffic_markdown", "interpreted_hbm_reads", "paged_kernel_comparison"]


def random_cache(fmt: KVFormat | str, *, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 lengths, seed: int = 0, page_len: int | None = None) -> KVCache:
  """A one-layer cache holding `lengths[b]` random tokens per sequence.

  Stored values are drawn directly in the storage dtype (uniform over the integer
  range, or normal for floats) with scales near 1/64, so that large caches are made
  without quantizing on the host; timing does not depend on the values. With
  `page_len`, a paged cache whose pool holds exactly the pages the lengths need
  (given out in order by a `PageAllocator`).
  """
  fmt = KVFormat.parse(fmt)
  if fmt.static:
    raise ValueError(f"random_cache takes dynamic or bf16 formats, got {fmt.name}")
  paged = {}
  if page_len is not None:
    need = sum(-(-int(n) // page_len) for n in np.asarray(lengths))
    paged = dict(page_len=page_len, num_pages=1 + max(need, 1))
  cache = KVCache.init(fmt, num_layers=1, batch=batch, kv_heads=kv_heads, max_len=max_len,
                       head_dim=head_dim, **paged)
  if page_len is not None:
    allocator = PageAllocator.for_cache(cache)
    allocator.reserve_many({b: int(n) for b, n in enumerate(np.asarray(lengths))})
    cache = cache.with_page_table(allocator.table)
  key = jax.random.key(seed)

  def randomized(x: QuantizedKV, key) -> QuantizedKV:
    spec, k1, k2 = x.spec, *jax.random.split(key)
    if spec.dtype.is_int:
      data = jax.random.randint(k1, x.values.shape, int(spec.qmin), int(spec.qmax) + 1,
                                jnp.int32)
    else:
      data = jax.random.normal(k1, x.values.shape, jnp.float32)
    new = {"values": data.astype(spec.storage_dtype)}
    if spec.quantized:  # Per-token scales near 1/64; zero points (if any) stay 0.
      new["scale"] = (jax.random.uniform(k2, x.scale.shape, jnp.float32, 0.5, 1.5)
                      / 64).astype(x.scale.dtype)
    return dataclasses.replace(x, **new)

  key_k, key_v = jax.random.split(key)
  return dataclasses.replace(cache, lengths=jnp.asarray(lengths, jnp.int32),
                             k=randomized(cache.k, key_k), v=randomized(cache.v, key_v))


def time_call(fn: Callable[[], jax.Array], *, iters: int, warmup: int = 1) -> float:
  """Median wall seconds of `fn()` (blocked until ready) over `iters` runs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def traffic_rows(formats, contexts, *, batch: int = 8, head_dim: int = 128, kv_heads: int = 8,
                 q_heads: int = 32, seed: int = 0, page_len: int | None = None) -> list[dict]:
  """The decode kernel's HBM bytes per step vs the minimum and vs bf16 (no execution).

  Two length distributions per context S: every sequence at S ("full"), and lengths
  uniform in [1, S] ("ragged"), where the last block of each sequence is read whole.
  With `page_len`, a paged cache of pages of that many positions (blocks of one page);
  else slabs with the default blocks.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for context in contexts:
    for dist, lengths in (("full", np.full(batch, context - 1)),
                          ("ragged", rng.integers(0, context, size=batch))):
      bf16 = None
      for fmt_name in ["bf16", *[f for f in formats if KVFormat.parse(f).name != "bf16"]]:
        cache = _abstract_cache(fmt_name, batch, kv_heads, context, head_dim, page_len)
        cache = dataclasses.replace(cache, lengths=lengths)
        q = jax.ShapeDtypeStruct((batch, 1, q_heads, head_dim), jnp.float32)
        moved, minimum = _bytes(cache, q, np.ones(batch, np.int32), "pallas")
        bf16 = bf16 or moved
        rows.append(dict(kv_format=KVFormat.parse(fmt_name).name, context=context, batch=batch,
                         head_dim=head_dim, page_len=page_len, lengths=dist, bytes=moved,
                         min_bytes=minimum,
                         over_min=moved / minimum, vs_bf16=moved / bf16))
  return rows


@functools.lru_cache(maxsize=512)
def _abstract_cache(fmt_name: str, batch: int, kv_heads: int, context: int, head_dim: int,
                    page_len: int | None) -> KVCache:
  """The shapes and dtypes of `traffic_rows`'s one-layer cache, traced once per shape (the
  docs' tables call `traffic_rows` for many seeds of the same shapes)."""
  paged = {} if page_len is None else dict(
      page_len=page_len, num_pages=1 + batch * (context // page_len))
  return jax.eval_shape(functools.partial(
      KVCache.init, fmt_name, num_layers=1, batch=batch, kv_heads=kv_heads,
      max_len=context, head_dim=head_dim, **paged))


def traffic_markdown(rows: list[dict]) -> str:
  """The decode kernel's bytes per step per (format, S, lengths), vs the minimum and bf16."""
  return reports.markdown_table(
      ["format", "S", "lengths", "MB per step", "x minimum", "x bf16"],
      [[f"`{r['kv_format']}`", r["context"], r["lengths"], f"{r['bytes'] / 1e6:.2f}",
        f"{r['over_min']:.3f}", f"{r['vs_bf16']:.3f}"] for r in rows])


def _bytes(cache: KVCache, q, chunk: np.ndarray, impl: str) -> tuple[int, int]:
  """(bytes the call moves, minimum bytes) for one attend call on layer 0."""
  k, v = cache.k, cache.v
  read = lambda x, field: getattr(x, field) if x.spec.dynamic else None  # noqa: E731
  groups = (k.token_group or 0, v.token_group or 0)
  logical = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731  (S before H)
  d = validate_inputs(q, logical(k), logical(v), cache.lengths, jnp.asarray(chunk), 0,
                      read(k, "scale"), read(k, "zero"), read(v, "scale"), read(v, "zero"),
                      max_t=None, token_groups=groups, page_table=cache.page_table)
  itemsize = {"k": k.spec.scale_jnp_dtype.itemsize, "v": v.spec.scale_jnp_dtype.itemsize}
  zeros = (read(k, "zero") is not None, read(v, "zero") is not None)
  lengths = np.asarray(cache.lengths)
  minimum = min_hbm_bytes(d, lengths, chunk, cache.k.dtype, cache.v.dtype,
                          scale_itemsize=itemsize, has_zero=zeros,
                          windows=(cache.fmt.sink, cache.fmt.recent))
  if impl != "pallas":
    return minimum, minimum
  if d.t == 1:
    block_t, block_s = 1, default_block_sizes(cache.k.dtype, cache.v.dtype, d.head_dim,
                                              d.group, groups, (d.k_groups, d.v_groups)).block_s
  else:
    blocks = default_prefill_block_sizes(cache.k.dtype, cache.v.dtype, d.head_dim, d.group,
                                         token_groups=groups,
                                         scale_groups=(d.k_groups, d.v_groups))
    block_t, block_s = blocks.resolve(d.t, d.slab)
  block_s = BlockSizes(block_s).resolve(d.slab)
  account = hbm_bytes(d, block_s, lengths, chunk, cache.k.dtype, cache.v.dtype,
                      block_t=block_t, scale_itemsize=itemsize, has_zero=zeros,
                      windows=(cache.fmt.sink, cache.fmt.recent))
  return account["total"], minimum


def attention_rows(formats, contexts, batches, *, head_dim: int = 128, kv_heads: int = 8,
                   q_heads: int = 32, prefill_chunk: int = 512, impl: str = "auto",
                   iters: int = 5, log: Callable[[str], None] | None = None,
                   on_row: Callable[[dict], None] | None = None) -> list[dict]:
  """Times decode and prefill `attend` per (format, context, batch).

  Every sequence holds `context - T` tokens and the T new ones are written, so the
  call reads a full context. Returns one dict per (format, context, batch, phase)
  with seconds, bytes moved and the minimum, achieved GB/s and, on a known chip,
  the fraction of its HBM bandwidth; or `oom: True` when the cache does not fit.
  `on_row(row)` is called as each row is measured.
  """
  resolved = impl if impl != "auto" else ("pallas" if jax.default_backend() == "tpu" else "xla")
  chip = accelerators.from_device(jax.devices()[0])
  rows = []
  for fmt_name in formats:
    fmt = KVFormat.parse(fmt_name)
    for context in contexts:
      for batch in batches:
        for phase, t in (("decode", 1), ("prefill", min(prefill_chunk, context))):
          row = dict(kv_format=fmt.name, context=context, batch=batch, phase=phase, t=t,
                     head_dim=head_dim, kv_heads=kv_heads, q_heads=q_heads, impl=resolved,
                     backend=jax.default_backend(), chip=chip.name if chip else None)
          try:
            cache = random_cache(fmt, batch=batch, kv_heads=kv_heads, max_len=context,
                                 head_dim=head_dim, lengths=np.full(batch, context - t))
            q = jax.random.normal(jax.random.key(1), (batch, t, q_heads, head_dim), jnp.bfloat16)
            step = jax.jit(lambda q, c: attend(q, c, 0, impl=resolved))
            seconds = time_call(functools.partial(step, q, cache), iters=iters)
          except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
              raise
            rows.append({**row, "oom": True})
            if on_row:
              on_row(rows[-1])
            continue
          moved, minimum = _bytes(cache, q, np.full(batch, t), resolved)
          row.update(oom=False, seconds=seconds, bytes=moved, min_bytes=minimum,
                     bytes_over_min=moved / minimum, gb_per_s=moved / seconds / 1e9,
                     roofline_fraction=(moved / seconds / chip.hbm_bandwidth) if chip else None)
          rows.append(row)
          if on_row:
            on_row(row)
          if log:
            log(f"{fmt.name} S={context} B={batch} {phase}: {seconds * 1e3:.3f} ms, "
                f"{row['gb_per_s']:.1f} GB/s")
  return rows


def markdown_table(rows: list[dict]) -> str:
  """One line per measured point; the achieved bandwidth in % of the chip's HBM roofline."""
  body = []
  for r in rows:
    head = [f"`{r['kv_format']}`", r["context"], r["batch"], r["phase"]]
    if r.get("oom"):
      body.append(head + ["OOM", "", "", "", ""])
      continue
    frac = "-" if r["roofline_fraction"] is None else reports.percent(r["roofline_fraction"],
                                                                      "{:.1f}")
    body.append(head + [f"{r['seconds'] * 1e3:.3f}", f"{r['bytes'] / 1e6:.2f}",
                        f"{r['bytes_over_min']:.3f}", f"{r['gb_per_s']:.1f}", frac])
  return reports.markdown_table(["format", "context", "batch", "phase", "ms", "MB moved", "x min",
                                 "GB/s", "roofline (%)"], body)


@contextlib.contextmanager
def interpreted_hbm_reads():
  """Counts the bytes Pallas's TPU interpreter reads from HBM while the block runs:
  block copies of `BlockSpec` inputs and DMAs a kernel starts itself (as JAX's paged
  attention does). Yields `{"blocks": bytes, "dmas": bytes}`.

  Wraps the interpreter's private `get` and `DMA.execute_read` (jax is pinned in
  pyproject.toml, and tests/pallas_kernels checks the kernels' accounts against the
  same hooks); jit caches are cleared around the block, as the hooks are captured when
  the interpreter is traced.
  """
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mi  # noqa: PLC0415

  hbm = mi.TPU_MEMORY_SPACE_IDXS[mi.mosaic_core.MemorySpace.HBM]
  counts = {"blocks": 0, "dmas": 0}
  real_get, real_read = mi.get, mi.DMA.execute_read

  def get(token, device_id, local_core_id, memory_space, *args, input_name=None, **kw):
    token, value = real_get(token, device_id, local_core_id, memory_space, *args,
                            input_name=input_name, **kw)
    if input_name is not None and int(memory_space) == hbm:
      counts["blocks"] += value.size * dtype_bits(value.dtype) // 8
    return token, value

  def execute_read(dma):
    unread = dma.data is None
    real_read(dma)
    if unread and dma.data is not None and dma.src_memory_space == hbm:
      counts["dmas"] += dma.data.size * dtype_bits(dma.data.dtype) // 8

  get.__wrapped__ = real_get.__wrapped__  # What DMA reads call.
  mi.get, mi.DMA.execute_read = get, execute_read
  jax.clear_caches()
  try:
    yield counts
  finally:
    mi.get, mi.DMA.execute_read = real_get, real_read
    jax.clear_caches()


def paged_kernel_comparison(*, context: int = 2048, batch: int = 8, kv_heads: int = 1,
                            q_heads: int = 4, head_dim: int = 128, page_len: int = 64,
                            pages_per_compute_block: int = 4, seed: int = 0) -> list[dict]:
  """Decode bytes read from HBM, measured through the TPU interpreter, of kvtpu's paged
  kernel and JAX's TPU paged-attention kernel (`jax.experimental.pallas.ops.tpu.
  paged_attention`) on the same shapes, pages and lengths (uniform in [1, context]):
  bf16 pages for both, and int8 pages (kvtpu: per-token float32 scales; JAX: its
  `QuantizedTensor` with one float32 scale per token, which it broadcasts to head_dim).

  Returns one row per (kernel, format): bytes read, the minimum (`min_hbm_bytes`: each
  held token's K, V and scale once, queries and outputs once) and the ratio to the
  same kernel's bf16.
  """
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention  # noqa: PLC0415
  from jax.experimental.pallas.ops.tpu.paged_attention.quantization_utils import (  # noqa: PLC0415
    QuantizedTensor,
  )

  from kvtpu.pallas_kernels.decode_attention import decode_attention  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, context + 1, size=batch).astype(np.int32)
  q = jnp.asarray(rng.standard_normal((batch, 1, q_heads, head_dim)), jnp.float32)
  interpret = pltpu.InterpretParams()
  rows, bf16 = [], {}
  for fmt in ("bf16", "int8"):
    # Every sequence holds `lengths` tokens before the step and writes none: chunk 1
    # with the token already counted, as the kernels see a decode step.
    cache = random_cache(fmt, batch=batch, kv_heads=kv_heads, max_len=context,
                         head_dim=head_dim, lengths=lengths - 1, seed=seed, page_len=page_len)
    cache = dataclasses.replace(cache, lengths=jnp.asarray(lengths - 1))
    chunk = np.ones(batch, np.int32)
    _, minimum = _bytes(cache, q, chunk, "xla")
    k, v = cache.k, cache.v
    with interpreted_hbm_reads() as ours:
      jax.block_until_ready(decode_attention(
          q, k, v, cache.lengths, jnp.asarray(chunk), 0, page_table=cache.page_table,
          block_sizes=BlockSizes(page_len), interpret=interpret))
    # JAX's layout: pages [K, P, Z, H]; lengths count the held tokens.
    def jax_pages(x):
      values = jnp.swapaxes(x.relayout(False).values[0], 0, 1)
      if x.scale is None:
        return values
      return QuantizedTensor(values, jnp.swapaxes(x.scale[0], 0, 1)[..., None].reshape(
          kv_heads, -1, page_len, 1).astype(jnp.float32))
    with interpreted_hbm_reads() as theirs, pltpu.force_tpu_interpret_mode(interpret):
      jax.block_until_ready(paged_attention(
          q[:, 0], jax_pages(k), jax_pages(v), jnp.asarray(lengths), cache.page_table,
          pages_per_compute_block=pages_per_compute_block))
    for kernel, counts in (("kvtpu", ours), ("jax paged_attention", theirs)):
      moved = counts["blocks"] + counts["dmas"]
      bf16.setdefault(kernel, moved)
      rows.append(dict(kernel=kernel, kv_format=fmt, context=context, batch=batch,
                       head_dim=head_dim, page_len=page_len, bytes=moved, min_bytes=minimum,
                       over_min=moved / minimum, vs_bf16=moved / bf16[kernel]))
  return rows

"""Attention timing over quantized caches: the library side of experiments/kernel_bench.py.

`attention_rows` times `kvtpu.attend` for decode (T = 1) and chunked prefill (T =
chunk) per format, context length and batch on the present backend, and accounts
the HBM bytes each call must move: the kernels' exact account (`hbm_bytes`) under
`impl="pallas"`, else the minimum (each held token's K, V and scales once). On a
known accelerator it reports achieved bandwidth as a fraction of the HBM roofline.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu import accelerators, reports
from kvtpu.attention import attend
from kvtpu.cache import KVCache
from kvtpu.formats import KVFormat
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
           "traffic_markdown"]


def random_cache(fmt: KVFormat | str, *, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 lengths, seed: int = 0) -> KVCache:
  """A one-layer cache holding `lengths[b]` random tokens per sequence.

  Stored values are drawn directly in the storage dtype (uniform over the integer
  range, or normal for floats) with scales near 1/64, so that large caches are made
  without quantizing on the host; timing does not depend on the values.
  """
  fmt = KVFormat.parse(fmt)
  if fmt.static:
    raise ValueError(f"random_cache takes dynamic or bf16 formats, got {fmt.name}")
  cache = KVCache.init(fmt, num_layers=1, batch=batch, kv_heads=kv_heads, max_len=max_len,
                       head_dim=head_dim)
  key = jax.random.key(seed)

  def randomized(x: QuantizedKV, key) -> QuantizedKV:
    spec, k1, k2 = x.spec, *jax.random.split(key)
    if spec.dtype.is_int:
      data = jax.random.randint(k1, x.shape, int(spec.qmin), int(spec.qmax) + 1, jnp.int32)
    else:
      data = jax.random.normal(k1, x.shape, jnp.float32)
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
                 q_heads: int = 32, seed: int = 0) -> list[dict]:
  """The decode kernel's HBM bytes per step vs the minimum and vs bf16 (no execution).

  Two length distributions per context S: every sequence at S ("full"), and lengths
  uniform in [1, S] ("ragged"), where the last block of each sequence is read whole.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for context in contexts:
    for dist, lengths in (("full", np.full(batch, context - 1)),
                          ("ragged", rng.integers(0, context, size=batch))):
      bf16 = None
      for fmt_name in ["bf16", *[f for f in formats if KVFormat.parse(f).name != "bf16"]]:
        cache = jax.eval_shape(functools.partial(
            KVCache.init, fmt_name, num_layers=1, batch=batch, kv_heads=kv_heads,
            max_len=context, head_dim=head_dim))
        cache = dataclasses.replace(cache, lengths=lengths)
        q = jax.ShapeDtypeStruct((batch, 1, q_heads, head_dim), jnp.float32)
        moved, minimum = _bytes(cache, q, np.ones(batch, np.int32), "pallas")
        bf16 = bf16 or moved
        rows.append(dict(kv_format=KVFormat.parse(fmt_name).name, context=context, batch=batch,
                         lengths=dist, bytes=moved, min_bytes=minimum,
                         over_min=moved / minimum, vs_bf16=moved / bf16))
  return rows


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
  d = validate_inputs(q, k.values, v.values, cache.lengths, jnp.asarray(chunk), 0,
                      read(k, "scale"), read(k, "zero"), read(v, "scale"), read(v, "zero"),
                      max_t=None, token_groups=groups)
  itemsize = {"k": k.spec.scale_jnp_dtype.itemsize, "v": v.spec.scale_jnp_dtype.itemsize}
  zeros = (read(k, "zero") is not None, read(v, "zero") is not None)
  lengths = np.asarray(cache.lengths)
  minimum = min_hbm_bytes(d, lengths, chunk, cache.k.dtype, cache.v.dtype,
                          scale_itemsize=itemsize, has_zero=zeros)
  if impl != "pallas":
    return minimum, minimum
  if d.t == 1:
    block_t, block_s = 1, default_block_sizes(cache.k.dtype, cache.v.dtype, d.head_dim,
                                              d.group, groups).block_s
  else:
    blocks = default_prefill_block_sizes(cache.k.dtype, cache.v.dtype, d.head_dim, d.group,
                                         token_groups=groups)
    block_t, block_s = blocks.resolve(d.t, d.max_len)
  block_s = BlockSizes(block_s).resolve(d.max_len)
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

"""Attention over the quantized cache, with one entry point and several implementations.

`attend(q, cache, layer)` is called after `cache.update(layer, k, v)` (the chunk's
own keys are in the cache) and before `cache.advance`. Query `t` of sequence `b`
sits at position `p = lengths[b] + t` and sees cache positions `s <= p` that hold a
token: causal over the prefix and the chunk, grouped-query (query head `n` reads kv
head `n // G`, G = N / K), softmax in float32.

`impl="xla"` is the reference: it dequantizes the layer to float32 and computes
exact attention with jnp; it is also what later kernels are tested against.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from kvtpu import accelerators
from kvtpu._shared import check_layer, saturating_count
from kvtpu.cache import KVCache
from kvtpu.layered import LayeredKVCache
from kvtpu.pallas_kernels import decode_attention, prefill_attention

__all__ = ["attend", "check_query", "merge_partials", "IMPLS"]

merge_partials = decode_attention.merge_partials

IMPLS = ("auto", "xla", "pallas", "interpret")


def check_query(q: jax.Array, cache: KVCache, layer, impl: str = "auto") -> None:
  """Raises for arguments `attend` cannot take, naming the argument (shapes are the
  global ones, also under `kvtpu.sharding`)."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a kvtpu.KVCache, got {type(cache).__name__}")
  check_layer(layer, cache.num_layers)
  if not isinstance(q, (jax.Array, np.ndarray)):
    raise TypeError(f"q must be a [B, T, N, H] jax or numpy array, got {type(q).__name__}")
  if impl == "pallas" and not isinstance(q, jax.core.Tracer) and any(
      d.platform != "tpu" for d in getattr(q, "devices", lambda: jax.devices()[:1])()):
    raise ValueError("impl='pallas' runs the compiled TPU kernel, but q is on "
                     f"{jax.default_backend()}; use impl='interpret' (the same kernel in "
                     "Pallas interpret mode) or impl='xla' (the reference)")
  if jnp.ndim(q) != 4:
    raise ValueError(f"q must be a [B, T, N, H] array, got q.shape={jnp.shape(q)}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"q must be floating point, got q.dtype={q.dtype}")
  b, t, n, h = q.shape
  if b != cache.batch:
    raise ValueError(f"q.shape[0]={b} does not match the cache's batch={cache.batch}")
  if h != cache.head_dim:
    raise ValueError(f"q.shape[3]={h} does not match the cache's head_dim={cache.head_dim}")
  if n % cache.kv_heads:
    raise ValueError(
        f"q's N={n} query heads must be a multiple of the cache's K={cache.kv_heads} kv heads")
  if t > cache.max_len:
    raise ValueError(f"q has T={t} tokens, more than the cache's max_len={cache.max_len}")


def attend(q: jax.Array, cache: KVCache, layer, *, valid_len=None, scale: float | None = None,
           impl: str = "auto", precision=None, kv_span=None, return_lse: bool = False):
  """Causal grouped-query attention of new queries over one layer of the cache.

  Args:
    q: `[B, T, N, H]` queries (after RoPE) of the chunk written by `update`.
    cache: the cache after `update(layer, ...)` for this chunk, before `advance`; a
      `LayeredKVCache` is read from the layer's group.
    layer: layer index (int, or integer scalar under `lax.scan`: a traced index out
      of range gives NaN outputs, as `update` flags it in the cache's `errors`).
    valid_len: as passed to `update` for ragged chunks: only the first
      `valid_len[b]` chunk tokens are keys and queries; query rows past it are
      padding, and their outputs are 0 (the kernels skip query blocks of padding
      only, reading nothing for them). A traced negative value gives NaN outputs
      for its sequence.
    scale: logit scale; default `1 / sqrt(H)`.
    impl: "xla" (reference, any backend), "pallas" (compiled TPU kernel),
      "interpret" (the kernel in Pallas interpret mode), or "auto" (Pallas on
      TPU, XLA elsewhere).
    precision: the Pallas kernels' matmuls, a `jax.lax.Precision` or its name: HIGH
      (None, the default: f32 operands as two bf16 parts, exact stored values as one;
      2-3 MXU passes, within ~1e-5 of float32), DEFAULT (bf16 operands, one pass:
      logits off by up to 2^-7 of sum |q k|) or HIGHEST (f32). The bounds against a
      float64 reference are in docs/kernels.md. On TPU v2/v3 (no bf16 matmul in their
      Mosaic) None means HIGHEST, and DEFAULT or HIGH is a ValueError. The "xla"
      reference always computes in float32 at HIGHEST.
    kv_span: None (all positions), or `(start, stop)`, integer scalars or `[B]`: sequence b
      attends only to positions in `[start[b], stop[b])`, windows included (the
      kernels neither read nor compute blocks outside). Attention over disjoint spans
      (a sequence-sharded cache's devices) combines with `merge_partials`.
    return_lse: also return each row's log-sum-exp of its scaled logits, `[B, T, N]`
      float32 (-inf for a row that sees no position).

  Returns:
    `[B, T, N, H]` in `q.dtype`, and the log-sum-exps if `return_lse`.

  Raises:
    ValueError, TypeError, IndexError: for mismatched shapes or dtypes, N not a
      multiple of K, a bad layer or impl.
    ValueError: for impl="pallas" on a TPU generation whose Mosaic compiler rejects
      the format (`kernel_support_error`: int4 on v2/v3, int2 on v2-v4 and at head_dim
      64 unless stored transposed); "auto" falls back to XLA there and logs it once.
      impl="pallas" with q on a non-TPU device is a ValueError that names the other
      impls; ahead-of-time compiles for TPU topologies (traced q) work from any host.
  """
  if isinstance(cache, LayeredKVCache):  # The layer's group, a KVCache of one format.
    group, index = cache.group_of(layer)
    return attend(q, group, index, valid_len=valid_len, scale=scale, impl=impl,
                  precision=precision, kv_span=kv_span, return_lse=return_lse)
  check_query(q, cache, layer, impl)
  span = decode_attention.check_span(kv_span, cache.batch, scalars=True)
  impl = _resolve_impl(impl, cache.fmt, cache.head_dim, (cache.k.transposed, cache.v.transposed))
  precision = _resolve_precision(precision, impl)
  chunk, bad, scale = _chunk_and_scale(q, cache, layer, valid_len, scale)
  if impl == "xla":
    out = _reference(q, cache, layer, chunk, scale, span, return_lse)
  else:
    interpret = pltpu.InterpretParams() if impl == "interpret" else False
    out = _pallas_attention(q, cache, layer, chunk, scale, interpret=interpret,
                            precision=precision, span=span, return_lse=return_lse)
  if return_lse:
    return _nan_where(bad, out[0]), _nan_where(bad, out[1])
  return _nan_where(bad, out)


def _nan_where(bad: jax.Array | None, out: jax.Array) -> jax.Array:
  """`out` (`[B, ...]`) with the sequences flagged in `bad` (None: none) set to NaN."""
  if bad is None:
    return out
  return jnp.where(bad.reshape(-1, *(1,) * (out.ndim - 1)), jnp.nan, out).astype(out.dtype)


def _chunk_and_scale(q, cache: KVCache, layer, valid_len, scale):
  """`i32[B]` chunk tokens that are keys (valid_len capped at T); `bool[B]` sequences
  whose traced arguments were out of range (None when every argument was checked);
  the logit scale."""
  b, t, _, h = q.shape
  chunk, negative = saturating_count("valid_len", t if valid_len is None else valid_len, b,
                                     limit=t)
  bad = None
  if isinstance(layer, jax.core.Tracer) or isinstance(valid_len, jax.core.Tracer):
    layer = jnp.asarray(layer)
    bad = negative | (layer < 0) | (layer >= cache.num_layers)
  return chunk, bad, h**-0.5 if scale is None else scale


# (TPU generation, storage dtype) pairs whose kernels Mosaic rejects, found by compiling
# every format for every generation ahead of time (tests/pallas_kernels): v2 and v3
# have no layout for sub-byte (int4, int2) operands, and v4 none for int2 (its compiler
# aborts the process on the int2 unpack instead of raising). v5e, v5p and v6e compile
# every format (int2 in rows of whole 128 lanes: `decode_attention.layout_error`).
_UNSUPPORTED = {(gen, dtype) for gen in ("v2", "v3") for dtype in ("int4", "int2")} | {
    ("v4", "int2")}
_fallbacks_logged: set[tuple[str, str, str]] = set()  # (device kind, format, reason)


def kernel_support_error(device_kind: str, fmt, head_dim: int | None = None,
                         transposed: tuple[bool, bool] = (False, False)) -> str | None:
  """Why the Pallas kernels cannot compile `fmt` (at `head_dim`, if given; K and V values
  stored `transposed` or not, `kvtpu.qtensor.lanes_transposed`) for this device, or None
  if they can."""
  gen = accelerators.chip_name(device_kind)
  bad = sorted({s.dtype.value for s in (fmt.k, fmt.v) if (gen, s.dtype.value) in _UNSUPPORTED})
  if not bad:
    if head_dim is None:
      return None
    return decode_attention.layout_error(fmt.k.storage_dtype, fmt.v.storage_dtype, head_dim,
                                         transposed)
  return (f"the Pallas attention kernels cannot compile KV format {fmt.name} for TPU {gen}: "
          f"Mosaic has no operand layout for {', '.join(bad)} on {gen}; use impl='xla' or "
          "an int8/fp8 format")


def _resolve_impl(impl: str, fmt, head_dim: int,
                  transposed: tuple[bool, bool] = (False, False)) -> str:
  """"auto" -> "pallas" on TPU (unless unsupported there: "xla", logged once), else "xla"."""
  on_tpu = jax.default_backend() == "tpu"
  if impl not in ("auto", "pallas") or not on_tpu:
    return "xla" if impl == "auto" else impl
  kind = jax.devices()[0].device_kind
  error = kernel_support_error(kind, fmt, head_dim, transposed)
  if error is None:
    return "pallas"
  if impl == "pallas":
    raise ValueError(error)
  if (kind, fmt.name, error) not in _fallbacks_logged:  # Once per layout and head_dim too.
    _fallbacks_logged.add((kind, fmt.name, error))
    logging.warning("kvtpu.attend(impl='auto') uses the XLA reference: %s", error)
  return "xla"


# TPU generations whose Mosaic compiler lowers no bf16 matmul (found by compiling the
# kernels ahead of time): the kernels multiply in f32 there.
_F32_MATMUL_ONLY = ("v2", "v3")


def _resolve_precision(precision, impl: str):
  """The kernels' precision (`decode_attention.check_precision`) for the present TPU:
  None -> HIGH, or HIGHEST on `_F32_MATMUL_ONLY` generations, where an explicit DEFAULT
  or HIGH raises."""
  checked = decode_attention.check_precision(precision)
  if impl != "pallas" or jax.default_backend() != "tpu":
    return checked
  gen = accelerators.chip_name(jax.devices()[0].device_kind)
  if gen not in _F32_MATMUL_ONLY or checked == jax.lax.Precision.HIGHEST:
    return checked
  if precision is None:
    return jax.lax.Precision.HIGHEST
  raise ValueError(f"precision={precision!r} needs bf16 matmuls, which the Mosaic compiler "
                   f"of TPU {gen} does not lower; use precision='highest' (or None)")


def _pallas_attention(q, cache: KVCache, layer, chunk, scale, *, interpret, precision,
                      span=None, return_lse: bool = False):
  """`attend` through a Pallas kernel: decode for T <= 8, chunked prefill above.

  The kernels read per-token and token-grouped scales; static (calibrated) scales are
  folded around them by the tensors themselves (`QuantizedKV.scale_queries`,
  `scale_output`).
  """
  b, t, n, h = q.shape
  kh = cache.kv_heads
  qg = cache.k.scale_queries(q.astype(jnp.float32).reshape(b, t, kh, n // kh, h) * scale, layer)
  kernel = (decode_attention.decode_attention if t <= decode_attention.MAX_DECODE_T
            else prefill_attention.prefill_attention)
  out = kernel(qg.reshape(b, t, n, h), cache.k.kernel_operand, cache.v.kernel_operand,
               cache.lengths, chunk, layer, page_table=cache.page_table, precision=precision,
               kv_span=span, return_lse=return_lse, interpret=interpret)
  out, lse = out if return_lse else (out, None)
  # Row t of sequence b sees keys iff it is a chunk token (it sees itself); padding
  # rows are 0.
  has_keys = (jnp.arange(t)[None, :] < chunk[:, None])[:, :, None, None, None]
  out = cache.v.scale_output(out.reshape(b, t, kh, n // kh, h), layer, has_keys)
  out = out.reshape(b, t, n, h).astype(q.dtype)
  return out if lse is None else (out, lse)


def reference_attention(q: jax.Array, cache: KVCache, layer, *, valid_len=None,
                        scale: float | None = None) -> jax.Array:
  """The XLA reference of `attend` (float32 throughout, highest matmul precision)."""
  check_query(q, cache, layer, "xla")
  chunk, bad, scale = _chunk_and_scale(q, cache, layer, valid_len, scale)
  out = _reference(q, cache, layer, chunk, scale, None, False)
  return _nan_where(bad, out)


@functools.partial(jax.jit, static_argnums=6)
def _reference(q: jax.Array, cache: KVCache, layer, chunk: jax.Array, scale, span,
               return_lse: bool):
  """`reference_attention` after validation, jitted so that eager calls compile once."""
  held = jnp.minimum(cache.lengths + chunk, cache.max_len)
  out = decode_attention.masked_attention(
      q.astype(jnp.float32) * scale, cache.dequantized(layer, "k", held=held),
      cache.dequantized(layer, "v", held=held), cache.lengths, chunk, span=span,
      return_lse=return_lse)
  if return_lse:
    return out[0].astype(q.dtype), out[1]
  return out.astype(q.dtype)

"""Decode attention over a quantized KV cache, as a Pallas TPU kernel.

What it computes: for each sequence b and kv head, the first `chunk[b]` of the T (<= 8)
new queries of all G query heads that share the kv head attend to the cache positions
they may see (causal within the chunk, up to `lengths[b] + chunk[b]`), with an f32
online softmax over KV blocks; the other rows are padding, returned as 0. Same
contract as `reference.ref_decode_attention`.

Layout and traffic:
  * Grid `(B, K, S / block_s)`, the last axis sequential. Per (b, kv head) the cache
    is a contiguous `[S, H]` slab of the `[L, B, K, S, H]` array, so each block is
    one DMA of `block_s * H` stored values (int4 at half a byte, int2 at a quarter:
    XLA and Mosaic pack sub-byte integers), and its per-token scales a separate
    `[G, block_s]` copy of the `[L, B, K, G, S]` scale array: never broadcast to H.
  * The layer index, lengths and chunk sizes are scalar-prefetched. The KV index map
    clamps the block index to the last block a sequence needs, so blocks past its
    length repeat the previous block index: Pallas skips the copy, and the body is
    skipped by `pl.when`. Each needed block is read from HBM exactly once.
  * Quantized values are converted to f32 in VMEM. A single per-token scale is applied
    where it is cheapest, with the token axis in lanes: the key scale multiplies the
    logits `[TG, block_s]` and the value scale the probabilities, so the stored values
    enter the matmuls as they are (exact in bf16: integers, fp8). Grouped per-token
    scales (G > 1 groups along H) and zero points are expanded to `[block_s, H]` in
    VMEM (their `[1, block_s]` rows transposed to token columns, each channel its
    group's) and dequantize the block, so each segment costs one matmul for the
    logits and one for the output whatever G. Zero points are subtracted in VMEM:
    folding them into the dots instead, as `q.k - z * sum(q)`, cancels
    catastrophically in f32 when z is large.
  * Matmul precision (`precision`, f32 accumulation throughout): HIGH (default) splits
    each f32 operand (queries, probabilities, dequantized blocks) into bf16 high and
    low parts, `a_hi b_hi + a_lo b_hi + a_hi b_lo`, and drops the last pass when the
    block's values are exactly bf16 (`exact`): 2 MXU passes for int8/int4/int2/fp8/
    bf16 caches, 3 otherwise, against 6 for f32 at HIGHEST. DEFAULT rounds both
    operands to bf16 (one pass). Error budget against float64 attention over the same
    cached values, per output row, u = 2^-8, A_i = |q| . |k_i|: logits within
    D = (c + (H + 8) 2^-24) max_i A_i, outputs within (exp(2 D) - 1) (max v - min v) / 2
    + (c + (S + 8) 2^-24) max |v|, with c = 3 u^2 at HIGH and 2 u + u^2 at DEFAULT
    (tests/pallas_kernels/test_precision.py). Segments whose width is not a whole
    number of (16, 128) bf16 tiles (short windows, a cache under 16 positions)
    multiply in f32.
  * A non-uniform code (`codes`: a codebook the stored integers index) is decoded in
    VMEM right after the conversion to f32, by a chain of selects (`decode_codes`:
    3 per value at 2 bits, 15 at 4), before the zero point and scales apply.
  * Per-channel scales over groups of N positions (a token-grouped tensor, scales
    `[L, B, K, S / N, H]`): the block's `[block_s / N, H]` scales (and zero points)
    follow its data block, and dequantize the block in VMEM, each row of N positions
    its group's (broadcast over the N rows); the logits and outputs then need no
    scale. A group never straddles two blocks: block_s is a multiple of 8 N, so that
    the scale block is whole sublane tiles (or the full S).
  * head_dim is handled natively (the block's last dim is the full H). Values stored
    transposed (`k_transposed`, `v_transposed`: `[L, B, K, H, S]`, a cache's layout
    where H is not a multiple of 128, `kvtpu.qtensor.lanes_transposed`) are read as
    `[H, block_s]` blocks, positions in lanes: whole tiles in HBM and VMEM at H = 64,
    where `[block_s, 64]` rows would fill half of each, and the layout XLA keeps such
    arrays in, so no copy of the cache is made around the call. The logits are then
    `q [TG, H] . k [H, bs]` and the output `p [TG, bs] . v [H, bs]^T`; per-token scales
    (positions in lanes either way) broadcast over the block's rows.
  * Unquantized windows (`reference.unpack_windows`, `reference.Window`): the sink and
    ring of a (b, kv head), `[slots, H]` or `[H, slots]` (`window_transposed`; the first
    W_s / W_r slots hold the window, the rest are masked), are two more blocks whose index does not change
    along the grid's query and KV axes, so each is copied once per (b, kv head). At
    the first KV step they enter the online softmax as two more segments (each ring
    slot's position computed from the sequence's length), and the quantized blocks
    mask the positions the windows hold.

Limits: T <= 8; block_s a multiple of 128 or the full S; int2 storage needs head_dim
a multiple of 128 or values stored transposed (`layout_error`); transposed values take
per-token scales, not token-grouped ones. Static (per tensor / head / channel) scales are
folded into q and the output by the caller (`kvtpu.attend`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from kvtpu.pallas_kernels.decode_attention.reference import (
  MAX_DECODE_T,
  Dims,
  check_span,
  decode_codes,
  logical,
  unpack_codes,
  unpack_operands,
  unpack_token_groups,
  unpack_transposed,
  unpack_windows,
  validate_inputs,
  validate_windows,
  window_slots,
)

__all__ = ["BlockSizes", "DEFAULT_VMEM_BUDGET", "decode_attention", "default_block_sizes",
           "vmem_estimate_bytes", "token_block_multiple", "token_block_error",
           "hbm_bytes", "min_hbm_bytes", "attention_call", "layout_error", "check_precision",
           "check_span", "merge_partials"]

_LANES = 128
_SUBLANES = 8


def check_precision(precision) -> jax.lax.Precision:
  """The kernels' matmul precision (`jax.lax.Precision` or its names): DEFAULT (bf16
  operands, one MXU pass), HIGH (the default, None: bf16 high and low parts of the f32
  operands, 2 passes where the cache's values are exactly bf16, else 3) or HIGHEST
  (f32 operands). Accumulation is f32 in all three. Raises ValueError otherwise."""
  if precision is None:
    return jax.lax.Precision.HIGH
  try:
    return jax.lax.Precision(precision)
  except (ValueError, TypeError):
    raise ValueError("precision must be None, a jax.lax.Precision or one of 'default', "
                     f"'high', 'highest', got precision={precision!r}") from None


def merge_partials(outs, lses):
  """Attention over the union of disjoint spans from the calls over each span
  (`kv_span`, `return_lse=True`): `outs` `[D, B, T, N, H]` and `lses` `[D, B, T, N]`
  (stacked, or sequences of arrays) -> `[B, T, N, H]`, each part weighted by its share
  `exp(lse_d - logsumexp_d lse_d)` of the softmax; rows no part sees are 0."""
  outs, lses = jnp.asarray(outs), jnp.asarray(lses)
  total = jax.scipy.special.logsumexp(lses, axis=0)  # -inf where no part sees a position.
  total = jnp.where(jnp.isfinite(total), total, 0.0)[None]
  weights = jnp.where(jnp.isfinite(lses), jnp.exp(lses - total), 0.0)
  return jnp.sum(weights[..., None] * outs, axis=0)


def layout_error(k_dtype, v_dtype, head_dim: int,
                 transposed: tuple[bool, bool] = (False, False),
                 block_s: int | None = None) -> str | None:
  """Why Mosaic cannot copy these cache blocks into VMEM, or None if it can.

  int2 blocks need whole 128-lane rows: Mosaic (libtpu 0.0.52) aborts the process,
  rather than raising, when it lowers the copy of an int2 `[block_s, H]` block with
  H = 64. Values stored transposed, `[H, block_s]`, have block_s lanes: `block_s`
  (None: a multiple of 128, as `kvtpu.qtensor.lanes_transposed`'s slabs and their
  default blocks are). The wrappers check this at trace time.
  """
  narrow = []
  for name, dt, t in (("k", k_dtype, transposed[0]), ("v", v_dtype, transposed[1])):
    lanes = (block_s or _LANES) if t else head_dim
    if jnp.dtype(dt) == jnp.int2 and lanes % _LANES:
      narrow.append((name, "block_s" if t else "head_dim", lanes))
  if not narrow:
    return None
  reasons = []
  for what, lanes in dict.fromkeys((w, n) for _, w, n in narrow):
    names = "/".join(name for name, w, _ in narrow if w == what).upper()
    reasons.append(f"int2 {names} blocks need {what} a multiple of {_LANES} in the Pallas "
                   f"kernels (Mosaic cannot copy int2 rows of {lanes} lanes), got "
                   f"{what}={lanes}")
  return "; ".join(reasons) + "; use impl='xla' or an int4/int8 format for this model"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the KV axis.

  Attributes:
    block_s: cache positions per block; a multiple of 128 (the lane width: the
      scale blocks put S in lanes), or any value >= S (one block of the full S).
  """

  block_s: int

  def __post_init__(self):
    if not isinstance(self.block_s, int) or self.block_s < 1:
      raise ValueError(f"block_s must be a positive int, got block_s={self.block_s!r}")

  def resolve(self, max_len: int) -> int:
    """The block actually used for a cache of `max_len` positions (validated)."""
    if self.block_s >= max_len:
      return max_len
    if self.block_s % _LANES:
      raise ValueError(
          f"block_s={self.block_s} must be a multiple of {_LANES} when smaller than "
          f"max_len={max_len}")
    return self.block_s


# Default block per (storage bits, head_dim): the largest power of two with at most
# 256 KiB of K+V, so the per-block overhead (~0.35 us per grid step) stays small
# against the DMA time while double-buffered blocks fit every generation's scoped
# VMEM, and the block divides any power-of-two max_len (no partial edge block). A rule,
# not a table tuned on hardware: `kvtpu.experiments.kernel_bench` measures the
# alternatives on a TPU.
_DEFAULT_BLOCK_BYTES = 256 * 1024


# The VMEM a default block (decode, and prefill's) may take by `vmem_estimate_bytes`
# (which counts four f32 logit-sized temporaries): v5e's default scoped VMEM, the
# smallest of the generations.
DEFAULT_VMEM_BUDGET = 16 * 1024 * 1024


def default_block_sizes(k_dtype, v_dtype, head_dim: int, group: int = 1,
                        token_groups: tuple[int, int] = (0, 0),
                        scale_groups: tuple[int, int] = (1, 1)) -> BlockSizes:
  """The block of the rule above, halved (down to 128 positions) while a decode step of
  `MAX_DECODE_T` tokens x `group` query heads per kv head would not fit the VMEM budget
  (only at large G: the logits grow with T x G x block_s); then raised to a multiple of
  `token_block_multiple` for token-grouped scales (`token_groups`: positions per
  per-channel scale of K and V, 0 for none). `scale_groups`: per-token scale groups of
  K and V (`Dims.k_groups`, `v_groups`)."""
  per_token = head_dim * (_bits(k_dtype) + _bits(v_dtype)) / 8
  block = max(_LANES, min(2 ** int(math.floor(math.log2(_DEFAULT_BLOCK_BYTES / per_token))), 4096))
  d = Dims(num_layers=1, batch=1, t=MAX_DECODE_T, q_heads=group, kv_heads=1, max_len=block,
           head_dim=head_dim, k_groups=scale_groups[0], v_groups=scale_groups[1])
  while block > _LANES and vmem_estimate_bytes(d, block, k_dtype, v_dtype) > DEFAULT_VMEM_BUDGET:
    block //= 2
  return BlockSizes(math.lcm(block, *(token_block_multiple(n) for n in token_groups)))


def token_block_multiple(token_group: int) -> int:
  """What block_s must be a multiple of (unless it covers all of S) for per-channel
  scales over groups of `token_group` positions: whole groups per block, and their
  `[block_s / N, H]` scale block whole 8-row sublane tiles (1 without such scales)."""
  return _SUBLANES * token_group if token_group else 1


def token_block_error(d: Dims, block_s: int) -> str | None:
  """Why `block_s` cannot tile the call's pages or token-grouped scales, or None."""
  if d.page_len and d.page_len % block_s:
    return (f"block_s={block_s} must divide the page of Z={d.page_len} positions (a block "
            "never straddles two pages)")
  for name, n in (("k", d.k_token_group), ("v", d.v_token_group)):
    if n and block_s < d.slab and block_s % token_block_multiple(n):
      what = f"Z={d.page_len} positions of a page" if d.page_len else f"S={d.max_len} positions"
      return (f"block_s={block_s} must be a multiple of {token_block_multiple(n)} (8 groups of "
              f"{name.upper()}'s {n}-position scales, whole sublane tiles) or cover all "
              f"{what}")
  return None


def transposed_block_error(transposed: tuple[bool, bool], block_s: int, d: Dims) -> str | None:
  """Why `block_s` cannot tile values stored positions-minor (`[H, block_s]` blocks: whole
  128-lane tiles, or the whole slab), or None."""
  for name, t, n in (("k", transposed[0], d.k_token_group), ("v", transposed[1], d.v_token_group)):
    if t and n:
      return (f"{name.upper()} has per-channel scales over token groups, whose [S / N, H] layout "
              f"follows [S, H] values: {name}_transposed must be False")
  if any(transposed) and block_s % _LANES and block_s != d.slab:
    return (f"block_s={block_s} must be a multiple of {_LANES} (positions in lanes) or cover all "
            f"{d.slab} positions of a slab for values stored transposed")
  return None


def _bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8


def vmem_estimate_bytes(d: Dims, block_s: int, k_dtype, v_dtype, scale_dtype=jnp.float32,
                        window_positions: int = 0, window_itemsize: int = 2) -> int:
  """VMEM the kernel uses: double-buffered input blocks (windows: `window_positions`
  sink and ring slots of K and V), output, scratch."""
  tg = d.t * d.group
  kv = block_s * d.head_dim * (_bits(k_dtype) + _bits(v_dtype)) // 8
  scale_bytes = jnp.dtype(scale_dtype).itemsize
  per_position = d.k_groups + d.v_groups + sum(
      d.head_dim / n for n in (d.k_token_group, d.v_token_group) if n)
  scales = int(block_s * per_position) * scale_bytes * 2  # scales + zeros (at most)
  q_out = 2 * tg * d.head_dim * 4
  scratch = tg * (d.head_dim + 2) * 4
  # Logits and probabilities; per K and V block: its f32 values and their bf16 high
  # and low parts, and with grouped scales the zero-point and scale expansions and
  # the products (fitted to what Mosaic reports for v5e: int4-asym-g16's 2048-position
  # block takes 16.9 MiB).
  temps = 4 * tg * block_s * 4 + block_s * d.head_dim * sum(
      8 + (24 if groups > 1 else 0) for groups in (d.k_groups, d.v_groups))
  windows = 2 * window_positions * d.head_dim * window_itemsize
  temps = max(temps, 4 * tg * window_positions * 4 + 2 * window_positions * d.head_dim * 4)
  return 2 * (kv + scales + q_out + windows) + scratch + temps


def hbm_bytes(d: Dims, block_s: int, lengths, chunk, k_dtype, v_dtype, *,
              block_t: int | None = None, scale_itemsize: dict[str, int] | None = None,
              has_zero=(False, False), windows=(0, 0), window_itemsize: int = 2,
              span=None) -> dict[str, int]:
  """Bytes a kernel call moves between HBM and VMEM, for concrete lengths and chunks.

  Derived from the grid, the block specs and the skip logic: a block is copied when
  its block index differs from the previous grid step's. Per (b, kv head), the live
  query blocks are j = 0 .. ceil(chunk / block_t) - 1 (at least block 0); the others
  hold padding only and copy nothing. Live block j's KV index map visits blocks
  `0..last_j` with `last_j = max(0, ceil(end_j / block_s) - 1)`, `end_j =
  min(lengths + min((j + 1) * block_t, chunk), S)` (0 when chunk is 0; with a recent
  window of W_r, at most `max(min(lengths + chunk, S) - W_r, W_s)`): `last_j + 1`
  copies, one fewer when the previous query block ended on block 0 too. Each KV copy
  moves its K and V blocks and their scale (and zero point) blocks; the edge block
  of an S that `block_s` does not divide is counted whole. The windows' blocks keep
  their index along the query and KV axes: each is copied once per (b, kv head);
  queries are read and outputs written once per live query block.

  Args:
    d: the call's `Dims`.
    block_s, block_t: the tiling (block_t defaults to T: the decode kernel).
    lengths, chunk: `[B]` host arrays.
    k_dtype, v_dtype: storage dtypes.
    scale_itemsize: bytes per scale (and zero point) for "k" and "v" (default 4).
    has_zero: whether K and V have per-token zero points.
    windows: `(W_s, W_r)` sink and ring sizes in positions (0: none), each read whole as
      its `window_slots` (as a cache stores them); window_itemsize: their bytes per
      value.
    span: None, or `(start, stop)` `[B]` host arrays (`decode_attention`'s `kv_span`):
      the visits run from block `start // block_s` (at most `last_j`) and `end_j` is at
      most `stop`.

  Returns:
    `{"kv": ..., "scales": ..., "windows": ..., "q": ..., "out": ..., "total": ...}` in
    bytes.
  """

  block_t = d.t if block_t is None else block_t
  scale_itemsize = scale_itemsize or {"k": 4, "v": 4}
  lengths, chunk = np.asarray(lengths), np.asarray(chunk)
  num_q_blocks = -(-d.t // block_t)
  j = np.arange(num_q_blocks)[None, :]
  end = np.minimum(lengths[:, None] + np.minimum((j + 1) * block_t, chunk[:, None]), d.max_len)
  if windows[1]:  # Positions the recent window holds are not read from the store.
    held = np.minimum(lengths + chunk, d.max_len)[:, None]
    end = np.minimum(end, np.maximum(held - windows[1], windows[0]))
  end = np.where(chunk[:, None] > 0, end, 0)
  start = np.zeros_like(lengths)
  if span is not None:
    start = np.maximum(np.asarray(span[0]), 0)
    end = np.minimum(end, np.asarray(span[1])[:, None])
  last = np.maximum(-(-end // block_s) - 1, 0)  # [B, J]
  first = np.minimum(start[:, None] // block_s, last)  # [B, J]
  live = (j == 0) | (j * block_t < chunk[:, None])  # [B, J]
  copies = (np.where(live, last - first + 1, 0).sum(axis=1)
            - ((last[:, :-1] == first[:, 1:]) & live[:, 1:]).sum(axis=1))  # [B]
  kv_copies = int(copies.sum()) * d.kv_heads
  kv = kv_copies * block_s * d.head_dim * (_bits(k_dtype) + _bits(v_dtype)) // 8
  scales = 0
  for name, groups, zero in (("k", d.k_groups, has_zero[0]), ("v", d.v_groups, has_zero[1])):
    scales += kv_copies * block_s * groups * scale_itemsize[name] * (2 if zero else 1)
  for name, n, zero in (("k", d.k_token_group, has_zero[0]), ("v", d.v_token_group, has_zero[1])):
    if n:  # The [block_s / N, H] per-channel scales of the block's groups.
      scales += kv_copies * -(-block_s // n) * d.head_dim * scale_itemsize[name] * (
          2 if zero else 1)
  rows = block_t * d.group
  q = int(live.sum()) * d.kv_heads * rows * d.head_dim * 4
  out = q
  slots = sum(window_slots(w) for w in windows)
  win = d.batch * d.kv_heads * slots * d.head_dim * window_itemsize * 2  # K and V.
  return {"kv": kv, "scales": scales, "windows": win, "q": q, "out": out,
          "total": kv + scales + win + q + out}


def min_hbm_bytes(d: Dims, lengths, chunk, k_dtype, v_dtype, *,
                  scale_itemsize: dict[str, int] | None = None, has_zero=(False, False),
                  windows=(0, 0), window_itemsize: int = 2) -> int:
  """The least any kernel must move: K, V and scales of each token a query sees, once,
  at the precision it is stored in (a position the sink or recent window holds at the
  window's, `windows = (W_s, W_r)`), plus each query row read and its output written
  once (float32, as the kernels take them). A sequence whose chunk is 0 has no queries
  and needs nothing."""
  scale_itemsize = scale_itemsize or {"k": 4, "v": 4}
  lengths, chunk = np.asarray(lengths), np.asarray(chunk)
  held = np.where(chunk > 0, np.minimum(lengths + chunk, d.max_len), 0)
  sink, recent = windows
  in_windows = np.minimum(held, sink) + np.minimum(np.maximum(held - sink, 0), recent)
  per_token = d.head_dim * (_bits(k_dtype) + _bits(v_dtype)) / 8
  for name, groups, zero in (("k", d.k_groups, has_zero[0]), ("v", d.v_groups, has_zero[1])):
    per_token += groups * scale_itemsize[name] * (2 if zero else 1)
  for name, n, zero in (("k", d.k_token_group, has_zero[0]), ("v", d.v_token_group, has_zero[1])):
    if n:  # A group's per-channel scales, shared by its N positions.
      per_token += d.head_dim * scale_itemsize[name] * (2 if zero else 1) / n
  kv = (int((held - in_windows).sum()) * per_token
        + int(in_windows.sum()) * 2 * d.head_dim * window_itemsize) * d.kv_heads
  rows = int(np.minimum(chunk, d.t).sum()) * d.group * d.kv_heads
  return int(kv) + 2 * rows * d.head_dim * 4


def exact(dtype, *, codes=None, zero=False, groups=0, token_group=0) -> bool:
  """Whether a cache block's matmul operand is exactly bf16 in the kernel: stored values
  of at most 8 significant bits (integers, fp8, bf16; non-uniform codes whose levels
  are bf16) used as stored, scaled afterwards (at most one per-token scale, no zero
  point, no per-channel or grouped scales)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32 or zero or groups > 1 or token_group:
    return False
  return codes is None or all(float(np.float32(c).astype(jnp.bfloat16)) == c for c in codes)


def _live(chunk, j, block_t: int):
  """Whether query block j holds a row of the chunk (block 0 always runs)."""
  return (j == 0) | (j * block_t < chunk)


def _last_live(chunk, block_t: int):
  """The last query block that `_live` runs."""
  return jnp.maximum(jax.lax.div(chunk + block_t - 1, block_t) - 1, 0)


def _block_end(length, chunk, j, block_t: int, max_len: int, sink: int = 0, recent: int = 0):
  """Query block j reads the quantized store at positions `< block_end`: what its last
  row sees, less what the recent window holds (the sequence's last `recent` positions
  after the chunk, none below the sink); 0 for a chunk of no rows (nothing is read)."""
  end = jnp.minimum(length + jnp.minimum((j + 1) * block_t, chunk), max_len)
  if recent:
    held = jnp.minimum(length + chunk, max_len)
    end = jnp.minimum(end, jnp.maximum(held - recent, sink))
  return jnp.where(chunk > 0, end, 0)


def _kernel(layer_ref, lengths_ref, chunk_ref, table_ref, start_ref, stop_ref, q_ref, k_ref, v_ref,
            *rest, d: Dims, block_t: int, block_s: int, k_zero: bool, v_zero: bool, sink: int,
            recent: int, precision: jax.lax.Precision, lse: bool, k_codes=None, v_codes=None,
            transposed: tuple[bool, bool] = (False, False), window_layouts=None,
            spanned: bool = True):
  del layer_ref, table_ref  # Used by the index maps only.
  refs = list(rest)
  ks_ref = refs.pop(0) if d.k_groups or d.k_token_group else None
  kz_ref = refs.pop(0) if k_zero else None
  vs_ref = refs.pop(0) if d.v_groups or d.v_token_group else None
  vz_ref = refs.pop(0) if v_zero else None
  sink_refs = (refs.pop(0), refs.pop(0)) if sink else None
  recent_refs = (refs.pop(0), refs.pop(0)) if recent else None
  o_ref, lse_ref = refs.pop(0), (refs.pop(0) if lse else None)
  m_ref, l_ref, acc_ref = refs
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  num_blocks = pl.num_programs(3)
  length, chunk = lengths_ref[b], chunk_ref[b]
  # The span of positions this call reads (every position when the call has no span:
  # its refs are then never read).
  start, stop = (start_ref[b], stop_ref[b]) if spanned else (0, d.max_len)
  end = jnp.minimum(length + chunk, d.max_len)  # Positions < end hold tokens.
  # The store blocks this query block reads hold positions < block_end.
  block_end = jnp.minimum(_block_end(length, chunk, j, block_t, d.max_len, sink, recent), stop)

  def in_span(pos):
    return (pos >= start) & (pos < stop)
  live = _live(chunk, j, block_t)  # A block of padding rows only is skipped whole.
  tg, h = block_t * d.group, d.head_dim
  k_exact, v_exact = (
      exact(x_ref.dtype, codes=codes, zero=zero, groups=groups, token_group=n)
      for x_ref, codes, zero, groups, n in ((k_ref, k_codes, k_zero, d.k_groups, d.k_token_group),
                                            (v_ref, v_codes, v_zero, d.v_groups, d.v_token_group)))

  def matmul(a, b_, *, transpose_b=False, b_exact=False, f32=False):
    """`a [M, H] . b [H, N]` (`b [N, H]` if transpose_b) with f32 accumulation. DEFAULT:
    operands rounded to bf16, one MXU pass. HIGH: each f32 operand split into bf16
    high and low parts, `a_hi b_hi + a_lo b_hi + a_hi b_lo`, the last pass skipped when
    `b` is exactly bf16 (`b_exact`: stored integers, fp8, bf16). HIGHEST (or `f32`):
    f32."""
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    if f32 or precision == jax.lax.Precision.HIGHEST:
      return jax.lax.dot_general(a.astype(jnp.float32), b_.astype(jnp.float32), dims,
                                 precision=jax.lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32)

    def dot(x, y):
      return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)

    def split(x):
      hi = x.astype(jnp.bfloat16)
      return hi, (x.astype(jnp.float32) - hi.astype(jnp.float32)).astype(jnp.bfloat16)

    a_hi, a_lo = split(a)
    b_hi = b_.astype(jnp.bfloat16)
    if precision == jax.lax.Precision.DEFAULT:
      return dot(a_hi, b_hi)
    out = dot(a_hi, b_hi) + dot(a_lo, b_hi)
    if not b_exact:
      out = out + dot(a_hi, split(b_)[1])
    return out

  # Positions the quantized store is read for: [sink, quant_end); the windows hold the rest.
  quant_end = jnp.maximum(end - recent, sink) if recent else end

  def query_limit(width):
    """`[TG, width]`: the last position each row's query token sees (-1: padding)."""
    # lax.div (truncating) rather than //: Mosaic lowers floor division through sign,
    # which needs the present device to be a TPU; all operands here are >= 0.
    t = j * block_t + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (tg, width), 0), d.group)
    return jnp.where(t < chunk, length + t, -1)

  def softmax_step(logits, mask):
    """Online-softmax update of the running max and sum by one segment's `[TG, W]`
    logits (only `mask` counts); returns its probabilities and the factor `alpha`
    that rescales the accumulated output."""
    logits = jnp.where(mask, logits, -jnp.inf)
    m_prev = m_ref[...]  # [TG, 1]
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.where(mask, jnp.exp(logits - m_safe), 0.0)
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    return p, alpha

  def window(refs, pos, held, transposed: bool):
    """One window's segment of the online softmax: `refs` its K and V `[W, H]` (`[H, W]`
    when `transposed`) of W slots, `pos` `[1, W]` the position of each slot, `held`
    `[1, W]` whether the slot holds one of them."""
    kw_ref, vw_ref = refs
    width = pos.shape[1]
    # Mosaic lowers bf16 matmuls over whole (16, 128) tiles only: other widths in f32
    # (a window is at most a few hundred positions).
    f32 = width % (_LANES if transposed else 2 * _SUBLANES) != 0
    logits = matmul(q_ref[...], kw_ref[...], transpose_b=not transposed,
                    b_exact=exact(kw_ref.dtype), f32=f32)
    mask = held & (pos <= query_limit(width)) & in_span(pos)  # [TG, W]
    p, alpha = softmax_step(logits, mask)
    if transposed:
      v = jnp.where(held, vw_ref[...].astype(jnp.float32), 0.0)  # Unheld slots: NaN-safe.
    else:
      # [1, W] -> [W, 1] (Mosaic transposes whole (8, 128) tiles, so broadcast first).
      held_col = jnp.transpose(jnp.broadcast_to(held.astype(jnp.float32), (8, width)))[:, :1]
      v = jnp.where(held_col > 0, vw_ref[...].astype(jnp.float32), 0.0)
    acc_ref[...] = alpha * acc_ref[...] + matmul(p, v, transpose_b=transposed,
                                                 b_exact=exact(vw_ref.dtype), f32=f32)

  @pl.when((i == 0) & live)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    if sink:
      slots, t = window_layouts["sink"]
      slot = jax.lax.broadcasted_iota(jnp.int32, (1, slots), 1)
      window(sink_refs, slot, (slot < sink) & (slot < end), t)
    if recent:
      slots, t = window_layouts["recent"]
      slot = jax.lax.broadcasted_iota(jnp.int32, (1, slots), 1)
      # The ring's slot of position p is p mod W_r; its positions are [end - W_r, end).
      # lax.rem of non-negative operands (see t below); slots past W_r hold nothing.
      pos = end - recent + jax.lax.rem(slot - jax.lax.rem(end, recent) + recent, recent)
      window(recent_refs, pos, (slot < recent) & (pos >= sink) & (pos >= 0), t)

  @pl.when((i * block_s < block_end) & ((i + 1) * block_s > start) & live)
  def _block():
    q = q_ref[...].astype(jnp.float32)  # [TG, H]
    k_t, v_t = transposed

    def per_token(ref, groups, t: bool):
      """`[G, bs]` per-token rows (scales or zero points) -> `[bs, H]` (`[H, bs]` for a
      transposed block), each channel its group's."""
      z = ref[...].astype(jnp.float32)
      if t:  # Positions in lanes already: each channel's row is its group's row.
        if groups == 1:
          return jnp.broadcast_to(z[0:1, :], (h, block_s))
        chan = jax.lax.broadcasted_iota(jnp.int32, (h, 1), 0)
        out = jnp.zeros((h, block_s), jnp.float32)
        width = h // groups
        for g in range(groups):
          out = out + jnp.where((chan >= g * width) & (chan < (g + 1) * width), z[g:g + 1, :], 0.0)
        return out
      chan = jax.lax.broadcasted_iota(jnp.int32, (1, h), 1)
      out = jnp.zeros((block_s, h), jnp.float32)
      for g in range(groups):
        # [1, bs] -> [bs, 1]: Mosaic transposes whole (8, 128) tiles, so broadcast first.
        col = jnp.transpose(jnp.broadcast_to(z[g:g + 1, :], (8, block_s)))[:, :1]
        if groups == 1:
          return out + col
        width = h // groups
        out = out + jnp.where((chan >= g * width) & (chan < (g + 1) * width), col, 0.0)
      return out

    def per_channel(x, s_ref, z_ref, n):
      """`[bs, H]` stored values -> `(x - zero) * scale` with the block's `[bs / n, H]`
      per-channel scales, each row of n positions its group's."""
      def rows(ref):
        p = ref[...].astype(jnp.float32)
        return jnp.broadcast_to(p[:, None, :], (block_s // n, n, h)).reshape(block_s, h)
      if z_ref is not None:
        x = x - rows(z_ref)
      return x * rows(s_ref)

    def dequantize(x_ref, codes, token_group, s_ref, z_ref, groups, t):
      """The block's `[bs, H]` (transposed: `[H, bs]`) values in VMEM, in f32: decoded,
      less their zero points, times their scales unless one per token (`groups == 1`:
      applied to the logits or probabilities instead, leaving the stored values exact in
      bf16)."""
      x = x_ref[...].astype(jnp.float32)
      if codes is not None:
        x = decode_codes(x, codes)
      if token_group:
        return per_channel(x, s_ref, z_ref, token_group)
      if z_ref is not None:
        x = x - per_token(z_ref, groups, t)
      if groups > 1:
        x = x * per_token(s_ref, groups, t)
      return x

    k = dequantize(k_ref, k_codes, d.k_token_group, ks_ref, kz_ref, d.k_groups, k_t)
    pos = i * block_s + jax.lax.broadcasted_iota(jnp.int32, (tg, block_s), 1)
    mask = (pos <= query_limit(block_s)) & (pos < quant_end) & in_span(pos)  # [TG, bs]
    if sink:
      mask = mask & (pos >= sink)
    f32 = block_s % (2 * _SUBLANES) != 0  # See `window`.
    # [TG, H] . [H, bs] (a transposed block as it is, a [bs, H] block transposed).
    logits = matmul(q, k, transpose_b=not k_t, b_exact=k_exact, f32=f32)  # [TG, bs]
    if d.k_groups == 1:
      logits = logits * ks_ref[...].astype(jnp.float32)  # [1, bs]
    p, alpha = softmax_step(logits, mask)

    # Positions the store is not read for may hold NaN (unwritten, or an open group's
    # unwritten scales): zero them (0 * NaN would poison the sum).
    shape, axis = ((h, block_s), 1) if v_t else ((block_s, h), 0)
    row = i * block_s + jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    held = (row < quant_end) & in_span(row)
    if sink:
      held = held & (row >= sink)
    v = jnp.where(held, dequantize(v_ref, v_codes, d.v_token_group, vs_ref, vz_ref, d.v_groups,
                                   v_t), 0.0)
    if d.v_groups == 1:
      p = jnp.where(mask, p * vs_ref[...].astype(jnp.float32), 0.0)
    # [TG, bs] . [bs, H] (a transposed block [H, bs] transposed).
    acc_ref[...] = alpha * acc_ref[...] + matmul(p, v, transpose_b=v_t, b_exact=v_exact, f32=f32)

  @pl.when((i == num_blocks - 1) & live)
  def _finish():
    denom = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)
    if lse:  # log sum exp of the row's logits over the span; -inf where it saw none.
      lse_ref[...] = jnp.where(denom > 0, m_ref[...] + jnp.log(jnp.where(denom > 0, denom, 1.0)),
                               -jnp.inf)


@functools.partial(jax.jit, static_argnames=("k_codes", "v_codes", "k_token_group",
                                             "v_token_group", "k_transposed", "v_transposed",
                                             "block_sizes", "precision", "return_lse",
                                             "interpret"))
def decode_attention(q, k, v, lengths, chunk, layer, *, k_scale=None, k_zero=None,
                     v_scale=None, v_zero=None, k_sink=None, v_sink=None, k_recent=None,
                     v_recent=None, k_codes=None, v_codes=None, k_token_group=None,
                     v_token_group=None, k_transposed=None, v_transposed=None,
                     page_table=None, block_sizes: BlockSizes | None = None,
                     precision=None, kv_span=None, return_lse: bool = False,
                     interpret=False):
  """Decode attention over one layer of a quantized cache (see module docstring).

  Args:
    q: `[B, T, N, H]` queries, T <= 8, already multiplied by the softmax scale
      (and by any static key scale).
    k, v: `[L, B, K, S, H]` caches in f32, bf16, int8, int4, int2, fp8 e4m3 or e5m2, or
      quantized tensors carrying their scales (`unpack_operands`).
    lengths: `i32[B]` tokens held before the chunk.
    chunk: `i32[B]` tokens of the chunk written to the cache (0..T).
    layer: integer scalar: which layer of `k`, `v` and the scales to read.
    k_scale, v_scale: per-token scales `[L, B, K, G, S]` (G groups along H), per-channel
      scales `[L, B, K, S / N, H]` with `k_token_group` / `v_token_group` N, or None.
    k_zero, v_zero: zero points shaped like the scales, or None.
    k_sink, v_sink, k_recent, v_recent: unquantized windows, each a `reference.Window`
      or a plain `[L, B, K, W, H]` array of exactly W positions (`reference
      .unpack_windows`), or None; carried by quantized `k`, `v` too.
    k_codes, v_codes: static codebooks of non-uniform codes (`reference.unpack_codes`),
      or None; carried by quantized `k`, `v` too.
    k_token_group, v_token_group: static positions per per-channel scale
      (`reference.unpack_token_groups`), or None; carried by quantized `k`, `v` too.
    k_transposed, v_transposed: static; True when the values are stored positions-minor,
      `[L, B, K, H, S]` (`reference.unpack_transposed`); carried by quantized `k`, `v`
      too.
    page_table: None, or int32 `[B, pages_per_sequence]` for a paged cache: `k`, `v`
      and their scales are then pools `[L, P, K, Z, H]` (`[L, P, K, G, Z]`, ...) and
      position p of sequence b is at offset `p % Z` of page `page_table[b, p // Z]`;
      entries a sequence does not need (past its length) may be anything.
    block_sizes: KV tiling; default from `default_block_sizes` (with token-grouped
      scales a multiple of `token_block_multiple` or all of S), at most one page.
    precision: the matmuls' operands (`check_precision`; error budgets in the module
      docstring): `Precision.HIGH` (None) splits f32 operands into two bf16 parts,
      `DEFAULT` rounds them to bf16 (one MXU pass), `HIGHEST` keeps them f32.
    kv_span: None (every position), or `(start, stop)`, int32 `[B]` each: sequence b
      attends only to cache positions in `[start[b], stop[b])` (windows included), and
      blocks outside the span are neither copied nor computed. Attention over a
      sequence split into disjoint spans (other devices' pages, or several cores) is
      `merge_partials` of the calls' outputs and log-sum-exps.
    return_lse: also return each row's log-sum-exp of its logits over the span,
      `[B, T, N]` float32 (-inf for rows that see no position: padding, an empty span).
    interpret: False on TPU; a `pltpu.InterpretParams` to run in interpret mode.

  Returns:
    `[B, T, N, H]` float32, and the log-sum-exps if `return_lse`.
  """
  windows = unpack_windows(k, v, k_sink, v_sink, k_recent, v_recent)
  codes = unpack_codes(k, v, k_codes, v_codes)
  token_groups = unpack_token_groups(k, v, k_token_group, v_token_group)
  transposed = unpack_transposed(k, v, k_transposed, v_transposed)
  k, v, k_scale, k_zero, v_scale, v_zero = unpack_operands(k, v, k_scale, k_zero, v_scale, v_zero)
  k_shape, v_shape = logical(k, transposed[0], "k"), logical(v, transposed[1], "v")
  d = validate_inputs(q, k_shape, v_shape, lengths, chunk,
                      layer, k_scale, k_zero, v_scale, v_zero, token_groups=token_groups,
                      page_table=page_table)
  validate_windows(d, *windows)
  if block_sizes is None:
    block_sizes = default_block_sizes(k.dtype, v.dtype, d.head_dim, d.group, token_groups,
                                      (d.k_groups, d.v_groups))
  return attention_call(d, q, k, v, lengths, chunk, layer, k_scale, k_zero, v_scale, v_zero,
                        block_t=d.t, block_s=block_sizes.resolve(d.slab),
                        precision=precision, interpret=interpret, windows=windows, codes=codes,
                        page_table=page_table, span=kv_span, lse=return_lse,
                        transposed=transposed)


def attention_call(d: Dims, q, k, v, lengths, chunk, layer, k_scale, k_zero, v_scale, v_zero,
                   *, block_t: int, block_s: int, interpret, windows=(None,) * 4,
                   codes=(None, None), page_table=None,
                   precision=None, span=None, lse: bool = False,
                   transposed: tuple[bool, bool] = (False, False)):
  """The pallas_call shared by decode (one query block of all T) and prefill.

  Grid `(B, K, ceil(T / block_t), ceil(S / block_s))`; query block j holds tokens
  `[j * block_t, (j + 1) * block_t)` of all G heads of a kv head (`block_t * G` rows).
  `windows`: `(k_sink, v_sink, k_recent, v_recent)`, validated, or Nones; `codes`:
  `(k_codes, v_codes)` from `unpack_codes`; `page_table`: as `decode_attention`'s;
  `precision`, `span`, `lse`: `decode_attention`'s `precision`, `kv_span` and
  `return_lse`, checked here (`check_precision`, `check_span`); `transposed`: whether
  `k`, `v` are stored `[L, B, K, H, S]` (`reference.unpack_transposed`).

  KV block i of sequence b is block `i % (Z / block_s)` of page `table[b, i // (Z /
  block_s)]`, the table scalar-prefetched; a contiguous cache is the one-page case (the
  table `[[0], [1], ...]`, Z = S, its edge block possibly partial).
  """
  error = (layout_error(k.dtype, v.dtype, d.head_dim, transposed, block_s)
           or token_block_error(d, block_s) or transposed_block_error(transposed, block_s, d))
  if error is not None:
    raise ValueError(error)
  precision, span = check_precision(precision), check_span(span, d.batch)
  bs = block_s
  blocks_per_page = pl.cdiv(d.slab, bs)
  windows_len = tuple(0 if w is None else w.size for w in (windows[0], windows[2]))
  # Static: without a span or a page table the index maps read neither (on a TPU, fewer
  # scalar loads per grid step; in interpret mode, fewer host callbacks).
  spanned, paged = span is not None, page_table is not None
  if page_table is None:
    page_table = jnp.arange(d.batch, dtype=jnp.int32)[:, None]
  pages_per_seq = page_table.shape[1]
  num_q_blocks, num_kv_blocks = pl.cdiv(d.t, block_t), pages_per_seq * blocks_per_page
  rows = block_t * d.group
  start, stop = ((jnp.zeros(d.batch, jnp.int32), jnp.full(d.batch, d.max_len, jnp.int32))
                 if span is None else (jnp.asarray(x, jnp.int32) for x in span))
  # [B, T, N, H] -> [B, K, T*G, H]: the G heads of a kv head and the T tokens share a pass.
  qk = q.astype(jnp.float32).reshape(d.batch, d.t, d.kv_heads, d.group, d.head_dim)
  qk = qk.transpose(0, 2, 1, 3, 4).reshape(d.batch, d.kv_heads, d.t * d.group, d.head_dim)

  def q_block(b, h, j, i, layer_ref, lengths_ref, chunk_ref, table_ref, *_):
    """(b, h, query block): blocks of padding only repeat the last live one (no copy)."""
    if num_q_blocks == 1:  # Block 0 always runs (`_live`): nothing to read.
      return b, h, 0, 0
    chunk_b = chunk_ref[b]
    return b, h, jnp.where(_live(chunk_b, j, block_t), j, _last_live(chunk_b, block_t)), 0

  def kv_block(b, h, j, i, layer_ref, lengths_ref, chunk_ref, table_ref, start_ref, stop_ref):
    """(layer, page, h, block within the page): blocks before the span repeat its first
    one, blocks past what query block j sees (or past the span) repeat the last one, and
    a query block of padding only stays on the last live block's last one (no copy); a
    table entry outside the pool reads page 0."""
    length, chunk_b = lengths_ref[b], chunk_ref[b]
    live = _live(chunk_b, j, block_t)
    j = jnp.where(live, j, _last_live(chunk_b, block_t))
    end = _block_end(length, chunk_b, j, block_t, d.max_len, *windows_len)
    if spanned:
      end = jnp.minimum(end, stop_ref[b])
    last = jnp.maximum(jax.lax.div(end + bs - 1, bs) - 1, 0)  # end >= 0: see _kernel's query_limit.
    if spanned:
      first = jnp.minimum(jax.lax.div(jnp.maximum(start_ref[b], 0), bs), last)
      block = jnp.where(live, jnp.minimum(jnp.maximum(i, first), last), last)
    else:
      block = jnp.where(live, jnp.minimum(i, last), last)
    if not paged:  # The one-page table: sequence b is page b.
      return layer_ref[0], b, h, block
    page = table_ref[b * pages_per_seq + jax.lax.div(block, blocks_per_page)]
    page = jnp.where((page >= 0) & (page < d.rows), page, 0)
    return layer_ref[0], page, h, jax.lax.rem(block, blocks_per_page)

  def kv_block_minor(*args):
    """`kv_block` for blocks whose positions are the minor axis: `(..., 0, block)`."""
    layer_i, page, h, block = kv_block(*args)  # Read once (each read is a scalar load).
    return layer_i, page, h, 0, block

  sq = pl.Squeezed()
  q_spec = pl.BlockSpec((sq, sq, rows, d.head_dim), q_block)

  def kv_spec(transposed: bool):
    """A K or V block: `[bs, H]`, or `[H, bs]` of values stored positions-minor."""
    if transposed:
      return pl.BlockSpec((sq, sq, sq, d.head_dim, bs), kv_block_minor)
    return pl.BlockSpec((sq, sq, sq, bs, d.head_dim), lambda *a: (*kv_block(*a), 0))

  in_specs, operands = [q_spec, kv_spec(transposed[0]), kv_spec(transposed[1])], [qk, k, v]
  for scale, zero, groups, n in ((k_scale, k_zero, d.k_groups, d.k_token_group),
                                 (v_scale, v_zero, d.v_groups, d.v_token_group)):
    for arr in (scale, zero):
      if arr is None:
        continue
      # The scale block follows its data block: same (layer, b, head, block) indices.
      if n:  # Per-channel scales of the block's bs / n groups: [bs / n, H].
        in_specs.append(pl.BlockSpec((sq, sq, sq, bs // n, d.head_dim),
                                     lambda *a: (*kv_block(*a), 0)))
      else:
        in_specs.append(pl.BlockSpec((sq, sq, sq, groups, bs), kv_block_minor))
      operands.append(arr)
  sizes = {"sink": 0, "recent": 0}
  layouts = {}
  for field, pair in (("sink", windows[:2]), ("recent", windows[2:])):
    if pair[0] is not None:
      w = pair[0]
      sizes[field] = w.size
      layouts[field] = (w.slots, w.transposed)
      # The whole window of (layer, b, head): the same block at every query and KV step.
      spec = pl.BlockSpec((sq, sq, sq, *w.data.shape[3:]),
                          lambda b, h, j, i, layer_ref, *_: (layer_ref[0], b, h, 0, 0))
      in_specs += [spec, spec]
      operands += [x.data for x in pair]
  kernel = functools.partial(_kernel, d=d, block_t=block_t, block_s=bs,
                             k_zero=k_zero is not None, v_zero=v_zero is not None,
                             k_codes=codes[0], v_codes=codes[1], precision=precision, lse=lse,
                             transposed=transposed, window_layouts=layouts, spanned=spanned,
                             **sizes)
  out_shape, out_specs = jax.ShapeDtypeStruct(qk.shape, jnp.float32), q_spec
  if lse:  # One float per row: [B, K, T*G, 1].
    out_shape = (out_shape, jax.ShapeDtypeStruct((*qk.shape[:3], 1), jnp.float32))
    out_specs = (q_spec, pl.BlockSpec((sq, sq, rows, 1), lambda *a: (*q_block(*a)[:3], 0)))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6,
          grid=(d.batch, d.kv_heads, num_q_blocks, num_kv_blocks),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                          pltpu.VMEM((rows, d.head_dim), jnp.float32)],
      ),
      # The query axis is sequential: a query block of padding only keeps the last live
      # block's output block and KV blocks (no copies), so its steps must follow it.
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), lengths.astype(jnp.int32),
    chunk.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1), start, stop, *operands)
  out, row_lse = out if lse else (out, None)
  out = out.reshape(d.batch, d.kv_heads, d.t, d.group, d.head_dim).transpose(0, 2, 1, 3, 4)
  # Rows past the chunk are padding: 0 (the kernel never writes skipped query blocks).
  padding = jnp.arange(d.t)[None, :] >= chunk.astype(jnp.int32)[:, None]
  out = jnp.where(padding[:, :, None, None, None], 0.0, out).reshape(
      d.batch, d.t, d.q_heads, d.head_dim)
  if not lse:
    return out
  row_lse = row_lse.reshape(d.batch, d.kv_heads, d.t, d.group).transpose(0, 2, 1, 3)
  row_lse = jnp.where(padding[:, :, None, None], -jnp.inf, row_lse)
  return out, row_lse.reshape(d.batch, d.t, d.q_heads)

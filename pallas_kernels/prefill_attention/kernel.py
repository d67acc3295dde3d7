"""Chunked-prefill attention over a quantized KV cache, as a Pallas TPU kernel.

A chunk of T new tokens (already written to the cache by `update`) attends causally
to the cached prefix and to itself, flash-attention style. It is the decode kernel's
body (`decode_attention.kernel.attention_call`, same layout, scales, zero points,
masking and f32 online softmax) with the queries tiled too: grid
`(B, K, ceil(T / block_t), ceil(S / block_s))`. Query block j sees positions below
`lengths[b] + min((j + 1) * block_t, chunk[b])`; the KV index map clamps to that
block, so the causal upper triangle of the chunk and everything past it is neither
copied nor computed. The prefix is read once per query block: ceil(T / block_t)
times in all, which is what block_t trades against VMEM.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from kvtpu.pallas_kernels.decode_attention.kernel import (
  DEFAULT_VMEM_BUDGET,
  BlockSizes,
  attention_call,
  default_block_sizes,
  token_block_multiple,
  vmem_estimate_bytes,
)
from kvtpu.pallas_kernels.decode_attention.reference import (
  Dims,
  logical,
  unpack_codes,
  unpack_operands,
  unpack_token_groups,
  unpack_transposed,
  unpack_windows,
  validate_windows,
)
from kvtpu.pallas_kernels.prefill_attention.reference import validate_prefill_inputs

__all__ = ["PrefillBlockSizes", "prefill_attention", "default_prefill_block_sizes",
           "prefill_vmem_estimate_bytes"]

_SUBLANES = 8
_LANES = 128


@dataclasses.dataclass(frozen=True)
class PrefillBlockSizes:
  """Tiling of the query and KV axes.

  Attributes:
    block_t: query tokens per block (x G query heads = rows of one block); a
      multiple of 8 (the sublane count), or any value >= T (one block of all T).
    block_s: cache positions per KV block, as `decode_attention.BlockSizes`.
  """

  block_t: int
  block_s: int

  def __post_init__(self):
    if not isinstance(self.block_t, int) or self.block_t < 1:
      raise ValueError(f"block_t must be a positive int, got block_t={self.block_t!r}")
    BlockSizes(self.block_s)  # Validates block_s.

  def resolve(self, t: int, max_len: int) -> tuple[int, int]:
    """`(block_t, block_s)` actually used for T query tokens and S positions."""
    block_t = t if self.block_t >= t else self.block_t
    if block_t < t and block_t % _SUBLANES:
      raise ValueError(
          f"block_t={self.block_t} must be a multiple of {_SUBLANES} when smaller than T={t}")
    return block_t, BlockSizes(self.block_s).resolve(max_len)


_DEFAULT_BLOCK_T = 128


def default_prefill_block_sizes(k_dtype, v_dtype, head_dim: int, group: int = 1,
                                scale_dtype=jnp.float32,
                                token_groups: tuple[int, int] = (0, 0),
                                scale_groups: tuple[int, int] = (1, 1)) -> PrefillBlockSizes:
  """128 query tokens per block (x G heads: >= 128 MXU rows) and the decode KV block,
  halved until the step's VMEM estimate fits the budget: first the KV block (down to
  128 positions; the logits of 128 x G rows grow with it, and the decode rule makes it
  larger the fewer bits a value has), then the query block (down to 8 tokens) for the
  largest G. With token-grouped scales the KV block stays a multiple of
  `token_block_multiple` (the query block shrinks instead).

  Args:
    group: G, query heads per kv head.
    token_groups: positions per per-channel scale of K and V (0: none).
    scale_groups: per-token scale groups of K and V (`Dims.k_groups`, `v_groups`).
  """
  block_t = _DEFAULT_BLOCK_T
  block_s = default_block_sizes(k_dtype, v_dtype, head_dim, scale_groups=scale_groups).block_s

  def fits() -> bool:
    d = Dims(num_layers=1, batch=1, t=block_t, q_heads=group, kv_heads=1, max_len=block_s,
             head_dim=head_dim, k_groups=scale_groups[0], v_groups=scale_groups[1])
    return prefill_vmem_estimate_bytes(d, block_t, block_s, k_dtype, v_dtype,
                                       scale_dtype) <= DEFAULT_VMEM_BUDGET

  floor = math.lcm(_LANES, *(token_block_multiple(n) for n in token_groups))
  block_s = math.lcm(block_s, floor)
  while not fits() and block_s > floor:
    block_s //= 2
  while not fits() and block_t > _SUBLANES:
    block_t //= 2
  return PrefillBlockSizes(block_t, block_s)


def prefill_vmem_estimate_bytes(d, block_t: int, block_s: int, k_dtype, v_dtype,
                                scale_dtype=jnp.float32) -> int:
  """VMEM of one prefill grid step: the decode estimate with `block_t` query tokens."""
  return vmem_estimate_bytes(dataclasses.replace(d, t=block_t), block_s, k_dtype, v_dtype,
                             scale_dtype)


@functools.partial(jax.jit, static_argnames=("k_codes", "v_codes", "k_token_group",
                                             "v_token_group", "k_transposed", "v_transposed",
                                             "block_sizes", "precision", "return_lse",
                                             "interpret"))
def prefill_attention(q, k, v, lengths, chunk, layer, *, k_scale=None, k_zero=None,
                      v_scale=None, v_zero=None, k_sink=None, v_sink=None, k_recent=None,
                      v_recent=None, k_codes=None, v_codes=None, k_token_group=None,
                      v_token_group=None, k_transposed=None, v_transposed=None,
                      page_table=None, block_sizes: PrefillBlockSizes | None = None,
                      precision=None, kv_span=None, return_lse: bool = False,
                      interpret=False):
  """Causal attention of a T-token chunk over one layer of a quantized cache.

  Args: as `decode_attention` (paged caches included), with any T, and `block_sizes` a
  `PrefillBlockSizes`.

  Returns:
    `[B, T, N, H]` float32, and the log-sum-exps `[B, T, N]` if `return_lse`.
  """
  windows = unpack_windows(k, v, k_sink, v_sink, k_recent, v_recent)
  codes = unpack_codes(k, v, k_codes, v_codes)
  token_groups = unpack_token_groups(k, v, k_token_group, v_token_group)
  transposed = unpack_transposed(k, v, k_transposed, v_transposed)
  k, v, k_scale, k_zero, v_scale, v_zero = unpack_operands(k, v, k_scale, k_zero, v_scale, v_zero)
  k_shape, v_shape = logical(k, transposed[0], "k"), logical(v, transposed[1], "v")
  d = validate_prefill_inputs(q, k_shape, v_shape, lengths,
                              chunk, layer, k_scale, k_zero, v_scale, v_zero,
                              token_groups=token_groups, page_table=page_table)
  validate_windows(d, *windows)
  if block_sizes is None:
    block_sizes = default_prefill_block_sizes(k.dtype, v.dtype, d.head_dim, d.group,
                                              token_groups=token_groups,
                                              scale_groups=(d.k_groups, d.v_groups))
  block_t, block_s = block_sizes.resolve(d.t, d.slab)
  return attention_call(d, q, k, v, lengths, chunk, layer, k_scale, k_zero, v_scale, v_zero,
                        block_t=block_t, block_s=block_s, interpret=interpret, windows=windows,
                        codes=codes, page_table=page_table, precision=precision, span=kv_span,
                        lse=return_lse, transposed=transposed)

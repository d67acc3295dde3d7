"""Pure-jnp reference of `prefill_attention`: the decode reference without the T limit."""

from __future__ import annotations

from kvtpu.pallas_kernels.decode_attention.reference import ref_decode_attention, validate_inputs

__all__ = ["ref_prefill_attention", "validate_prefill_inputs"]


def validate_prefill_inputs(q, k, v, lengths, chunk, layer, k_scale=None, k_zero=None,
                            v_scale=None, v_zero=None, *, token_groups=(0, 0), page_table=None):
  """The decode validation with any number of query tokens T."""
  return validate_inputs(q, k, v, lengths, chunk, layer, k_scale, k_zero, v_scale, v_zero,
                         max_t=None, token_groups=token_groups, page_table=page_table)


def ref_prefill_attention(q, k, v, lengths, chunk, layer, *, k_scale=None, k_zero=None,
                          v_scale=None, v_zero=None, k_sink=None, v_sink=None, k_recent=None,
                          v_recent=None, k_codes=None, v_codes=None, k_token_group=None,
                          v_token_group=None, k_transposed=None, v_transposed=None,
                          page_table=None, block_sizes=None, precision=None, kv_span=None,
                          return_lse: bool = False, interpret=None):
  """Reference of `prefill_attention` (same signature; `block_sizes`, `precision` and
  `interpret` unused).

  A chunk of T tokens at positions `lengths[b] + t` attends causally to the cache
  prefix and to itself; see `ref_decode_attention` for the exact visibility rule.
  """
  return ref_decode_attention(q, k, v, lengths, chunk, layer, k_scale=k_scale, k_zero=k_zero,
                              v_scale=v_scale, v_zero=v_zero, k_sink=k_sink, v_sink=v_sink,
                              k_recent=k_recent, v_recent=v_recent, k_codes=k_codes,
                              v_codes=v_codes, k_token_group=k_token_group,
                              v_token_group=v_token_group, k_transposed=k_transposed,
                              v_transposed=v_transposed, page_table=page_table,
                              block_sizes=block_sizes, precision=precision,
                              kv_span=kv_span, return_lse=return_lse,
                              interpret=interpret, max_t=None)

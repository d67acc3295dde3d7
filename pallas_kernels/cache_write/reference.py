"""The pure-jnp contract of `kernel.cache_write`: a masked scatter of a chunk's rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ref_cache_write"]


def ref_cache_write(store: jax.Array, new: jax.Array, layer, lo: jax.Array, hi: jax.Array, *,
                    seq_axis: int, page_table: jax.Array | None = None) -> jax.Array:
  """`store` with `new[b, t]` at position `lo[b] + t` of `layer` for the positions in
  `[lo[b], min(hi[b], lo[b] + T))`, everything else unchanged.

  `store`: `[L, B, K, S, H]` (`seq_axis=3`) or `[L, B, K, G, S]` (`seq_axis=4`); with
  `page_table` (`[B, pages_per_sequence]`) a pool of pages of Z positions in the same
  layout, position p of sequence b at offset `p % Z` of page `page_table[b, p // Z]`.
  `new`: `[B, T, K, H]` or `[B, T, K, G]`. Moves bits: the result equals the kernel's
  exactly.
  """
  b, t = new.shape[:2]
  page_len = store.shape[seq_axis]
  if page_table is None:
    page_table = jnp.arange(b, dtype=jnp.int32)[:, None]
  capacity = page_table.shape[1] * page_len
  pos = lo[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
  kept = pos < jnp.minimum(hi, capacity)[:, None]
  page = jnp.take_along_axis(page_table, jnp.clip(pos // page_len, 0, page_table.shape[1] - 1),
                             axis=1)
  offset = jnp.where(kept, pos % page_len, page_len)  # page_len: dropped.
  index = (layer, page) + (slice(None),) * (seq_axis - 2) + (offset,)
  return store.at[index].set(new.astype(store.dtype), mode="drop")

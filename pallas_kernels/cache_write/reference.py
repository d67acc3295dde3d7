"""The pure-jnp contract of `kernel.cache_write`: a masked scatter of a chunk's rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ref_cache_write"]


def ref_cache_write(store: jax.Array, new: jax.Array, layer, lo: jax.Array, hi: jax.Array, *,
                    seq_axis: int) -> jax.Array:
  """`store` with `new[b, t]` at position `lo[b] + t` of `layer` for the positions in
  `[lo[b], min(hi[b], lo[b] + T))`, everything else unchanged.

  `store`: `[L, B, K, S, H]` (`seq_axis=3`) or `[L, B, K, G, S]` (`seq_axis=4`); `new`:
  `[B, T, K, H]` or `[B, T, K, G]`. Moves bits: the result equals the kernel's exactly.
  """
  b, t = new.shape[:2]
  max_len = store.shape[seq_axis]
  pos = lo[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
  pos = jnp.where(pos < jnp.minimum(hi, max_len)[:, None], pos, max_len)  # max_len: dropped.
  rows = jnp.arange(b)[:, None]
  index = (layer, rows) + (slice(None),) * (seq_axis - 2) + (pos,)
  return store.at[index].set(new.astype(store.dtype), mode="drop")

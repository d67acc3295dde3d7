"""Per-head orthogonal rotation of keys, values and queries (the `rot` spec option).

A rotated spec stores `x @ R` instead of `x`, for one fixed orthogonal `R: [H, H]`
shared by every layer, head and token. Rotation spreads a channel's outlier over
all H coordinates, so a per-token scale no longer spends the grid on one channel.
Attention is unchanged mathematically, because `R @ R.T = I`:

  logits:  (q R) . (k R) = q . k        queries are rotated to match rotated keys;
  output:  sum_s p_s (v_s R) = o R      the output is rotated back, `(o R) R.T = o`.

`R` is the normalized Hadamard matrix (Sylvester's construction, entries
`+-1/sqrt(H)`, symmetric and its own inverse) when H is a power of two, and
otherwise the orthogonal factor of the QR decomposition of a fixed (seeded)
Gaussian matrix, sign-normalized: deterministic across machines and versions.
No weight changes: the cache rotates on write, and attention rotates the queries
and the output, so any model that uses the cache can use a rotated spec.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rotation_matrix", "rotate", "unrotate"]

_SEED = 20261130  # Fixes the non-power-of-two matrices; part of the format's meaning.


@functools.cache
def _matrix64(head_dim: int) -> np.ndarray:
  if head_dim & (head_dim - 1) == 0:
    h = np.ones((1, 1))
    while h.shape[0] < head_dim:
      h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(head_dim)
  a = np.random.default_rng(_SEED + head_dim).standard_normal((head_dim, head_dim))
  q, r = np.linalg.qr(a)
  return q * np.sign(np.diag(r))[None, :]  # The unique Q with a positive diagonal R.


def rotation_matrix(head_dim: int) -> np.ndarray:
  """The orthogonal `R: float64 [head_dim, head_dim]` of rotated specs (a copy).

  Raises:
    ValueError: for a head_dim that is not a positive int.
  """
  if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
    raise ValueError(f"head_dim must be a positive int, got head_dim={head_dim!r}")
  return _matrix64(head_dim).copy()


def _apply(x: jax.Array, m: np.ndarray, dtype) -> jax.Array:
  out = jnp.einsum("...h,hj->...j", jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(jnp.result_type(x) if dtype is None else dtype)


def rotate(x: jax.Array, dtype=None) -> jax.Array:
  """`x @ R` over the last axis (head_dim), computed in float32, returned in `dtype`
  (default `x.dtype`)."""
  return _apply(x, _matrix64(jnp.shape(x)[-1]), dtype)


def unrotate(x: jax.Array, dtype=None) -> jax.Array:
  """`x @ R.T` over the last axis: the inverse of `rotate`."""
  return _apply(x, _matrix64(jnp.shape(x)[-1]).T, dtype)

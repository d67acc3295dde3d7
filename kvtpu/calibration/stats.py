"""Streaming K/V statistics for calibration: observers that run under `jit`.

One `TensorStats` holds the statistics of one tensor kind (keys before RoPE, keys
after RoPE, or values) for every layer, per layer L, kv head K and channel H:

  * `tokens`, `nonfinite`: per layer, the valid tokens observed and the NaN/inf
    values excluded, as 64-bit counts (lo, hi uint32 words).
  * `count`: finite values per channel (uint32).
  * `min`, `max`: exact signed extremes per channel.
  * `mean`, `m2`: mean and sum of squared deviations per channel, merged batch by
    batch with Chan et al.'s parallel update (each batch's own mean and M2 come
    from a two-pass sum over the batch), which is stable in float32.
  * `hist`: a histogram per channel of the SIGNED values on fixed bins shared by
    every channel, layer and tensor: `M = bins_per_octave * (max_exponent -
    min_exponent)` log-spaced magnitude bins on each side of zero plus one zero
    bin, `NB = 2 M + 1` in all, ordered by value:

      index 0 .. M-1      negative magnitudes, largest first
      index M             the zero bin: |x| < 2**min_exponent (0 included)
      index M+1 .. 2M     positive magnitudes, smallest first

    Magnitude bin `m` holds `edges[m] <= |x| < edges[m + 1]` with `edges[m] =
    float32(2 ** (min_exponent + m / bins_per_octave))`; the last one also holds
    every |x| >= 2**max_exponent (clamped: the exact extremes are in `min`/`max`).
    Because the bins are shared, head and tensor histograms are exact sums of
    channel histograms.
  * `beyond`: per layer and kv head, the tokens with any channel beyond `k_sigma`
    standard deviations of that channel's mean (see "Beyond k sigma").

Percentiles (`percentile`). For a rank `r = q / 100 * (n - 1)` (numpy's default
linear definition) the estimate interpolates between the estimates of the order
statistics `floor(r)` and `floor(r) + 1`. An order statistic is estimated inside
its bin `[a, b]`, narrowed to the group's exact `[min, max]`, by spreading the
bin's values evenly over it (the first and last occupied bins put their outermost
value exactly on `min` / `max`, so `q = 0` and `q = 100` are exact). The true
value lies in the same interval, so for magnitudes in `[2**min_exponent,
2**max_exponent)` and order statistics of one sign the relative error is at most
the bin ratio minus one:

    |estimate - true| <= (2 ** (1 / bins_per_octave) - 1) * |true|

(4.4% for the default 16 bins per octave; on smooth data it is far smaller, see
the tests). In the zero bin the absolute error is below `2**min_exponent`; a value
clamped into the last bin is only known to lie in `[2**(max_exponent - 1 /
bins_per_octave), max]`.

Beyond k sigma. A single pass cannot know the final mean and deviation, so each
batch is judged against the statistics accumulated so far INCLUDING that batch
(the running stats after merging it): a value is beyond when `|x - mean| >
k_sigma * std` with the population deviation `std = sqrt(m2 / count)`, and a
token counts once per (layer, kv head) if any of its H channels is beyond. For a
single batch this is the exact two-pass answer; for later batches the running
stats are those of all data so far, which for stationary data converge to the
final ones. `merge` adds the counts as they were made.

Memory (`stats_nbytes`): `L*K*H*(4*NB + 20) + 4*L*K + 16*L` bytes, with
`NB = 2 * bins_per_octave * (max_exponent - min_exponent) + 1`: 4 bytes per bin
(uint32), 20 per channel (count, min, max, mean, m2), 4 per head (beyond), 16 per
layer (tokens, nonfinite). SmolLM2-135M (L=30, K=3, H=64) with the default 1537
bins: 35.5 MB per tensor kind, whatever the number of tokens observed.

Limits. Histogram bins and per-channel counts are uint32, so at most `2**32 - 1`
tokens per layer may be observed (4.3e9; the host-side readers check the 64-bit
token count and raise beyond it). Running means and M2 weight batches by float32
counts, exact to 2**24 values per channel and accurate to float32 rounding beyond.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu._shared import add_u64, add_u64_pair, check_layer
from kvtpu.formats import Granularity

__all__ = ["TensorStats", "init_stats", "observe", "merge", "percentile", "summary",
           "stats_nbytes", "bin_edges", "grouped", "SIDES"]

_U32 = jnp.uint32
SIDES = ("abs", "upper", "lower")
_MAX_TOKENS = 2**32 - 1
_SUMMARY_PERCENTILES = (99.0, 99.9, 99.99)


def _num_mag_bins(bins_per_octave: int, min_exponent: int, max_exponent: int) -> int:
  return bins_per_octave * (max_exponent - min_exponent)


def bin_edges(bins_per_octave: int, min_exponent: int, max_exponent: int) -> np.ndarray:
  """The `M + 1` float32 magnitude edges `2 ** (min_exponent + m / bins_per_octave)`."""
  m = np.arange(_num_mag_bins(bins_per_octave, min_exponent, max_exponent) + 1)
  return np.exp2(min_exponent + m / bins_per_octave).astype(np.float32)


def stats_nbytes(num_layers: int, kv_heads: int, head_dim: int, *, bins_per_octave: int = 16,
                 min_exponent: int = -24, max_exponent: int = 24) -> int:
  """Bytes of one `TensorStats`; independent of the number of tokens observed."""
  nb = 2 * _num_mag_bins(bins_per_octave, min_exponent, max_exponent) + 1
  channels = num_layers * kv_heads * head_dim
  return channels * (4 * nb + 20) + 4 * num_layers * kv_heads + 16 * num_layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TensorStats:
  """Statistics of one tensor kind over all layers (see the module docstring).

  Invariants:
    * `tokens`, `nonfinite`: `u32[L, 2]` 64-bit counts (lo, hi words).
    * `count: u32[L, K, H]` finite values; equals `hist.sum(-1)`.
    * `min`, `max: f32[L, K, H]`, +inf / -inf where nothing was observed.
    * `mean`, `m2: f32[L, K, H]`, 0 where nothing was observed.
    * `hist: u32[L, K, H, NB]` on the bins `bin_edges(bins_per_octave,
      min_exponent, max_exponent)` describe.
    * `beyond: u32[L, K]` tokens with a channel beyond `k_sigma` deviations.
    * The bin layout and `k_sigma` are static (meta) fields: stats merge only with
      stats of the same layout.
  """

  tokens: jax.Array
  nonfinite: jax.Array
  count: jax.Array
  min: jax.Array
  max: jax.Array
  mean: jax.Array
  m2: jax.Array
  hist: jax.Array
  beyond: jax.Array
  bins_per_octave: int = dataclasses.field(metadata=dict(static=True))
  min_exponent: int = dataclasses.field(metadata=dict(static=True))
  max_exponent: int = dataclasses.field(metadata=dict(static=True))
  k_sigma: float = dataclasses.field(metadata=dict(static=True))

  @property
  def num_layers(self) -> int:
    return self.count.shape[0]

  @property
  def kv_heads(self) -> int:
    return self.count.shape[1]

  @property
  def head_dim(self) -> int:
    return self.count.shape[2]

  @property
  def num_mag_bins(self) -> int:
    """M: magnitude bins per side of zero."""
    return _num_mag_bins(self.bins_per_octave, self.min_exponent, self.max_exponent)

  @property
  def num_bins(self) -> int:
    """NB = 2 M + 1."""
    return 2 * self.num_mag_bins + 1

  @property
  def relative_error_bound(self) -> float:
    """Worst-case relative error of a percentile: `2 ** (1 / bins_per_octave) - 1`."""
    return float(2.0 ** (1.0 / self.bins_per_octave) - 1.0)

  @property
  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

  def edges(self) -> np.ndarray:
    """float32 `[M + 1]` magnitude bin edges."""
    return bin_edges(self.bins_per_octave, self.min_exponent, self.max_exponent)

  def signed_bin_ranges(self) -> tuple[np.ndarray, np.ndarray]:
    """float64 `[NB]` lower and upper value bounds of the signed bins (±inf at the ends)."""
    e = self.edges().astype(np.float64)
    mag_lo = e[:-1]
    mag_hi = np.concatenate([e[1:-1], [np.inf]])
    lo = np.concatenate([-mag_hi[::-1], [-e[0]], mag_lo])
    hi = np.concatenate([-mag_lo[::-1], [e[0]], mag_hi])
    return lo, hi

  def tokens_per_layer(self) -> np.ndarray:
    """int64 `[L]` valid tokens observed per layer."""
    return _u64(self.tokens)

  def nonfinite_per_layer(self) -> np.ndarray:
    """int64 `[L]` NaN/inf values excluded per layer."""
    return _u64(self.nonfinite)


def _u64(words) -> np.ndarray:
  w = np.asarray(jax.device_get(words)).astype(np.int64)
  return w[..., 0] + (w[..., 1] << 32)


def init_stats(num_layers: int, kv_heads: int, head_dim: int, *, bins_per_octave: int = 16,
               min_exponent: int = -24, max_exponent: int = 24,
               k_sigma: float = 6.0) -> TensorStats:
  """Empty statistics for `num_layers` layers of `[..., kv_heads, head_dim]` tensors.

  Args:
    num_layers, kv_heads, head_dim: L, K, H.
    bins_per_octave: histogram resolution; percentile relative error
      <= `2 ** (1 / bins_per_octave) - 1`.
    min_exponent, max_exponent: magnitudes in `[2**min_exponent, 2**max_exponent)`
      get log-spaced bins; smaller ones fall in the zero bin, larger ones are
      clamped into the last bin.
    k_sigma: threshold of the "beyond k sigma" outlier indicator.

  Returns:
    A `TensorStats` of `stats_nbytes(...)` bytes.
  """
  for name, val in (("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                    ("bins_per_octave", bins_per_octave)):
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={val!r}")
  if not (isinstance(min_exponent, int) and isinstance(max_exponent, int)
          and -126 <= min_exponent < max_exponent <= 127):
    raise ValueError(f"need integers -126 <= min_exponent < max_exponent <= 127, got "
                     f"{min_exponent=}, {max_exponent=}")
  if not (isinstance(k_sigma, int | float) and k_sigma > 0):
    raise ValueError(f"k_sigma must be > 0, got {k_sigma=}")
  nb = 2 * _num_mag_bins(bins_per_octave, min_exponent, max_exponent) + 1
  if num_layers * kv_heads * head_dim * nb >= 2**31:
    raise ValueError(f"the histogram would have {num_layers * kv_heads * head_dim * nb} bins "
                     "(int32 indexing limit 2**31): use fewer bins_per_octave or a narrower range")
  chan = (num_layers, kv_heads, head_dim)
  return TensorStats(
      tokens=jnp.zeros((num_layers, 2), _U32),
      nonfinite=jnp.zeros((num_layers, 2), _U32),
      count=jnp.zeros(chan, _U32),
      min=jnp.full(chan, jnp.inf, jnp.float32),
      max=jnp.full(chan, -jnp.inf, jnp.float32),
      mean=jnp.zeros(chan, jnp.float32),
      m2=jnp.zeros(chan, jnp.float32),
      hist=jnp.zeros((*chan, nb), _U32),
      beyond=jnp.zeros((num_layers, kv_heads), _U32),
      bins_per_octave=bins_per_octave, min_exponent=min_exponent, max_exponent=max_exponent,
      k_sigma=float(k_sigma))


def _check_layer(layer, num_layers: int) -> jax.Array:
  """The cache's layer validation (int or integer scalar, in range when concrete), as i32."""
  check_layer(layer, num_layers)
  return jnp.asarray(layer, jnp.int32)


def _signed_bin_index(x: jax.Array, bins_per_octave: int, min_exponent: int,
                      max_exponent: int) -> jax.Array:
  """int32 signed bin index of float32 `x` (finite), exact against `bin_edges(...)`."""
  m_bins = _num_mag_bins(bins_per_octave, min_exponent, max_exponent)
  edges = bin_edges(bins_per_octave, min_exponent, max_exponent)
  lower = jnp.asarray(np.concatenate([[0.0], edges[:-1]]).astype(np.float32))
  upper = jnp.asarray(np.concatenate([edges[:-1], [np.inf]]).astype(np.float32))
  a = jnp.abs(x)
  # log2 lands within a bin of the answer; one comparison with the float32 edges on
  # either side makes it exact (the edges, not log2, define the bins).
  m = jnp.floor((jnp.log2(a) - min_exponent) * bins_per_octave)
  m = jnp.clip(m, -1, m_bins - 1).astype(jnp.int32)
  m = m - (a < jnp.take(lower, m + 1)).astype(jnp.int32)
  m = m + (a >= jnp.take(upper, m + 1)).astype(jnp.int32)
  m = jnp.clip(m, -1, m_bins - 1)
  return jnp.where(x < 0, m_bins - 1 - m, m_bins + 1 + m)


def _chan_merge(na, mean_a, m2_a, nb, mean_b, m2_b):
  """Chan et al.: merge (count, mean, M2) of two disjoint sets; float32 counts."""
  n = na + nb
  safe = jnp.maximum(n, 1.0)
  delta = mean_b - mean_a
  mean = mean_a + delta * (nb / safe)
  m2 = m2_a + m2_b + delta * delta * (na * (nb / safe))
  return jnp.where(n > 0, mean, 0.0), jnp.where(n > 0, m2, 0.0)


@jax.jit
def _observe(stats: TensorStats, layer: jax.Array, x: jax.Array,
             valid: jax.Array) -> TensorStats:
  _, _, kv, hd = x.shape
  nbins = stats.num_bins
  finite = jnp.isfinite(x)
  x = x.astype(jnp.float32)
  tok = valid[:, :, None, None]
  w = finite & tok  # [B, T, K, H]
  xs = jnp.where(w, x, 0.0)
  wf = w.astype(jnp.float32)

  # This batch per channel: count, two-pass mean and M2, extremes.
  nb_i = jnp.sum(w, axis=(0, 1), dtype=jnp.int32)
  nb = nb_i.astype(jnp.float32)
  mean_b = jnp.sum(xs, axis=(0, 1)) / jnp.maximum(nb, 1.0)
  m2_b = jnp.sum(wf * jnp.square(xs - mean_b[None, None]), axis=(0, 1))
  bmin = jnp.min(jnp.where(w, x, jnp.inf), axis=(0, 1))
  bmax = jnp.max(jnp.where(w, x, -jnp.inf), axis=(0, 1))

  count_a = stats.count[layer]
  mean, m2 = _chan_merge(count_a.astype(jnp.float32), stats.mean[layer], stats.m2[layer],
                         nb, mean_b, m2_b)

  # Beyond k sigma, against the running stats including this batch.
  n_all = count_a.astype(jnp.float32) + nb
  std = jnp.sqrt(m2 / jnp.maximum(n_all, 1.0))
  far = w & (jnp.abs(xs - mean[None, None]) > stats.k_sigma * std[None, None])
  beyond = jnp.sum(jnp.any(far, axis=-1), axis=(0, 1), dtype=jnp.int32)  # [K]

  # Histogram: one scatter-add into the flat [L*K*H*NB] array.
  sidx = _signed_bin_index(xs, stats.bins_per_octave, stats.min_exponent, stats.max_exponent)
  chan = jnp.arange(kv * hd, dtype=jnp.int32).reshape(kv, hd)
  flat = ((layer * (kv * hd) + chan) * nbins)[None, None] + sidx
  hist = stats.hist.reshape(-1).at[flat.reshape(-1)].add(
      w.reshape(-1).astype(_U32), mode="promise_in_bounds").reshape(stats.hist.shape)

  n_tok = jnp.sum(valid, dtype=_U32)
  n_bad = jnp.sum(~finite & tok, dtype=_U32)
  return dataclasses.replace(
      stats,
      tokens=stats.tokens.at[layer].set(add_u64(stats.tokens[layer], n_tok)),
      nonfinite=stats.nonfinite.at[layer].set(add_u64(stats.nonfinite[layer], n_bad)),
      count=stats.count.at[layer].set(count_a + nb_i.astype(_U32)),
      min=stats.min.at[layer].set(jnp.minimum(stats.min[layer], bmin)),
      max=stats.max.at[layer].set(jnp.maximum(stats.max[layer], bmax)),
      mean=stats.mean.at[layer].set(mean),
      m2=stats.m2.at[layer].set(m2),
      hist=hist,
      beyond=stats.beyond.at[layer].add(beyond.astype(_U32)))


def observe(stats: TensorStats, layer, x: jax.Array, valid: jax.Array | None = None
            ) -> TensorStats:
  """Adds one batch of one layer's K (or V) to the statistics.

  Traceable and jitted (a Python int layer and a traced one share one
  compilation per shape); the input stats are not donated. Each call costs
  O(B*T*K*H) work plus a copy of the stats unless the caller's jit donates them.

  Args:
    stats: the statistics so far.
    layer: layer index, an int (checked) or an integer scalar (e.g. under
      `lax.scan`; a traced index cannot be checked and must be in range).
    x: `[B, T, K, H]` floating point values. NaN/inf values are excluded from
      every statistic and counted in `nonfinite`.
    valid: optional `bool[B, T]`; False tokens (padding) are ignored entirely.

  Returns:
    The updated statistics.
  """
  if not isinstance(stats, TensorStats):
    raise TypeError(f"stats must be a TensorStats, got {type(stats).__name__}")
  layer = _check_layer(layer, stats.num_layers)
  if jnp.ndim(x) != 4 or tuple(x.shape[2:]) != (stats.kv_heads, stats.head_dim):
    raise ValueError(f"x must be [B, T, K={stats.kv_heads}, H={stats.head_dim}], "
                     f"got x.shape={tuple(jnp.shape(x))}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating point, got x.dtype={x.dtype}")
  if valid is None:
    valid = jnp.ones(x.shape[:2], bool)
  elif tuple(jnp.shape(valid)) != tuple(x.shape[:2]) or jnp.result_type(valid) != jnp.bool_:
    raise ValueError(f"valid must be bool[B, T]={tuple(x.shape[:2])}, got "
                     f"{jnp.result_type(valid)}{list(jnp.shape(valid))}")
  return _observe(stats, layer, x, valid)


@jax.jit
def _merge(a: TensorStats, b: TensorStats) -> TensorStats:
  mean, m2 = _chan_merge(a.count.astype(jnp.float32), a.mean, a.m2,
                         b.count.astype(jnp.float32), b.mean, b.m2)
  return dataclasses.replace(
      a, tokens=add_u64_pair(a.tokens, b.tokens), nonfinite=add_u64_pair(a.nonfinite, b.nonfinite),
      count=a.count + b.count, min=jnp.minimum(a.min, b.min), max=jnp.maximum(a.max, b.max),
      mean=mean, m2=m2, hist=a.hist + b.hist, beyond=a.beyond + b.beyond)


def merge(a: TensorStats, b: TensorStats) -> TensorStats:
  """Statistics of the union of two disjoint sets of observations.

  Raises:
    ValueError: if the shapes, bin layouts or `k_sigma` differ.
  """
  meta = lambda s: (s.count.shape, s.bins_per_octave, s.min_exponent, s.max_exponent, s.k_sigma)  # noqa: E731
  if meta(a) != meta(b):
    raise ValueError(f"cannot merge stats of different layouts: (shape, bins_per_octave, "
                     f"min_exponent, max_exponent, k_sigma) {meta(a)} vs {meta(b)}")
  return _merge(a, b)


# ----------------------------------------------------------------- host side
def _check_token_limit(stats: TensorStats) -> np.ndarray:
  tokens = stats.tokens_per_layer()
  over = np.nonzero(tokens > _MAX_TOKENS)[0]
  if over.size:
    raise ValueError(f"layer {int(over[0])} observed {int(tokens[over[0]])} tokens, more than "
                     f"2**32 - 1: its uint32 histogram counts may have wrapped")
  return tokens


def _granularity(granularity) -> Granularity:
  try:
    g = Granularity(granularity)
  except ValueError:
    g = None
  if g not in (Granularity.TENSOR, Granularity.HEAD, Granularity.CHANNEL):
    raise ValueError(f"granularity must be one of tensor, head, channel (static scales), got "
                     f"{granularity=}")
  return g


def grouped(stats: TensorStats, granularity) -> dict[str, np.ndarray]:
  """Histogram counts and extremes summed over the channels that share a scale.

  Args:
    stats: the statistics.
    granularity: `Granularity` or its name: tensor (sum over K and H), head (over
      H) or channel.

  Returns:
    numpy arrays with group shape `[L, 1|K, 1|H]`: `hist` (uint64, `[..., NB]`),
    `count` (int64), `min`, `max` (float64; +inf / -inf for empty groups).
  """
  g = _granularity(granularity)
  _check_token_limit(stats)
  axes = {Granularity.TENSOR: (1, 2), Granularity.HEAD: (2,), Granularity.CHANNEL: ()}[g]
  hist = np.asarray(jax.device_get(stats.hist)).astype(np.uint64)
  lo = np.asarray(jax.device_get(stats.min), np.float64)
  hi = np.asarray(jax.device_get(stats.max), np.float64)
  hist = hist.sum(axis=axes, keepdims=True)
  return {"hist": hist, "count": hist.sum(axis=-1).astype(np.int64),
          "min": lo.min(axis=axes, keepdims=True), "max": hi.max(axis=axes, keepdims=True)}


def _fold_abs(stats: TensorStats, hist: np.ndarray) -> np.ndarray:
  """Signed `[..., NB]` counts -> `[..., M + 1]` counts of |x| (zero bin first)."""
  m_bins = stats.num_mag_bins
  return np.concatenate([hist[..., m_bins:m_bins + 1],
                         hist[..., :m_bins][..., ::-1] + hist[..., m_bins + 1:]], axis=-1)


def _abs_bin_ranges(stats: TensorStats) -> tuple[np.ndarray, np.ndarray]:
  lo, hi = stats.signed_bin_ranges()
  m_bins = stats.num_mag_bins
  return np.concatenate([[0.0], lo[m_bins + 1:]]), np.concatenate([[hi[m_bins]], hi[m_bins + 1:]])


def _order_stats(counts: np.ndarray, lo_edge: np.ndarray, hi_edge: np.ndarray,
                 gmin: np.ndarray, gmax: np.ndarray, rank: np.ndarray,
                 lower_anchor: bool) -> np.ndarray:
  """Estimates of the `rank`-th (0-based) smallest value per group.

  Args:
    counts: `[G, NB]` float64 bin counts, every group non-empty.
    lo_edge, hi_edge: `[NB]` bin bounds.
    gmin, gmax: `[G]` exact extremes (bins are narrowed to them).
    rank: `[G]` int64 ranks in `[0, n)`.
    lower_anchor: whether the first occupied bin's first value is exactly `gmin`.
  """
  cum = np.cumsum(counts, axis=-1)
  j = np.sum(cum <= rank[:, None], axis=-1)
  rows = np.arange(counts.shape[0])
  c = counts[rows, j]
  m = rank - (cum[rows, j] - c)
  occupied = counts > 0
  first = np.argmax(occupied, axis=-1)
  last = counts.shape[-1] - 1 - np.argmax(occupied[:, ::-1], axis=-1)
  lo_anchor = (j == first) & lower_anchor
  hi_anchor = j == last
  a = np.maximum(lo_edge[j], gmin)
  b = np.minimum(hi_edge[j], gmax)
  # Values spread evenly over [a, b]; an anchored end puts a value exactly on it.
  num = m + 0.5 * (~lo_anchor)
  den = c - 1 + 0.5 * ((~lo_anchor).astype(float) + (~hi_anchor))
  with np.errstate(invalid="ignore", divide="ignore"):
    t = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
  return a + (b - a) * np.clip(t, 0.0, 1.0)


def percentile(stats: TensorStats, q: float, granularity: Granularity | str = "channel", *,
               side: str = "abs") -> np.ndarray:
  """The `q`-th percentile per layer and group, from the histograms.

  Args:
    stats: the statistics.
    q: percentile in [0, 100].
    granularity: tensor, head or channel: which channels are pooled.
    side: "abs": the q-th percentile of |x|; "upper": the q-th percentile of the
      signed values (the upper clip at tail mass `1 - q/100`); "lower": the
      `(100 - q)`-th percentile of the signed values (the lower clip at the same
      tail mass), e.g. `q=99.99` gives the 0.01-th percentile.

  Returns:
    float64 `[L, 1|K, 1|H]`; NaN for groups that observed no finite value.
    Relative error <= `stats.relative_error_bound` (module docstring).
  """
  if not 0.0 <= q <= 100.0:
    raise ValueError(f"q must be in [0, 100], got {q=}")
  if side not in SIDES:
    raise ValueError(f"side must be one of {SIDES}, got {side=}")
  g = grouped(stats, granularity)
  shape = g["count"].shape
  n = g["count"].reshape(-1)
  gmin, gmax = g["min"].reshape(-1), g["max"].reshape(-1)
  hist = g["hist"].reshape(n.size, -1).astype(np.float64)
  if side == "abs":
    counts = _fold_abs(stats, hist)
    lo_edge, hi_edge = _abs_bin_ranges(stats)
    gmin, gmax = np.zeros_like(gmin), np.maximum(np.abs(gmin), np.abs(gmax))
    frac = q / 100.0
  else:
    counts = hist
    lo_edge, hi_edge = stats.signed_bin_ranges()
    frac = q / 100.0 if side == "upper" else 1.0 - q / 100.0
  out = np.full(n.size, np.nan)
  ok = n > 0
  if ok.any():
    nn = n[ok].astype(np.float64)
    r = frac * (nn - 1)
    i = np.floor(r).astype(np.int64)
    f = r - i
    i1 = np.minimum(i + 1, n[ok] - 1)
    args = (counts[ok], lo_edge, hi_edge, gmin[ok], gmax[ok])
    anchor = side != "abs"
    v0 = _order_stats(*args, i, anchor)
    v1 = _order_stats(*args, i1, anchor)
    out[ok] = v0 + f * (v1 - v0)
  return out.reshape(shape)


def summary(stats: TensorStats, *, top: int = 4) -> dict[str, np.ndarray]:
  """Per layer / head / channel statistics as numpy arrays, for reports.

  Returns:
    A dict of numpy arrays:
      tokens [L], nonfinite [L] (int64): valid tokens and excluded NaN/inf values.
      count [L, K, H] (int64): finite values per channel.
      min, max, absmax, mean, std [L, K, H] (float64; NaN where count is 0).
      p99, p99.9, p99.99 [L, K, H]: percentiles of |x| per channel.
      head_absmax, head_p99.99 [L, K]: the same pooled over the head's channels.
      channel_ratio [L, K, H]: channel absmax over the head's median channel absmax.
      outlier_ratio [L, K]: the largest channel_ratio of the head (inf if the
        median is 0).
      top_channels [L, K, top] (int64): channel indices by absmax, largest first.
      beyond_k_sigma [L, K]: fraction of valid tokens with a channel beyond
        `k_sigma` deviations (module docstring); k_sigma: the threshold.
  """
  tokens = _check_token_limit(stats)
  count = np.asarray(jax.device_get(stats.count)).astype(np.int64)
  empty = count == 0
  nan_if_empty = lambda a: np.where(empty, np.nan, np.asarray(jax.device_get(a), np.float64))  # noqa: E731
  lo, hi = nan_if_empty(stats.min), nan_if_empty(stats.max)
  absmax = np.maximum(np.abs(lo), np.abs(hi))
  with np.errstate(invalid="ignore", divide="ignore"):
    std = np.sqrt(nan_if_empty(stats.m2) / count)
    median = np.median(absmax, axis=-1, keepdims=True)
    ratio = absmax / median
    ratio = np.where((median == 0) & (absmax > 0), np.inf, ratio)
    beyond = np.asarray(jax.device_get(stats.beyond)).astype(np.float64) / tokens[:, None]
  out = {"tokens": tokens, "nonfinite": stats.nonfinite_per_layer(), "count": count,
         "min": lo, "max": hi, "absmax": absmax, "mean": nan_if_empty(stats.mean), "std": std}
  for p in _SUMMARY_PERCENTILES:
    out[f"p{p:g}"] = percentile(stats, p, "channel")
  out["head_absmax"] = np.max(absmax, axis=-1)
  out["head_p99.99"] = percentile(stats, 99.99, "head")[..., 0]
  out["channel_ratio"] = ratio
  out["outlier_ratio"] = np.max(ratio, axis=-1)
  order = np.argsort(-np.nan_to_num(absmax, nan=-1.0), axis=-1, kind="stable")
  out["top_channels"] = order[..., :min(top, stats.head_dim)].astype(np.int64)
  out["beyond_k_sigma"] = beyond
  out["k_sigma"] = np.float64(stats.k_sigma)
  return out


_bin_index_jit = jax.jit(_signed_bin_index, static_argnums=(1, 2, 3))


def signed_bin_index(stats: TensorStats, x) -> np.ndarray:
  """The signed histogram bin of each finite float32 value of `x` (for tests and tools)."""
  x = jnp.asarray(x, jnp.float32)
  return np.asarray(_bin_index_jit(x, stats.bins_per_octave, stats.min_exponent,
                                   stats.max_exponent))

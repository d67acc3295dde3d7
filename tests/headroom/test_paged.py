"""Paged headroom: length distributions, the pages n requests hold, and the search for
the most requests whose pages fit, against closed forms and brute force."""

import json
import math

import jax
import numpy as np
import pytest

import kvtpu
from kvtpu import memory
from kvtpu.headroom import Deployment, Usage, paged
from kvtpu.headroom.paged import LengthDistribution

GIB = 2**30


def test_distributions_parse_and_their_page_moments_are_exact(tmp_path):
  fixed = LengthDistribution.parse("fixed:300")
  assert fixed.pages(128) == (3.0, 0.0) and fixed.max_length == 300
  uni = LengthDistribution.parse("uniform:1:256")
  mean, std = uni.pages(128)
  assert mean == 1.5 and std == 0.5  # Half the lengths need one page, half two.
  assert uni.mean_length == 128.5
  (tmp_path / "h.json").write_text(json.dumps({"lengths": [10, 200, 10], "counts": [1, 2, 1]}))
  (tmp_path / "h.csv").write_text("length,count\n10,2\n200,2\n")
  a = LengthDistribution.parse(f"histogram:{tmp_path / 'h.json'}")
  b = LengthDistribution.parse(f"histogram:{tmp_path / 'h.csv'}")
  assert a.lengths == b.lengths == (10, 200) and a.probs == b.probs == (0.5, 0.5)
  assert a.digest == b.digest != uni.digest
  for bad, match in (("gauss:3", "expected fixed:<n>"), ("uniform:5:2", "1 <= lo <= hi"),
                     ("fixed:0", "lengths must be ints >= 1"),
                     (f"histogram:{tmp_path / 'none.csv'}", "No such file")):
    with pytest.raises(ValueError, match=match):
      LengthDistribution.parse(bad)


def test_pool_pages_mean_and_p99_against_simulation():
  dist = LengthDistribution.parse("uniform:1:4096")
  rng = np.random.default_rng(0)
  n = 64
  draws = -(-rng.integers(1, 4097, size=(20000, n)) // 128)
  totals = draws.sum(axis=1)
  assert abs(paged.pool_pages(dist, 128, n, "mean") - totals.mean()) <= 2
  p99 = paged.pool_pages(dist, 128, n, "p99")
  assert abs(p99 - np.quantile(totals, 0.99)) <= 0.01 * p99  # The normal approximation.
  assert paged.pool_pages(LengthDistribution.parse("fixed:129"), 128, 5, "p99") == 10
  with pytest.raises(ValueError, match="demand must be one of"):
    paged.pool_pages(dist, 128, 1, "p50")


def dep(**kw):
  base = dict(num_layers=4, kv_heads=8, head_dim=128, vocab_size=32000,
              weights_per_device=2 * GIB, hbm_per_device=16 * GIB, data=2, model=4)
  return Deployment(**{**base, **kw})


@pytest.mark.parametrize("fmt", ["int8", "int4-sbf16-rot+sink4+recent252", "bf16"])
def test_max_requests_is_the_brute_force_boundary(fmt):
  d = dep()
  dist = LengthDistribution.parse("uniform:1:32768")
  measure = lambda f, b, s, z, p: paged.analytic_paged_usage(d, f, b, s, z, p)  # noqa: E731
  answer = paged.max_requests(d, fmt, dist, measure, page_len=128, demand="p99")
  assert answer.requests > 0 and answer.requests % 2 == 0
  assert answer.usage.total <= d.budget < answer.next_usage.total
  assert answer.next_requests == answer.requests + 2

  def fits(n):  # n requests, n / 2 per data shard, each shard its own pool and null page.
    pages = 2 * (1 + paged.pool_pages(dist, 128, n // 2, "p99"))
    return paged.analytic_paged_usage(d, fmt, n, 32768, 128, pages).total <= d.budget

  assert fits(answer.requests) and not fits(answer.requests + 2)
  assert answer.num_pages == 2 * (1 + paged.pool_pages(dist, 128, answer.requests // 2, "p99"))
  # The cache bytes are the pool's: a paged KVCache of that shape holds exactly them.
  cache = kvtpu.KVCache.layout(fmt, num_layers=4, batch=answer.requests, kv_heads=8,
                               max_len=answer.max_len, head_dim=128, page_len=128,
                               num_pages=answer.num_pages)
  total = sum(memory.array_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(cache))
  assert answer.usage.cache == kvtpu.sharding.per_device_bytes(
      fmt, num_layers=4, batch=answer.requests, kv_heads=8, max_len=answer.max_len,
      head_dim=128, data=2, model=4, page_len=128, num_pages=answer.num_pages)
  assert answer.usage.cache < total  # A device holds its block only.


def test_paging_serves_more_requests_than_slabs_of_the_longest_length():
  # With lengths uniform in [1, 32K], slabs reserve 32K per sequence; pages the lengths.
  d = dep()
  dist = LengthDistribution.parse("uniform:1:32768")
  measure = lambda f, b, s, z, p: paged.analytic_paged_usage(d, f, b, s, z, p)  # noqa: E731
  pages = paged.max_requests(d, "int8", dist, measure, page_len=128).requests
  slabs = kvtpu.headroom.max_concurrency(
      d, "int8", 32768, lambda f, b, s: kvtpu.headroom.analytic_usage(d, f, b, s)).concurrency
  assert 1.9 * slabs <= pages <= 2.1 * slabs  # Mean length ~ half the longest.
  fixed = paged.max_requests(d, "int8", LengthDistribution.parse("fixed:32768"), measure,
                             page_len=128).requests
  assert fixed == pytest.approx(slabs, abs=2)  # Equal lengths: pages are slabs.


def test_nothing_fits_is_zero_requests():
  d = dep(weights_per_device=16 * GIB)
  answer = paged.max_requests(d, "int8", LengthDistribution.parse("fixed:1024"),
                              lambda f, b, s, z, p: Usage(d.weights_per_device, 1, 0),
                              page_len=128)
  assert (answer.requests, answer.num_pages, answer.usage) == (0, 0, None)
  with pytest.raises(ValueError, match="page_len must be a positive int"):
    paged.max_requests(d, "int8", LengthDistribution.parse("fixed:8"), None, page_len=0)
  assert math.isfinite(answer.next_usage.total)


def test_sequence_sharded_pools_are_sized_for_the_first_devices_share():
  # 2 kv heads on 4 model devices: each device's pool holds its block of every request's
  # pages, sized for device 0's (each request's first W/M pages), against a simulation.
  d = dep(kv_heads=2, strategy="sequence")
  dist = LengthDistribution.parse("uniform:1:5000")  # 40 pages of 128 -> W = 40, 10 each.
  measure = lambda f, b, s, z, p: paged.analytic_paged_usage(d, f, b, s, z, p)  # noqa: E731
  answer = paged.max_requests(d, "int8", dist, measure, page_len=128)
  assert answer.max_len == 40 * 128 and answer.requests % 2 == 0
  per_shard = answer.requests // 2
  first = paged.pool_pages(dist, 128, per_shard, "mean", cap=10)
  assert answer.num_pages == 8 * (1 + first)
  rng = np.random.default_rng(1)
  draws = -(-rng.integers(1, 5001, size=(4000, per_shard)) // 128)
  bands = [np.clip(draws - 10 * m, 0, 10).sum(axis=1).mean() for m in range(4)]
  assert abs(first - bands[0]) <= 0.01 * first and bands == sorted(bands, reverse=True)
  assert answer.usage.cache == kvtpu.sharding.per_device_bytes(
      "int8", num_layers=4, batch=answer.requests, kv_heads=2, max_len=answer.max_len,
      head_dim=128, data=2, model=4, strategy="sequence", page_len=128,
      num_pages=answer.num_pages)
  assert answer.usage.total <= d.budget < answer.next_usage.total
  # Replicating the 2 heads on every device holds every page there: far fewer requests.
  rep = dep(kv_heads=2, strategy="replicate")
  replicated = paged.max_requests(rep, "int8", dist, lambda f, b, s, z, p: (
      paged.analytic_paged_usage(rep, f, b, s, z, p)), page_len=128).requests
  assert answer.requests > 2 * replicated  # Device 0 holds ~9 of a request's ~20 pages.

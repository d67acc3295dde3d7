"""The continuous-batching engine on the tiny random model.

Every request's greedy output must be what `generate` gives for its prompt alone (an
independent path: a contiguous cache, one request, its own prefill and decode loop),
whatever the traffic mixes into the same steps and however often the request is
preempted and recomputed; pages in use must equal what the live requests hold at every
step and return to zero; the step must compile two shapes, whatever the traffic.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from kvtpu.models import serving
from kvtpu.models.generation import Sampling, generate
from kvtpu.models.llama import Llama

from kvtpu.eval.traffic import Request, Trace
from kvtpu.sharding import CacheSharding
from tests.helpers import TINY

PAGE, CHUNK = 8, 8


@pytest.fixture(scope="module")
def model():
  return Llama(dataclasses.replace(TINY, num_layers=1), rngs=nnx.Rngs(1))


def make_trace(seed=0, n=7):
  """Ragged prompts (1 to 19 tokens: one, two and three chunks), budgets 1 to 12,
  arrivals close enough that requests share steps, two at the same instant."""
  rng = np.random.default_rng(seed)
  requests, t = [], 0.0
  for i in range(n):
    prompt = rng.integers(3, TINY.vocab_size, size=int(rng.integers(1, 20)))
    requests.append(Request(f"r{i}", t, prompt, int(rng.integers(1, 13))))
    t += 0.0 if i == 2 else float(rng.exponential(0.002))
  return Trace("test", "ragged requests", tuple(requests))


def burst(trace):
  """`trace` with every request arriving at 0 (in its order): the contention a test of
  preemption needs, whatever this machine's step times (which advance the clock)."""
  return Trace(trace.name, f"{trace.description}, all at 0", tuple(
      dataclasses.replace(r, arrival_s=0.0) for r in trace.requests))


def alone_outputs(model, fmt):
  """Each request's greedy output from `generate` alone."""
  return {r.id: generate(model, [list(r.prompt)], max_new_tokens=r.max_new_tokens,
                         kv_format=fmt, impl="xla").tokens[0]
          for r in make_trace().requests}


@pytest.fixture(scope="module")
def alone(model):
  return alone_outputs(model, "bf16")


def engine(model, **kw):
  args = dict(kv_format="bf16", slots=3, num_pages=1 + 3 * 4, page_len=PAGE, max_len=4 * PAGE,
              chunk=CHUNK, impl="xla")
  return serving.Engine(model, **{**args, **kw})


def test_outputs_equal_each_request_alone_and_pages_return(model, alone):
  result = engine(model).run(make_trace(), check_pages=True)
  assert {s.request.id: s.tokens for s in result.requests} == alone
  assert result.preemptions == 0 and result.compiled_shapes == 2
  peak, mean = result.concurrency()
  assert peak == 3 and 1 <= mean <= 3  # Three slots, filled.
  # Steps mixed prefill chunks and decode tokens.
  assert any(s.prefill_tokens and s.decode_tokens for s in result.steps)
  assert {s.width for s in result.steps} == {1, CHUNK}
  for s in result.requests:
    assert s.request.arrival_s <= s.admitted_s < s.first_token_s <= s.finished_s
    assert s.ttft_s > 0 and not s.stopped
  assert result.generated_tokens == sum(len(t) for t in alone.values())
  assert result.tokens_per_s() > 0


# Quantized K/V per token (int8), a rotated 4-bit scheme with sink and recent windows
# (per-slot arrays beside the pool), keys and values in different precisions.
@pytest.mark.parametrize("fmt", ["int8", "int4-asym-sbf16-rot+sink2+recent8", "k8v4"])
def test_every_format_serves_what_it_gives_alone(model, fmt):
  result = engine(model, kv_format=fmt, num_pages=8).run(burst(make_trace()), check_pages=True)
  assert result.preemptions > 0  # Recompute restores the windows too.
  assert {s.request.id: s.tokens for s in result.requests} == alone_outputs(model, fmt)


def test_preemption_recomputes_to_the_same_outputs(model, alone):
  # 6 usable pages of 8 positions for 3 slots: requests of up to 31 positions cannot all
  # grow at once, so the newest is preempted and recomputed.
  result = engine(model, num_pages=7).run(burst(make_trace()), check_pages=True)
  assert result.preemptions > 0
  assert {s.request.id: s.tokens for s in result.requests} == alone
  assert max(s.pages_in_use for s in result.steps) <= 6
  assert sum(s.preempted for s in result.steps) == result.preemptions
  # The live request that arrived last goes first: the first to arrive never does.
  assert result.requests[0].preemptions == 0


def test_the_step_compiles_two_shapes_whatever_the_traffic(model):
  # Shapes no other test uses (the jitted step is shared by engines of equal shapes).
  before = serving.TRACE_COUNTS.copy()
  eng = engine(model, slots=2, chunk=4, num_pages=1 + 2 * 4)
  assert serving.TRACE_COUNTS - before == {4: 1, 1: 1}
  compiled = serving.TRACE_COUNTS.copy()
  for seed in (1, 2):
    eng.run(make_trace(seed, n=9))
  assert serving.TRACE_COUNTS == compiled


def test_stop_ids_and_exact_lengths(model, alone):
  trace = make_trace()
  r = next(r for r in trace.requests if len(alone[r.id]) >= 4)
  stop = alone[r.id][2]
  first = alone[r.id].index(stop)
  exact = dataclasses.replace(r, id="exact", exact_length=True)
  result = engine(model, stop_ids=[stop]).run(Trace("t", "", (r, exact)))
  stopped, ran = result.requests
  assert stopped.tokens == alone[r.id][:first + 1] and stopped.stopped
  assert ran.tokens == alone[r.id] and not ran.stopped


def test_requests_it_can_never_serve_are_refused(model):
  eng = engine(model, num_pages=4)  # 3 usable pages: 24 positions.
  long = Trace("t", "", (Request("a", 0.0, np.arange(3, 33), 4),))
  with pytest.raises(ValueError, match=r"request 'a' needs 34 positions \(prompt 30 \+ budget 4\), more than max_len=32"):
    engine(model).run(long)
  big = Trace("t", "", (Request("b", 0.0, np.arange(3, 23), 6),))
  with pytest.raises(ValueError, match="request 'b' needs 4 pages, more than the pool's 3"):
    eng.run(big)
  with pytest.raises(ValueError, match="slots must be an int >= 1"):
    engine(model, slots=0)
  with pytest.raises(ValueError, match="max_len=128 exceeds the model's 64 positions"):
    engine(model, max_len=128)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, alone):
  trace = make_trace()
  top1 = engine(model, sampling=Sampling(temperature=1.0, top_k=1)).run(trace)
  assert {s.request.id: s.tokens for s in top1.requests} == alone
  hot = Sampling(temperature=2.0)
  # Each token's key is the seed's folded with (request, token index): the same draws
  # whatever the schedule (which follows measured step times), the batch or preemption.
  runs = [engine(model, sampling=hot, seed=seed, **kw).run(burst(trace) if kw else trace)
          for seed, kw in ((5, {}), (5, dict(num_pages=7, slots=2)), (6, {}))]
  assert runs[1].preemptions > 0
  a, b, c = ({s.request.id: s.tokens for s in r.requests} for r in runs)
  assert a == b and a != c and a != alone
  assert all(len(a[r.id]) == r.max_new_tokens for r in trace.requests)  # No stop ids.


def test_summary_figures_follow_from_the_records(model):
  result = engine(model, num_pages=7).run(burst(make_trace()))
  row = result.summary()
  steps = result.steps
  first = next(i for i, s in enumerate(steps) if s.preempted)
  before = steps[:first]
  # Time-weighted means by hand.
  assert row["mean_concurrency_before_preemption"] == pytest.approx(
      sum(s.live * s.seconds for s in before) / sum(s.seconds for s in before))
  assert row["peak_concurrency_before_preemption"] == max(s.live for s in before)
  assert row["mean_concurrency"] == pytest.approx(
      sum(s.live * s.seconds for s in steps) / sum(s.seconds for s in steps))
  waited = [s for s in steps if s.waiting]
  assert waited and row["mean_concurrency_saturated"] == pytest.approx(
      sum(s.live * s.seconds for s in waited) / sum(s.seconds for s in waited))
  assert row["saturated_seconds"] == pytest.approx(sum(s.seconds for s in waited))
  ttft = sorted(s.first_token_s - s.request.arrival_s for s in result.requests)
  assert row["ttft_p50_s"] == pytest.approx(np.median(ttft))
  assert ttft[0] <= row["ttft_p99_s"] <= ttft[-1]
  assert row["preemptions"] == sum(s.preempted for s in steps) > 0
  assert row["peak_pages"] <= 6 and row["requests"] == 7 and row["compiled_shapes"] == 2
  assert row["tokens_per_s"] == pytest.approx(row["generated_tokens"] / row["duration_s"])
  # Each request's prompt and every output token but the last went through the model;
  # recompute after preemption feeds some again.
  needed = sum(s.request.prompt_len + len(s.tokens) - 1 for s in result.requests)
  assert sum(s.prefill_tokens + s.decode_tokens for s in steps) > needed
  ample = engine(model).run(make_trace())
  assert sum(s.prefill_tokens + s.decode_tokens for s in ample.steps) == needed
  assert sum(s.decode_tokens for s in ample.steps) == sum(len(s.tokens) - 1 for s in ample.requests)


def test_compare_outputs_finds_the_first_difference():
  def result(outputs):
    served = [serving.Served(Request(rid, 0.0, np.array([3]), 9), tokens=t)
              for rid, t in outputs.items()]
    return serving.ServeResult(served, [], 2)

  ref = result({"a": [1, 2, 3], "b": [4, 5], "c": [6, 7, 8], "d": [9]})
  got = result({"a": [1, 2, 3], "b": [4, 6], "c": [6, 7], "d": [2, 2]})
  out = serving.compare_outputs(ref, got)
  assert out["identical"] == 1 and out["share_identical"] == 0.25
  assert out["first_difference"] == {"b": 1, "c": 2, "d": 0}
  assert out["median_first_difference"] == 1.0
  with pytest.raises(ValueError, match="served different requests"):
    serving.compare_outputs(ref, result({"a": [1]}))


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-sbf16-rot+sink4+recent16"])
def test_pages_for_budget_is_the_largest_pool_that_fits(fmt):
  from kvtpu import KVCache
  dims = dict(slots=5, page_len=16, max_len=64)
  whole = KVCache.init(fmt, num_layers=TINY.num_layers, batch=5, kv_heads=TINY.num_kv_heads,
                       max_len=64, head_dim=TINY.head_dim, page_len=16, num_pages=40).nbytes
  for budget in (whole, whole + 1, whole - 1):
    n = serving.pages_for_budget(fmt, TINY, cache_bytes=budget, **dims)
    size = lambda p: KVCache.init(  # noqa: E731
        fmt, num_layers=TINY.num_layers, batch=5, kv_heads=TINY.num_kv_heads, max_len=64,
        head_dim=TINY.head_dim, page_len=16, num_pages=p).nbytes
    assert size(n) <= budget < size(n + 1)
    assert n == (40 if budget >= whole else 39)
  small = KVCache.init(fmt, num_layers=TINY.num_layers, batch=5, kv_heads=TINY.num_kv_heads,
                       max_len=64, head_dim=TINY.head_dim, page_len=16, num_pages=2).nbytes
  with pytest.raises(ValueError, match=r"5 slots and two pages of 16 positions take .* MiB"):
    serving.pages_for_budget(fmt, TINY, cache_bytes=small - 1, **dims)


@pytest.mark.parametrize("strategy, blocks", [("heads", 2), ("sequence", 4)])
def test_pages_for_budget_on_a_mesh_counts_one_device(strategy, blocks):
  from kvtpu.sharding import per_device_bytes
  dims = dict(slots=4, page_len=16, max_len=64)
  size = lambda p: per_device_bytes(  # noqa: E731
      "int8", num_layers=TINY.num_layers, batch=4, kv_heads=TINY.num_kv_heads, max_len=64,
      head_dim=TINY.head_dim, data=2, model=2, strategy=strategy, page_len=16, num_pages=p)
  budget = size(blocks * 10) + 1
  n = serving.pages_for_budget("int8", TINY, cache_bytes=budget, data=2, model=2,
                               strategy=strategy, **dims)
  assert n == blocks * 10 and size(n + blocks) > budget
  with pytest.raises(ValueError, match="two pages per block"):
    serving.pages_for_budget("int8", TINY, cache_bytes=size(2 * blocks) - 1, data=2, model=2,
                             strategy=strategy, **dims)


def test_the_clock_waits_for_arrivals(model):
  # Nothing arrives before 5 s, and nothing between the two bursts: the clock jumps.
  trace = Trace("t", "", (Request("a", 5.0, np.array([5, 6, 7]), 3),
                          Request("b", 9.0, np.array([8, 9]), 2)))
  result = engine(model).run(trace, check_pages=True)
  a, b = result.requests
  assert a.admitted_s == 5.0 and b.admitted_s == 9.0 and a.finished_s < 9.0
  assert result.steps[0].start_s == 5.0
  assert result.duration_s == pytest.approx(result.steps[-1].start_s + result.steps[-1].seconds - 5.0)
  assert result.concurrency("saturated") == (0, 0.0)  # Nobody ever waited.
  with pytest.raises(ValueError, match="window must be"):
    result.concurrency("busy")


def test_bad_tokens_and_chunks_are_refused(model):
  eng = engine(model)
  bad = Trace("t", "", (Request("v", 0.0, np.array([3, TINY.vocab_size]), 2),))
  with pytest.raises(ValueError, match="request 'v' holds token id 97, outside the model's "
                     "vocabulary of 97"):
    eng.run(bad)
  with pytest.raises(ValueError, match="chunk=64 must be <= max_len=32"):
    engine(model, chunk=64)
  # The last generated token is never written: prompt + budget - 1 positions.
  fits = Trace("t", "", (Request("f", 0.0, np.arange(3, 20), 8),))  # 24 positions: 3 pages.
  result = engine(model, num_pages=4).run(fits, check_pages=True)
  assert len(result.requests[0].tokens) == 8


# Slots over the data axis (each data shard with its own block of the pool), kv heads or
# positions over the model axis, weights tensor-parallel: the same outputs as alone, with
# preemption inside a data shard, pages accounted per block every step.
@pytest.mark.parametrize("strategy, fmt", [("heads", "bf16"), ("sequence", "int8")])
def test_sharded_engine_serves_what_it_gives_alone(model, alone, strategy, fmt):
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sh = CacheSharding(mesh, strategy=strategy)
  want = alone if fmt == "bf16" else alone_outputs(model, fmt)
  # 4 slots, two per data shard; each shard has 2 (heads) or 2 x 2 (sequence) blocks.
  blocks = 2 if strategy == "heads" else 4
  ample = engine(model, kv_format=fmt, slots=4, num_pages=blocks * 9, cache_sharding=sh)
  result = ample.run(burst(make_trace()), check_pages=True)
  assert {s.request.id: s.tokens for s in result.requests} == want
  assert result.preemptions == 0 and result.compiled_shapes == 2
  assert max(s.live for s in result.steps) == 4
  # The cache kept its sharded layout through every step (the pool over the data axis,
  # and over the model axis too under "sequence").
  specs = jax.tree.leaves(sh.specs(ample.cache), is_leaf=lambda x: isinstance(x, P))
  for x, spec in zip(jax.tree.leaves(ample.cache), specs, strict=True):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
  pool = ample.cache.k.values.sharding
  assert len(pool.device_set) == 4 and not pool.is_fully_replicated
  # A request's longest context takes 4 pages of a block (with "sequence": its first two
  # pages in one block, its next two in the other). With 4 (3) usable pages per block,
  # two slots per data shard cannot both grow: a shard runs out and preempts its newest.
  per_block = 4 if strategy == "heads" else 2
  tight = engine(model, kv_format=fmt, slots=4, num_pages=blocks * 5 if strategy == "heads"
                 else blocks * 4, cache_sharding=sh)
  result = tight.run(burst(make_trace()), check_pages=True)
  assert result.preemptions > 0
  assert {s.request.id: s.tokens for s in result.requests} == want
  with pytest.raises(ValueError, match="pages of one block, more than a pool block's"):
    engine(model, kv_format=fmt, slots=4, num_pages=blocks * per_block,
           cache_sharding=sh).check(
        make_trace())
  explicit = CacheSharding(jax.make_mesh((2, 2), ("data", "model")), strategy=strategy)
  with pytest.raises(ValueError, match="cache_sharding.mesh must have Auto axes"):
    engine(model, slots=4, num_pages=blocks * 9, cache_sharding=explicit)


def test_lockstep_schedules_by_the_trace_alone(model, alone):
  # Groups of 3 arriving together on a pool that holds them: outputs as alone, no wait,
  # and the same steps (shapes, rows, tokens) whatever the format or the clock.
  trace = make_trace()
  runs = {fmt: serving.lockstep(model, trace, kv_format=fmt, slots=3, page_len=PAGE,
                                max_len=4 * PAGE, chunk=CHUNK, impl="xla")
          for fmt in ("bf16", "int4-sbf16-rot")}
  bf16, int4 = runs.values()
  assert {s.request.id: s.tokens for s in bf16.requests} == alone
  assert [s.request.id for s in bf16.requests] == [r.id for r in trace.requests]
  shape = lambda r: [(s.width, s.live, s.prefill_tokens, s.decode_tokens) for s in r.steps]  # noqa: E731
  assert shape(bf16) == shape(int4)
  assert all(s.waiting == 0 and s.preempted == 0 for s in bf16.steps)
  assert max(s.live for s in bf16.steps) == 3 and bf16.preemptions == 0
  # Sampled: each request keeps its serving keys (its arrival index in the whole trace),
  # so lockstep in groups draws what serving draws.
  hot = dict(sampling=Sampling(temperature=2.0), seed=3)
  served = engine(model, slots=3, **hot).run(trace)
  grouped = serving.lockstep(model, trace, kv_format="bf16", slots=3, page_len=PAGE,
                             max_len=4 * PAGE, chunk=CHUNK, impl="xla", **hot)
  assert ({s.request.id: s.tokens for s in grouped.requests}
          == {s.request.id: s.tokens for s in served.requests} != alone)

"""The headroom solver: exact analytic bytes, answers on the boundary (the found point fits,
the next does not) as a brute-force scan finds them, few measurements per answer, and clear
errors for configurations that cannot be sized."""

import dataclasses
import math

import pytest

import kvtpu
from kvtpu import accelerators
from kvtpu import headroom as hr
from tests.helpers import covering_cases

GIB = 2**30
FORMATS = ("bf16", "int8", "int4", "fp8_e4m3")
# Bytes per stored value, and whether the format adds an f32 scale per token and kv head.
VALUE_BYTES = {"bf16": 2, "int8": 1, "int4": 0.5, "fp8_e4m3": 1}
SCALED = {"bf16": False, "int8": True, "int4": True, "fp8_e4m3": True}

# Llama-3.1-8B's shape; its bf16 weights tensor-parallel over model:4 (models/headroom.py's
# `deployment`, checked in tests/models/test_headroom.py).
LLAMA = dict(num_layers=32, kv_heads=8, head_dim=128, vocab_size=128256)
LLAMA_WEIGHTS_TP4 = 4016062464


def llama_v5e8(**kw) -> hr.Deployment:
  return hr.Deployment(**LLAMA, weights_per_device=LLAMA_WEIGHTS_TP4, hbm_per_device=16 * GIB,
                       data=2, model=4, **kw)


def small(**kw) -> hr.Deployment:
  """A deployment small enough to scan every point by brute force."""
  args = dict(num_layers=2, kv_heads=2, head_dim=64, vocab_size=1000, weights_per_device=300_000,
              hbm_per_device=4 * 2**20, data=1, model=1)
  return hr.Deployment(**{**args, **kw})


def hand_cache_bytes(fmt, *, layers, kv_heads, head_dim, seqs, max_len) -> int:
  """The seed formula, per device: K and V values, their per-token f32 scales, the
  per-layer counters (5 counters x 2 u32 words) and 6 bytes (length, overflow flag, error
  bits) a sequence."""
  tokens = seqs * max_len
  values = 2 * layers * kv_heads * head_dim * VALUE_BYTES[fmt] * tokens
  scales = 2 * layers * kv_heads * 4 * tokens if SCALED[fmt] else 0
  return int(values) + scales + layers * 5 * 2 * 4 + 6 * seqs


class Counting:
  """A measure that counts its calls (analytic bytes unless `usage` is given)."""

  def __init__(self, dep=None, usage=None):
    self.dep, self.usage, self.calls = dep, usage, []

  def __call__(self, fmt, batch, max_len):
    self.calls.append((batch, max_len))
    if self.usage is not None:
      return self.usage(batch, max_len)
    return hr.analytic_usage(self.dep, fmt, batch, max_len)


def fits(dep, usage) -> bool:
  return usage is not None and not usage.oom and usage.total <= dep.budget


# ------------------------------------------------------------------ analytic bytes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch,max_len", [(8, 4096), (32, 131072), (2, 128)])
def test_analytic_cache_bytes_are_the_seed_formula(fmt, batch, max_len):
  dep = llama_v5e8()
  u = hr.analytic_usage(dep, fmt, batch, max_len)
  # data:2 model:4: each device holds batch / 2 sequences and 8 / 4 = 2 kv heads.
  assert u.cache == hand_cache_bytes(fmt, layers=32, kv_heads=2, head_dim=128, seqs=batch // 2,
                                     max_len=max_len)
  assert u.weights == LLAMA_WEIGHTS_TP4
  # f32 logits for this device's sequences over its quarter of the vocabulary.
  assert u.temp == batch // 2 * (128256 // 4) * 4
  assert u.other == 0 and not u.oom
  assert u.total == u.weights + u.cache + u.temp

  # Unsharded: every sequence and all 8 kv heads on the one device.
  one = hr.Deployment(**LLAMA, weights_per_device=0, hbm_per_device=16 * GIB)
  assert hr.analytic_usage(one, fmt, batch, max_len).cache == hand_cache_bytes(
      fmt, layers=32, kv_heads=8, head_dim=128, seqs=batch, max_len=max_len)


def test_analytic_bytes_of_replicated_heads_and_an_indivisible_vocabulary():
  # 8 kv heads on a model axis of 3: every model device holds all 8 (strategy
  # "replicate"), and 128256 = 3 * 42752 splits the logits; 1000 over 3 does not.
  dep = hr.Deployment(**LLAMA, weights_per_device=0, hbm_per_device=16 * GIB, data=2, model=3)
  assert dep.resolved_strategy == "replicate"
  u = hr.analytic_usage(dep, "int8", 4, 1024)
  assert u.cache == hand_cache_bytes("int8", layers=32, kv_heads=8, head_dim=128, seqs=2,
                                     max_len=1024)
  assert u.temp == 2 * 42752 * 4
  odd = small(vocab_size=1000, model=3, kv_heads=3)
  assert hr.analytic_usage(odd, "bf16", 1, 128).temp == 1000 * 4


def test_tpu_temporaries_include_the_copies_of_bf16_scales():
  # Per device at data:2, model:4: 2 sequences, 2 kv heads. A bf16 scale of one group
  # is copied padded to two groups, for K and V; float32 scales are not copied.
  dep, gpu = llama_v5e8(), llama_v5e8(tpu=False)
  logits = 2 * 32064 * 4
  copies = 2 * 32 * 2 * 2 * 2 * 1024 * 2  # K and V x [L, B, K, 2, S] x 2 bytes.
  assert hr.analytic_usage(dep, "int8-sbf16", 4, 1024).temp == logits + copies
  assert hr.analytic_usage(gpu, "int8-sbf16", 4, 1024).temp == logits
  assert hr.analytic_usage(dep, "int8", 4, 1024).temp == logits
  assert hr.analytic_usage(dep, "int8-sbf16", 4, 1024).cache == hr.analytic_usage(
      gpu, "int8-sbf16", 4, 1024).cache


def test_budget_is_hbm_less_the_reserve():
  assert llama_v5e8().budget == int(16 * GIB * 0.95)
  assert llama_v5e8(reserve=0.0).budget == 16 * GIB


# ------------------------------------------------------------------ answers on the boundary


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("concurrency", [1, 8, 32, 128])
def test_max_context_is_the_last_block_that_fits(fmt, concurrency):
  dep = llama_v5e8()
  measure = Counting(dep)
  a = hr.max_context(dep, fmt, concurrency, measure)
  assert a.kind == "max_context" and a.concurrency == concurrency
  assert a.batch == a.next_batch == hr.padded_batch(concurrency, 2)
  assert a.max_len > 0 and a.max_len % 128 == 0 and a.context == a.max_len
  assert a.usage == hr.analytic_usage(dep, fmt, a.batch, a.max_len)
  assert a.usage.total <= dep.budget
  assert a.next_max_len == a.max_len + 128
  assert a.next_usage == hr.analytic_usage(dep, fmt, a.batch, a.max_len + 128)
  assert a.next_usage.total > dep.budget
  # The analytic usage is affine in max_len: two points, the crossing, the point past it.
  assert len(measure.calls) <= 4, measure.calls


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("context", [8192, 32768, 131072])
def test_max_concurrency_is_the_last_data_step_that_fits(fmt, context):
  dep = llama_v5e8()
  measure = Counting(dep)
  a = hr.max_concurrency(dep, fmt, context, measure)
  assert a.kind == "max_concurrency" and a.context == a.max_len == a.next_max_len == context
  assert a.batch == a.concurrency and a.batch > 0 and a.batch % 2 == 0
  assert a.usage == hr.analytic_usage(dep, fmt, a.batch, context)
  assert a.usage.total <= dep.budget
  assert a.next_batch == a.batch + 2
  assert a.next_usage == hr.analytic_usage(dep, fmt, a.batch + 2, context)
  assert a.next_usage.total > dep.budget
  assert len(measure.calls) <= 4, measure.calls


def brute_max(dep, total_at, limit: int) -> int:
  """The largest m in [1, limit] whose total fits, scanning every m (0 if none)."""
  best = 0
  for m in range(1, limit + 1):
    if total_at(m) <= dep.budget:
      best = m
  return best


def _scan_cases(name, meshes, axis, values):
  """Every format on every mesh, each with one of `values` (`covering_cases`)."""
  cases = covering_cases(name, full={"fmt": FORMATS, "mesh": meshes}, sampled={axis: values})
  return [(c["fmt"], *c["mesh"], c[axis]) for c in cases]


@pytest.mark.parametrize("fmt,data,model,concurrency", _scan_cases(
    "test_max_context_equals_a_brute_force_scan", [(1, 1), (2, 2), (2, 4)], "concurrency",
    [1, 3, 8]))
def test_max_context_equals_a_brute_force_scan(fmt, data, model, concurrency):
  dep = small(data=data, model=model, kv_heads=4)
  block, limit = 16, 1 << 15
  batch = hr.padded_batch(concurrency, data)
  expect = brute_max(dep, lambda m: hr.analytic_usage(dep, fmt, batch, m * block).total,
                     limit // block)
  assert 0 < expect < limit // block
  a = hr.max_context(dep, fmt, concurrency, Counting(dep), block=block, limit=limit)
  assert (a.batch, a.max_len, a.next_max_len) == (batch, expect * block, (expect + 1) * block)


@pytest.mark.parametrize("fmt,data,model,context", _scan_cases(
    "test_max_concurrency_equals_a_brute_force_scan", [(1, 1), (2, 2), (4, 1)], "context",
    [128, 1000, 4096]))
def test_max_concurrency_equals_a_brute_force_scan(fmt, data, model, context):
  dep = small(data=data, model=model, kv_heads=4, hbm_per_device=64 * 2**20)
  limit = 1 << 12
  expect = brute_max(dep, lambda m: hr.analytic_usage(dep, fmt, m * data, context).total,
                     limit // data)
  assert 0 < expect < limit // data
  a = hr.max_concurrency(dep, fmt, context, Counting(dep), limit=limit)
  assert (a.batch, a.next_batch) == (expect * data, (expect + 1) * data)


def test_padded_batch_is_a_multiple_of_the_data_axis():
  assert [hr.padded_batch(c, 4) for c in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
  assert hr.padded_batch(7, 1) == 7


def test_nothing_fits_gives_zero_without_usage():
  budget = llama_v5e8().budget
  # Weights alone past the budget; weights filling it exactly (no room for any cache).
  for weights in (16 * GIB + 1, budget + 1, budget):
    dep = hr.Deployment(**LLAMA, weights_per_device=weights, hbm_per_device=16 * GIB, data=2,
                        model=4)
    a = hr.max_context(dep, "int4", 8, Counting(dep))
    assert (a.max_len, a.context, a.usage) == (0, 0, None)
    assert a.next_max_len == 128 and not fits(dep, a.next_usage)
    a = hr.max_concurrency(dep, "int4", 8192, Counting(dep))
    assert (a.batch, a.concurrency, a.usage) == (0, 0, None)
    assert a.next_batch == 2 and not fits(dep, a.next_usage)


def test_reaching_the_limit_returns_the_limit():
  dep = small(hbm_per_device=1 << 40)
  a = hr.max_context(dep, "int8", 4, Counting(dep), block=128, limit=128 * 1000)
  assert a.max_len == 128 * 1000 and fits(dep, a.usage)
  assert a.next_max_len == 128 * 1001 and a.next_usage is None
  a = hr.max_concurrency(dep, "int8", 1024, Counting(dep), limit=300)
  assert a.batch == 300 and a.next_usage is None
  # The default limits: 16M positions, 65536 sequences.
  a = hr.max_context(dep, "int4", 1, Counting(dep))
  assert a.max_len == hr.MAX_CONTEXT_LIMIT and a.next_usage is None
  assert hr.max_concurrency(dep, "int4", 128, Counting(dep)).batch == hr.MAX_BATCH_LIMIT


def test_bad_search_arguments_are_clear_errors():
  dep = small()
  with pytest.raises(ValueError, match="block must be a positive int"):
    hr.max_context(dep, "int8", 1, Counting(dep), block=0)
  with pytest.raises(ValueError, match="limit must be >= 1"):
    hr.max_context(dep, "int8", 1, Counting(dep), block=128, limit=100)
  with pytest.raises(ValueError, match="limit must be >= 1"):
    hr.max_fit(lambda m: hr.Usage(0, m, 0), 10, limit=0)


# ------------------------------------------------------------------ max_fit


def counting(fn):
  calls = []

  def total_at(m):
    calls.append(m)
    return fn(m)

  return total_at, calls


def affine(m):
  return hr.Usage(weights=1_000_003, cache=7919 * m, temp=13)


@pytest.mark.parametrize("guess_offset", [-3, -1, 0, 1, 5])
@pytest.mark.parametrize("boundary", [1, 2, 57, 1234])
def test_max_fit_finds_affine_usage_in_four_measurements(boundary, guess_offset):
  budget = affine(boundary).total + 7918  # one byte short of boundary + 1.
  total_at, calls = counting(affine)
  m, u, m_next, u_next = hr.max_fit(total_at, budget, guess=max(1, boundary + guess_offset),
                                    limit=10_000)
  assert (m, m_next) == (boundary, boundary + 1)
  assert u == affine(boundary) and u_next == affine(boundary + 1)
  assert len(calls) <= 4, calls
  assert len(set(calls)) == len(calls), f"measured a point twice: {calls}"


def test_max_fit_from_a_poor_guess_is_still_few_measurements():
  budget = affine(5000).total
  for guess in (1, 100_000):
    total_at, calls = counting(affine)
    assert hr.max_fit(total_at, budget, guess=guess, limit=1 << 20)[0] == 5000
    assert len(calls) <= 4, (guess, calls)


def stepped(period: int, slope: int, base: int):
  """Usage padded to `period`: constant over each run of `period` points."""
  return lambda m: hr.Usage(weights=base, cache=slope * period * math.ceil(m / period), temp=0)


@pytest.mark.parametrize("period", [2, 7, 64, 500, 2000])
def test_max_fit_on_step_shaped_usage_is_exact_and_bisects(period, rng):
  for _ in range(40):
    fn = stepped(period, int(rng.integers(1, 1000)), int(rng.integers(0, 10**6)))
    budget = int(rng.integers(0, 10**6 + 1000 * 5000))
    limit = int(rng.choice([10, 1000, 5000]))
    guess = int(rng.integers(1, 3000))
    total_at, calls = counting(fn)
    m, u, m_next, u_next = hr.max_fit(total_at, budget, guess=guess, limit=limit)
    expect = max([k for k in range(1, limit + 1) if fn(k).total <= budget], default=0)
    assert (m, m_next) == (expect, expect + 1), (period, budget, limit, guess)
    assert u == (fn(m) if m else None)
    assert u_next == (fn(m_next) if m_next <= limit else None)
    # Interpolation plus bisection, not a walk of one point per measurement.
    assert len(calls) <= 2 * math.ceil(math.log2(limit + 1)) + 4, (period, calls)


def test_max_fit_does_not_walk_along_a_step():
  # The line through two points of a step function points just past the failing end
  # again and again; each measurement must still halve the bracket. (It walked down
  # 1745, 1744, ..., 1728 here, a measurement per point.)
  fn = stepped(64, 806, 448522)
  total_at, calls = counting(fn)
  m, *_ = hr.max_fit(total_at, 1863667, guess=1625, limit=1 << 17)
  assert m == 1728
  assert len(calls) <= 14, calls


def test_oom_measurements_do_not_fit():
  # The measure runs out of memory from m = 40 on although its byte figures would fit.
  def fn(m):
    return hr.Usage(weights=0, cache=m, temp=0, oom=m >= 40)

  for guess in (1, 39, 40, 1000):
    total_at, calls = counting(fn)
    m, u, m_next, u_next = hr.max_fit(total_at, 10**9, guess=guess, limit=1 << 16)
    assert (m, m_next) == (39, 40) and not u.oom and u_next.oom
    assert len(calls) <= 2 * 17 + 4, calls
  # Out of memory everywhere: nothing fits, and the failing point is reported.
  m, u, m_next, u_next = hr.max_fit(lambda m: hr.Usage(0, 0, 0, oom=True), 10, limit=100)
  assert (m, u, m_next) == (0, None, 1) and u_next.oom


def test_max_context_treats_oom_points_as_not_fitting():
  dep = small()

  def measure(fmt, batch, max_len):
    u = hr.analytic_usage(dep, fmt, batch, max_len)
    return hr.Usage(u.weights, u.cache, u.temp, oom=max_len > 512)

  a = hr.max_context(dep, "int8", 2, measure, block=128)
  assert a.max_len == 512 and a.next_usage.oom and not a.usage.oom


def test_sweep_answers_every_question_and_uses_guesses():
  dep = llama_v5e8()
  seen = []
  out = hr.sweep(dep, ["bf16", "int4"], Counting(dep), concurrencies=(1, 8),
                 contexts=(8192,), progress=lambda a, f: seen.append((f.name, a.kind)))
  assert [(f.name, a.kind) for f, a in out] == seen == [
      (f, k) for f in ("bf16", "int4")
      for k in ("max_context", "max_context", "max_concurrency")]
  for f, a in out:
    if a.kind == "max_context":
      assert a == hr.max_context(dep, f, a.concurrency, Counting(dep))
    else:
      assert a == hr.max_concurrency(dep, f, a.context, Counting(dep))
  # Seeded with the answers, each question takes two measurements: it and the next point.
  guesses = {(f.name, a.kind, a.concurrency if a.kind == "max_context" else a.context):
             (a.max_len if a.kind == "max_context" else a.batch) for f, a in out}
  measure = Counting(dep)
  again = hr.sweep(dep, ["bf16", "int4"], measure, concurrencies=(1, 8), contexts=(8192,),
                   guesses=guesses)
  assert again == out
  assert len(measure.calls) == 2 * len(out)


# ------------------------------------------------------------------ capacity


@pytest.mark.parametrize("concurrency", [8, 32])
def test_quantized_formats_hold_twice_and_four_times_the_tokens(concurrency):
  dep = llama_v5e8()
  tokens = {}
  for fmt in FORMATS:
    a = hr.max_context(dep, fmt, concurrency, Counting(dep))
    tokens[fmt] = a.batch * a.max_len
  assert tokens["bf16"] > 0
  for fmt in ("int8", "fp8_e4m3"):
    assert tokens[fmt] >= 1.9 * tokens["bf16"], tokens
  assert tokens["int4"] >= 3.6 * tokens["bf16"], tokens


# ------------------------------------------------------------------ bad configurations


@pytest.mark.parametrize("field,value,match", [
    ("data", 0, "data must be a positive int, got data=0"),
    ("model", 0, "model must be a positive int, got model=0"),
    ("num_layers", 2.0, "num_layers must be a positive int"),
    ("kv_heads", True, "kv_heads must be a positive int"),
    ("weights_per_device", -1, "weights_per_device must be an int >= 0"),
    ("reserve", 1.0, r"reserve must be a fraction of HBM in \[0, 1\), got reserve=1.0"),
    ("reserve", -0.1, "reserve must be a fraction"),
    ("strategy", "rows", "strategy must be one of"),
    ("tpu", 1, "tpu must be a bool, got tpu=1"),
])
def test_bad_deployments_are_clear_errors(field, value, match):
  with pytest.raises(ValueError, match=match):
    small(**{field: value})


def test_heads_strategy_needs_a_model_axis_dividing_kv_heads():
  with pytest.raises(ValueError, match="model axis has 2 devices and the cache has kv_heads=3"):
    small(kv_heads=3, model=2, strategy="heads")
  assert small(kv_heads=3, model=2).resolved_strategy == "replicate"
  assert small(kv_heads=4, model=2).resolved_strategy == "heads"


@pytest.mark.parametrize("name,match", [
    ("v9-8", "unknown accelerator name='v9'; known:"),
    ("v5e-6", r"no v5e slice of 6 chips; known chip counts: \[1, 4, 8, 16"),
    ("v5p-3", "counts TensorCores .2 per chip., so N must be even"),
    ("v5e-x", "expected <chip>-<count>"),
    ("v5e-0", "positive count"),
    ("v5p-12", r"no v5p slice of 6 chips; known chip counts: \[1, 4, 8"),
])
def test_bad_slices_are_clear_errors(name, match):
  with pytest.raises(ValueError, match=match):
    accelerators.parse_slice(name)


@pytest.mark.parametrize("name,chip,chips,topology", [
    ("v5e-8", "v5e", 8, "v5e:2x4"),
    ("v5e-4", "v5e", 4, "v5e:2x2"),
    ("v5p-8", "v5p", 4, "v5p:2x2x1"),
    ("v4-16", "v4", 8, "v4:2x2x2"),
    ("v5e-256", "v5e", 256, "v5e:16x16"),
    ("v6e", "v6e", 1, "v6e:1x1"),
    ("V5litepod-16", "v5e", 16, "v5e:4x4"),
    ("h200-8", "h200", 8, None),
])
def test_parse_slice(name, chip, chips, topology):
  s = accelerators.parse_slice(name)
  assert (s.name, s.chip.name, s.num_chips, s.topology) == (name, chip, chips, topology)


def test_windows_are_counted_per_sequence_and_rows_carry_effective_bits():
  """A recent window costs 2 x 128 x (K/M heads) x H x 2 bytes per sequence and layer on a
  device, whatever the context; every result row states the format's effective bits."""
  dep = llama_v5e8()
  base, windowed = "int4-asym-rot", "int4-asym-rot+recent128"
  for batch, max_len in ((2, 1024), (8, 8192)):
    extra = (hr.analytic_usage(dep, windowed, batch, max_len).cache
             - hr.analytic_usage(dep, base, batch, max_len).cache)
    heads = LLAMA["kv_heads"] // dep.model
    assert extra == LLAMA["num_layers"] * (batch // dep.data) * 2 * 128 * heads * \
        LLAMA["head_dim"] * 2
  a = hr.max_context(dep, windowed, 8, Counting(dep))
  (row, *_) = hr.answer_rows(kvtpu.KVFormat.parse(windowed), a, dep, mode="analytic")
  assert row["effective_bits"] == kvtpu.memory.effective_bits(
      windowed, context=8192, kv_heads=LLAMA["kv_heads"], head_dim=LLAMA["head_dim"]) == 4.75


@pytest.mark.parametrize("data,model,strategy", [(1, 1, "auto"), (2, 4, "auto"), (1, 8, "replicate")])
def test_a_layer_plan_is_the_sum_of_its_layer_groups(data, model, strategy):
  """A plan's cache bytes are those of one cache per layer group (each with its own
  lengths and counters): on one device the bytes of `kvtpu.LayeredKVCache`'s arrays, on
  a mesh the groups sized as formats of fewer layers. Its answers lie between those of
  its cheapest and its dearest format; its effective bits are the mean over layers."""
  low = "int2-nu-sbf16-rot+sink4+recent124"
  high = "k=int4-nu-sbf16-rot,v=int2-nu-sbf16-rot+sink4+recent124"
  plan = kvtpu.LayerPlan.parse(f"{low}|{high}@1,5-7,31")
  dep = hr.Deployment(**LLAMA, weights_per_device=LLAMA_WEIGHTS_TP4, hbm_per_device=16 * GIB,
                      data=data, model=model, strategy=strategy, tpu=True)
  batch, max_len = 4 * data, 2048
  got = hr.analytic_usage(dep, plan.name, batch, max_len)
  parts = [hr.analytic_usage(dataclasses.replace(dep, num_layers=n), f, batch, max_len)
           for f, n in ((low, 27), (high, 5))]
  assert got.cache == sum(p.cache for p in parts)
  logits = (batch // data) * (dep.vocab_size // model) * dep.logits_bytes
  assert got.temp == sum(p.temp for p in parts) - logits  # One step's logits.
  if data * model == 1:
    cache = kvtpu.LayeredKVCache.init(plan, num_layers=32, batch=batch, kv_heads=8,
                                      max_len=max_len, head_dim=128)
    assert got.cache == cache.nbytes
  measure = lambda f, b, s: hr.analytic_usage(dep, f, b, s)  # noqa: E731
  answers = {f: hr.max_context(dep, f, 8, measure) for f in (low, plan.name, high)}
  assert answers[high].max_len < answers[plan.name].max_len < answers[low].max_len
  bits = {f: hr.answer_rows(kvtpu.LayerPlan.config(f), answers[f], dep,
                            mode="analytic")[0]["effective_bits"] for f in answers}
  assert bits[plan.name] == pytest.approx((27 * bits[low] + 5 * bits[high]) / 32, rel=1e-12)
  assert bits[low] < bits[plan.name] < bits[high] <= 4.75

"""The continuous-batching engine on the tiny random model.

Every request's greedy output must be what `generate` gives for its prompt alone (an
independent path: a contiguous cache, one request, its own prefill and decode loop),
whatever the traffic mixes into the same steps and however often the request is
preempted and recomputed; pages in use must equal what the live requests hold at every
step and return to zero; the step must compile two shapes, whatever the traffic.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx
from kvtpu.models import serving
from kvtpu.models.generation import Sampling, generate
from kvtpu.models.llama import Llama

from kvtpu.eval.traffic import Request, Trace
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
  result = engine(model, kv_format=fmt, num_pages=8).run(make_trace(), check_pages=True)
  assert result.preemptions > 0  # Recompute restores the windows too.
  assert {s.request.id: s.tokens for s in result.requests} == alone_outputs(model, fmt)


def test_preemption_recomputes_to_the_same_outputs(model, alone):
  # 6 usable pages of 8 positions for 3 slots: requests of up to 31 positions cannot all
  # grow at once, so the newest is preempted and recomputed.
  result = engine(model, num_pages=7).run(make_trace(), check_pages=True)
  assert result.preemptions > 0
  assert {s.request.id: s.tokens for s in result.requests} == alone
  assert max(s.pages_in_use for s in result.steps) <= 6
  assert sum(s.preempted for s in result.steps) == result.preemptions


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
  runs = [engine(model, sampling=hot, seed=seed).run(trace) for seed in (5, 5, 6)]
  a, b, c = ({s.request.id: s.tokens for s in r.requests} for r in runs)
  assert a == b and a != c and a != alone
  assert all(len(a[r.id]) == r.max_new_tokens for r in trace.requests)  # No stop ids.

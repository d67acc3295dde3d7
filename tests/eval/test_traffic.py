"""Serving traffic: JSONL traces and the Poisson generator.

Traces must be exactly what their files say (each prompt kind, each budget kind), in
arrival order, pinned by a hash written independently here; every bad line must be an
error naming the file and line, raised before anything is served; the generator must
be deterministic per seed with the arrival and length statistics its parameters name.
"""

import hashlib
import json
import math
import struct

import numpy as np
import pytest

from kvtpu.eval import traffic
from kvtpu.eval.traffic import Distribution, Request, Trace
from kvtpu.eval.workloads import CHAT_QUESTIONS, Workload
from tests.helpers import ByteTokenizer

FILLER = np.arange(10, 10 + 997, dtype=np.int32)  # A stream whose windows are recognizable.


def reference_sha(requests) -> str:
  """The documented layout, written independently with `struct`."""
  h = hashlib.sha256()
  for r in requests:
    name = r.id.encode("utf-8")
    h.update(struct.pack("<Q", len(name)))
    h.update(name)
    h.update(struct.pack("<d", r.arrival_s))
    h.update(struct.pack("<Q", len(r.prompt)))
    h.update(struct.pack(f"<{len(r.prompt)}i", *[int(i) for i in r.prompt]))
    h.update(struct.pack("<Q", r.max_new_tokens))
    h.update(struct.pack("<B", int(r.exact_length)))
  return h.hexdigest()


def write(tmp_path, records, name="trace.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
  return path


# ----------------------------------------------------------------------------- distributions
def test_distributions_draw_within_their_bounds_with_their_statistics():
  rng = np.random.default_rng(0)
  fixed = Distribution.parse("fixed:128")
  assert fixed == Distribution.parse("fixed:value=128") and fixed.high == 128
  assert (fixed.sample(rng, 5) == 128).all()
  uniform = Distribution.parse("uniform:low=3,high=7")
  x = uniform.sample(rng, 20000)
  assert x.min() == 3 and x.max() == 7 and uniform.high == 7
  np.testing.assert_allclose(np.bincount(x)[3:] / x.size, 0.2, atol=0.015)  # Inclusive.
  logn = Distribution.parse("lognormal:median=200,sigma=0.5,max=400")
  x = logn.sample(rng, 20000)
  assert x.dtype == np.int64 and x.min() >= 1 and x.max() == 400
  assert abs(np.median(x) - 200) <= 4
  # Clipped at max: the share above 400 is P(Z > ln 2 / 0.5).
  tail = 0.5 * math.erfc(math.log(2) / 0.5 / math.sqrt(2))
  assert abs((x == 400).mean() - tail) < 0.01
  low = Distribution.parse("lognormal:median=2,sigma=2,max=50,min=5").sample(rng, 1000)
  assert low.min() == 5 and low.max() == 50
  assert Distribution.parse(logn.name) == logn  # The name rebuilds it, exactly:
  for spec in ("fixed:1234567", "lognormal:median=200,sigma=0.123456789,max=99999999"):
    assert Distribution.parse(Distribution.parse(spec).name) == Distribution.parse(spec)
  with pytest.raises(ValueError, match="kind must be one of"):
    Distribution("normal", (("mean", 3.0),))  # Built directly, checked too.
  with pytest.raises(ValueError, match="low=0 must be an integer >= 1"):
    Distribution("uniform", (("high", 3.0), ("low", 0.0)))


@pytest.mark.parametrize("spec,match", [
    ("normal:mean=3", "want one of fixed, uniform, lognormal"),
    ("uniform:low=3", "uniform needs high"),
    ("uniform:low=9,high=3", "low=9 is above high=3"),
    ("uniform:low=0,high=3", "low=0 must be an integer >= 1"),
    ("fixed:2.5", "value=2.5 must be an integer >= 1"),
    ("lognormal:median=100,sigma=0.5", "lognormal needs max"),
    ("lognormal:median=100,sigma=-1,max=9", "sigma=-1 must be > 0"),
    ("lognormal:median=100,sigma=1,max=9,min=10", "min=10 is above max=9"),
    ("uniform:low=1,high=nan", "must be finite"),
    ("uniform:low=1,low=2,high=3", "low given twice"),
    ("uniform:lo=1,high=3", "'lo=1' is not one of uniform's parameters"),
    ("fixed:x", "'x' is not a number"),
])
def test_bad_distribution_specs_name_the_spec(spec, match):
  with pytest.raises(ValueError, match=match) as info:
    Distribution.parse(spec)
  assert repr(spec) in str(info.value)


# ----------------------------------------------------------------------------- the generator
def test_poisson_is_seeded_and_has_the_named_statistics():
  kw = dict(rate=4.0, num_requests=4000, prompt_len="uniform:low=5,high=40",
            output_len="lognormal:median=20,sigma=0.4,max=60", max_context=100, filler=FILLER)
  trace = traffic.poisson(**kw, seed=3)
  assert traffic.poisson(**kw, seed=3).sha256 == trace.sha256 == reference_sha(trace.requests)
  assert traffic.poisson(**kw, seed=4).sha256 != trace.sha256
  arrivals = np.array([r.arrival_s for r in trace.requests])
  gaps = np.diff(np.concatenate([[0.0], arrivals]))
  assert (gaps >= 0).all()
  # Exponential gaps of mean 1/rate: mean within 4 standard errors, and P(gap > mean) = 1/e.
  assert abs(gaps.mean() - 0.25) < 4 * 0.25 / math.sqrt(gaps.size)
  assert abs((gaps > 0.25).mean() - math.exp(-1)) < 0.03
  prompts = np.array([r.prompt_len for r in trace.requests])
  outputs = np.array([r.max_new_tokens for r in trace.requests])
  assert prompts.min() == 5 and prompts.max() == 40 and outputs.max() <= 60
  assert abs(np.median(outputs) - 20) <= 1
  assert all(r.exact_length for r in trace.requests)
  # Prompts are consecutive windows of the filler (wrapping to its start when one would
  # run past its end).
  offset = 0
  for r in trace.requests[:200]:
    start = offset if offset + r.prompt_len <= FILLER.size else 0
    np.testing.assert_array_equal(r.prompt, FILLER[start:start + r.prompt_len])
    offset = start + r.prompt_len
  d = trace.disclosure()
  assert d["seed"] == 3 and d["sha256"] == trace.sha256 and d["num_requests"] == 4000
  assert d["filler"]["num_tokens"] == FILLER.size and "rate=4" in d["name"]
  assert trace.longest() <= 100


def test_poisson_refuses_what_cannot_fit_before_drawing():
  base = dict(rate=1.0, num_requests=3, prompt_len="fixed:60", output_len="fixed:40",
              filler=FILLER)
  with pytest.raises(ValueError, match="needs 100 positions, more than the model context "
                     "max_context=99"):
    traffic.poisson(**base, max_context=99)
  assert traffic.poisson(**base, max_context=100).longest() == 100
  # The name holds the rate exactly (two rates, two names).
  assert "rate=1.0000001," in traffic.poisson(**{**base, "rate": 1.0000001}, max_context=100).name
  for key, bad, match in (("rate", 0.0, "rate must be"), ("rate", math.inf, "rate must be"),
                          ("num_requests", 0, "num_requests must be"),
                          ("seed", -1, "seed must be")):
    with pytest.raises(ValueError, match=match):
      traffic.poisson(**{**base, key: bad}, max_context=100)
  with pytest.raises(ValueError, match="prompt_len=60 is longer than the filler's 50 tokens"):
    traffic.poisson(**{**base, "filler": FILLER[:50]}, max_context=100)
  with pytest.raises(ValueError, match="max_context must be an int >= 2"):
    traffic.poisson(**base, max_context=1.5)


def test_chat_asks_the_questions_in_the_template_and_stops_at_stop_ids():
  tok = ByteTokenizer()
  kw = dict(rate=2.0, num_requests=len(CHAT_QUESTIONS), output_len="fixed:64",
            max_context=1024)
  trace = traffic.chat(tok, **kw, seed=1)
  assert traffic.chat(tok, **kw, seed=1).sha256 == trace.sha256 == reference_sha(trace.requests)
  # Every question once, in the order the chat workload shuffles them, each one user
  # turn rendered by the tokenizer's template (not the bare question).
  order = [CHAT_QUESTIONS[i] for i in np.random.default_rng(1).permutation(len(CHAT_QUESTIONS))]
  for r, q in zip(trace.requests, order, strict=True):
    want = tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
    assert list(r.prompt) == want and len(want) > len(tok.encode(q))
    assert r.max_new_tokens == 64 and not r.exact_length  # Ends at a stop id.
  assert [r.arrival_s for r in trace.requests] == sorted(r.arrival_s for r in trace.requests)
  assert traffic.chat(tok, **kw, seed=2).sha256 != trace.sha256
  assert trace.name == "chat:rate=2,num_requests=40,output_len=fixed:value=64,seed=1"
  assert "filler" not in trace.disclosure() and "CHAT_QUESTIONS" in trace.description
  first = traffic.chat(tok, **{**kw, "num_requests": 3}, seed=1)
  assert [list(r.prompt) for r in first.requests] == [list(r.prompt)
                                                      for r in trace.requests[:3]]
  longest = max(r.prompt_len for r in trace.requests)
  with pytest.raises(ValueError, match=f"the longest chat prompt \\({longest} tokens\\) and "
                     "output_len=fixed:value=64: a prompt of"):
    traffic.chat(tok, **{**kw, "max_context": longest + 63})
  with pytest.raises(ValueError, match="num_questions=41 exceeds the 40 CHAT_QUESTIONS"):
    traffic.chat(tok, **{**kw, "num_requests": 41})
  with pytest.raises(ValueError, match="rate must be"):
    traffic.chat(tok, **{**kw, "rate": -1.0})


# ----------------------------------------------------------------------------- JSONL traces
def test_jsonl_gives_every_prompt_and_budget_kind(tmp_path):
  tok = ByteTokenizer()
  messages = [{"role": "user", "content": "hi?"}]
  path = write(tmp_path, [
      {"id": "a", "arrival_s": 0, "prompt": "Hello", "max_new_tokens": 8},
      "",  # Blank lines are skipped.
      {"arrival_s": 0.5, "prompt_ids": [5, 6, 7], "output_len": 3},
      {"arrival_s": 0.5, "messages": messages, "max_new_tokens": 4},
      {"arrival_s": 2.25, "prompt_len": 6, "output_len": 2},
      {"arrival_s": 2.5, "prompt_len": 4, "max_new_tokens": 1},
  ])
  trace = traffic.load_jsonl(path, tok, max_context=32, filler=FILLER)
  a, b, c, d, e = trace.requests
  assert [r.id for r in trace.requests] == ["a", "line3", "line4", "line5", "line6"]
  np.testing.assert_array_equal(a.prompt, tok.encode("Hello"))
  np.testing.assert_array_equal(b.prompt, [5, 6, 7])
  np.testing.assert_array_equal(c.prompt, tok.encode_chat(messages, add_generation_prompt=True))
  np.testing.assert_array_equal(d.prompt, FILLER[:6])
  np.testing.assert_array_equal(e.prompt, FILLER[6:10])
  assert [(r.max_new_tokens, r.exact_length) for r in trace.requests] == [
      (8, False), (3, True), (4, False), (2, True), (1, False)]
  assert [r.arrival_s for r in trace.requests] == [0.0, 0.5, 0.5, 2.25, 2.5]
  assert trace.sha256 == reference_sha(trace.requests)
  assert trace.duration_s == 2.5 and trace.prompt_tokens == sum(r.prompt_len for r in trace.requests)
  assert trace.disclosure()["filler"]["num_tokens"] == FILLER.size
  # The same file gives the same hash; one changed token changes it.
  assert traffic.load_jsonl(path, tok, max_context=32, filler=FILLER).sha256 == trace.sha256
  changed = write(tmp_path, [path.read_text().replace("[5, 6, 7]", "[5, 6, 8]")], "changed.jsonl")
  assert traffic.load_jsonl(changed, tok, max_context=32, filler=FILLER).sha256 != trace.sha256
  # Requests the file gives whole need no filler, and the trace then names none.
  whole = write(tmp_path, [{"arrival_s": 1, "prompt_ids": [3], "max_new_tokens": 1}], "w.jsonl")
  assert traffic.load_jsonl(whole, max_context=2).disclosure().get("filler") is None


@pytest.mark.parametrize("line,match", [
    ('{"arrival_s": 0, "prompt_len": -3, "max_new_tokens": 4}', "prompt_len must be an integer >= 1, got -3"),
    ('{"arrival_s": 0, "prompt_len": 3, "max_new_tokens": 0}', "max_new_tokens must be an integer >= 1"),
    ('{"arrival_s": 0, "prompt_len": 3, "output_len": -1}', "output_len must be an integer >= 1"),
    ('{"arrival_s": 0.5, "prompt_len": 3, "output_len": 2}', "arrival_s=0.5 is before the previous"),
    ('{"arrival_s": -1, "prompt_len": 3, "output_len": 2}', "arrival_s must be a number >= 0"),
    ('{"arrival_s": 2, "prompt_len": 30, "output_len": 3}',
     "a prompt of 30 tokens plus 3 new tokens needs 33 positions, more than the model context "
     "max_context=32"),
    ('{"arrival_s": 2, "prompt": "a much too long prompt for this context", "output_len": 1}',
     "more than the model context"),
    ('{"arrival_s": 2, "prompt_ids": [3, 300], "output_len": 1}', r"holds 300, outside \[0, 259\)"),
    ('{"arrival_s": 2, "prompt": "x", "prompt_len": 3, "output_len": 1}', "exactly one of prompt"),
    ('{"arrival_s": 2, "prompt": "x"}', "exactly one of max_new_tokens, output_len, got none"),
    ('{"arrival_s": 2, "prompt": "x", "output_len": 1, "temperature": 1}', "unknown key"),
    ('{"arrival_s": 2, "messages": [{"role": "user"}], "output_len": 1}', "messages must be"),
    ('{"id": "first", "arrival_s": 2, "prompt": "x", "output_len": 1}', "id 'first' was already used on line 1"),
    ('{"arrival_s": 2, "prompt": "x", "output_len": 1', "not JSON"),
    ('[1, 2]', "want a JSON object"),
    ('{"arrival_s": 1e400, "prompt": "x", "output_len": 1}', "arrival_s must be a number >= 0"),
    ('{"arrival_s": ' + "9" * 400 + ', "prompt": "x", "output_len": 1}',
     "arrival_s must be a number >= 0"),
    ('{"arrival_s": 2, "prompt_ids": [3, 4294967296], "output_len": 1}', r"outside \[0, 259\)"),
])
def test_bad_lines_are_errors_naming_the_line(tmp_path, line, match):
  first = json.dumps({"id": "first", "arrival_s": 1, "prompt": "ok", "max_new_tokens": 2})
  path = write(tmp_path, [first, "", line])
  with pytest.raises(ValueError, match=match) as info:
    traffic.load_jsonl(path, ByteTokenizer(), max_context=32, filler=FILLER)
  assert str(info.value).startswith(f"{path}:3: ")


def test_traces_refuse_what_they_cannot_serve(tmp_path):
  empty = write(tmp_path, ["", "  "])
  with pytest.raises(ValueError, match="holds no requests"):
    traffic.load_jsonl(empty, max_context=8)
  with pytest.raises(ValueError, match="cannot read trace"):
    traffic.load_jsonl(tmp_path / "missing.jsonl", max_context=8)
  lengths_only = write(tmp_path, ['{"arrival_s": 0, "prompt_len": 3, "output_len": 1}'], "l.jsonl")
  with pytest.raises(ValueError, match=r"l.jsonl:1: a prompt given by its length needs a filler"):
    traffic.load_jsonl(lengths_only, max_context=8)
  text = write(tmp_path, ['{"arrival_s": 0, "prompt": "x", "output_len": 1}'], "t.jsonl")
  with pytest.raises(ValueError, match=r"t.jsonl:1: a 'prompt' prompt needs a tokenizer"):
    traffic.load_jsonl(text, max_context=8)
  r = Request("a", 1.0, np.array([3, 4]), 2)
  with pytest.raises(ValueError, match="request 'b' arrives at 0.5 s, before"):
    Trace("t", "", (r, Request("b", 0.5, np.array([3]), 1)))
  with pytest.raises(ValueError, match="request id 'a' appears twice"):
    Trace("t", "", (r, r))
  with pytest.raises(ValueError, match="does not match its requests"):
    Trace("t", "", (r,), sha256="0" * 64)
  for bad, match in ((dict(prompt=np.array([], np.int32)), "non-empty 1-D"),
                     (dict(prompt=np.array([-1])), r"in \[0, 2\*\*31\)"),
                     (dict(arrival_s=math.nan), "arrival_s must be a finite number"),
                     (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1")):
    with pytest.raises(ValueError, match=match):
      Request(**{**dict(id="x", arrival_s=0.0, prompt=np.array([3]), max_new_tokens=1), **bad})
  assert not r.prompt.flags.writeable
  for bad, match in ((dict(prompt=np.array([3.7])), "prompt must be integer token ids"),
                     (dict(prompt=[True, False]), "prompt must be integer token ids"),
                     (dict(id=7), "request id must be a non-empty string"),
                     (dict(exact_length="no"), "exact_length must be a bool")):
    with pytest.raises(ValueError, match=match):
      Request(**{**dict(id="x", arrival_s=0.0, prompt=np.array([3]), max_new_tokens=1), **bad})
  # -0.0 is 0.0: the same request, the same hash.
  zero, negative = (Request("z", t, np.array([3]), 1) for t in (0.0, -0.0))
  assert traffic.trace_sha256([zero]) == traffic.trace_sha256([negative])
  prompt_only = write(tmp_path, ['{"arrival_s": 0, "prompt_ids": [3, 2147483648], "output_len": 1}'],
                      "big.jsonl")
  with pytest.raises(ValueError, match=r"big.jsonl:1: prompt_ids holds 2147483648, outside \[0, 2\*\*31\)"):
    traffic.load_jsonl(prompt_only, max_context=8)


def test_a_workload_fills_prompts_and_is_disclosed():
  work = Workload.from_documents("toy", "two documents", [np.arange(3, 40), np.arange(50, 90)],
                                 "0" * 64)
  trace = traffic.poisson(rate=1.0, num_requests=4, prompt_len="fixed:20", output_len="fixed:2",
                          max_context=64, filler=work)
  np.testing.assert_array_equal(trace.requests[1].prompt, work.stream()[20:40])
  assert trace.disclosure()["filler"] == work.disclosure()

"""models/generation.py on the tiny random model: greedy against a naive loop, stop ids,
sampling statistics, every format, argument errors and compile caching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kvtpu.models.generation import (
  TRACE_COUNTS,
  Sampling,
  default_max_len,
  generate,
  pad_prompts,
  prefill,
  sample_logits,
)
from kvtpu.models.llama import Llama

import kvtpu
from tests.helpers import TINY, flat_arrays, slow_unless

PROMPTS = [[5], [11, 3, 7, 2, 40], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 96]]  # Ragged: 1, 5, 11.
# One compiled prefill + decode (~4 s on CPU) serves every test that uses these shapes:
# 3 prompts of at most 16 tokens, 6 new tokens, bf16, at most 8 stop ids, top_k None.
STD = dict(max_new_tokens=6, impl="xla")


@pytest.fixture(scope="module")
def model():
  """One layer (generation does not depend on depth; compiles in half the time), seed 1:
  greedy continuations that vary."""
  return Llama(dataclasses.replace(TINY, num_layers=1), rngs=nnx.Rngs(1))


def _naive_greedy(model, prompt, steps):
  """Argmax continuation, re-running the whole sequence through a fresh bf16 cache.

  The sequence is right-padded to 32 tokens (one compile; causal attention keeps the
  padding out of the logits at position len - 1).
  """
  forward = jax.jit(lambda tokens: model(tokens, model.init_cache("bf16", batch=1, max_len=32),
                                         impl="xla")[0])
  seq = list(prompt)
  for _ in range(steps):
    logits = forward(jnp.asarray([seq + [0] * (32 - len(seq))], jnp.int32))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_equals_naive_loop_on_a_ragged_batch(model):
  out = generate(model, PROMPTS, **STD)
  assert out.tokens == [_naive_greedy(model, p, 6) for p in PROMPTS]
  assert out.stopped == [False] * 3 and out.prompt_lengths == [1, 5, 11]
  # Every generated token is in the cache, the last one too.
  np.testing.assert_array_equal(out.cache.lengths, [7, 11, 17])
  assert out.cache.max_len == 128 and out.decode_steps == 6
  assert out.prefill_seconds > 0 and out.decode_tokens_per_s == 18 / out.decode_seconds


@pytest.mark.parametrize("chunk", [pytest.param(c, marks=slow_unless(c == 4)) for c in (1, 4, 5)])
def test_chunked_prefill_equals_one_call(model, chunk):
  """Prompts of 1, 5 and 11 tokens in chunks that split them anywhere (1: token by
  token; 4 and 5: rows end inside, at, and before chunk boundaries): the same cache
  contents and the same greedy continuation as one prefill call."""
  whole = generate(model, PROMPTS, **STD, prefill_chunk=None, kv_format="f32")
  parts = generate(model, PROMPTS, **STD, prefill_chunk=chunk, kv_format="f32")
  assert parts.tokens == whole.tokens
  np.testing.assert_array_equal(parts.cache.lengths, whole.cache.lengths)
  for name in ("k", "v"):
    a, b = getattr(parts.cache, name).values, getattr(whole.cache, name).values
    for row, n in enumerate(np.asarray(whole.cache.lengths)):
      np.testing.assert_allclose(a[:, row, :, :n], b[:, row, :, :n], rtol=1e-5, atol=1e-5)


def test_stop_ids_end_one_row_and_the_others_continue(model):
  free = generate(model, PROMPTS, **STD)
  # A row r whose token at i >= 1 occurs first there and in no other row: the stop id.
  r, i = next((r, i) for r, row in enumerate(free.tokens) for i, t in enumerate(row)
              if i >= 1 and row.index(t) == i
              and all(t not in other for other in free.tokens if other is not row))
  stop = free.tokens[r][i]
  unused = next(t for t in range(TINY.vocab_size) if all(t not in row for row in free.tokens))
  out = generate(model, PROMPTS, **STD, stop_ids=(stop, unused))
  assert out.tokens[r] == free.tokens[r][:i + 1] and out.stopped[r]
  others = [b for b in range(3) if b != r]
  assert [out.tokens[b] for b in others] == [free.tokens[b] for b in others]
  assert not any(out.stopped[b] for b in others)
  expected = [p + 6 for p in (1, 5, 11)]
  expected[r] = out.prompt_lengths[r] + i + 1
  np.testing.assert_array_equal(out.cache.lengths, expected)
  assert out.decode_tokens_per_s == (12 + i + 1) / out.decode_seconds
  # Every row stopping at its first token: one decode step writes them, and the loop ends.
  first = generate(model, PROMPTS, **STD, stop_ids=[t[0] for t in free.tokens])
  assert first.tokens == [t[:1] for t in free.tokens] and all(first.stopped)
  assert first.decode_steps == 1
  np.testing.assert_array_equal(first.cache.lengths, [2, 6, 12])


def test_finished_rows_do_not_touch_the_cache():
  """`KVCache.update`/`advance` with valid_len 0 for one row, as the decode loop uses it."""
  rng = np.random.default_rng(0)
  cache = kvtpu.KVCache.init("int8", num_layers=1, batch=2, kv_heads=2, max_len=128, head_dim=16)
  kv = lambda t: jnp.asarray(rng.standard_normal((2, t, 2, 16)), jnp.float32)  # noqa: E731
  cache = cache.update(0, kv(5), kv(5)).advance(5)
  new = cache.update(0, kv(1), kv(1), valid_len=jnp.array([1, 0])).advance(jnp.array([1, 0]))
  np.testing.assert_array_equal(new.lengths, [6, 5])
  for name in ("k.values", "v.values", "k.scale", "v.scale"):  # [L, B, ...]
    old, now = np.asarray(flat_arrays(cache)[name]), np.asarray(flat_arrays(new)[name])
    np.testing.assert_array_equal(now[:, 1], old[:, 1], err_msg=name)
    assert not np.array_equal(now[:, 0], old[:, 0]), name
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
  after_write = cache.update(0, kv(1), kv(1), valid_len=jnp.array([1, 0]))
  out = kvtpu.attend(q, after_write, 0, valid_len=jnp.array([1, 0]), impl="xla")
  assert np.isfinite(np.asarray(out)).all()


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(model):
  kw = dict(**STD, sampling=Sampling(temperature=1.0))
  a = generate(model, PROMPTS, key=jax.random.key(1), **kw)
  b = generate(model, PROMPTS, key=jax.random.key(1), **kw)
  c = generate(model, PROMPTS, key=jax.random.key(2), **kw)
  assert a.tokens == b.tokens and a.tokens != c.tokens
  greedy = generate(model, PROMPTS, **STD)
  nucleus = generate(model, PROMPTS, **STD, key=jax.random.key(3),
                     sampling=Sampling(temperature=1.5, top_p=1e-6))
  assert nucleus.tokens == greedy.tokens and a.tokens != greedy.tokens


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
  """Pearson's statistic with categories of expected count < 5 pooled; (stat, dof)."""
  expected = probs * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.slow  # Thousands of draws through a batch of 100.
def test_first_token_frequencies_match_the_tempered_softmax(model):
  # `prefill` alone: 100 identical prompts, 20 keys.
  temperature = 0.7
  graphdef, state = nnx.split(model)
  tokens, lengths = map(jnp.asarray, pad_prompts([[7, 8]] * 100))
  sampling = Sampling(temperature=temperature)
  draws = []
  for key in jax.random.split(jax.random.key(4), 20):
    cache = model.init_cache("bf16", batch=100, max_len=128)
    first, _ = prefill(graphdef, state, cache, tokens, lengths, key, sampling, impl="xla")
    draws.extend(np.asarray(first).tolist())
  counts = np.bincount(draws, minlength=TINY.vocab_size)
  logits, _ = model(tokens[:1, :2], model.init_cache("bf16", batch=1, max_len=16), impl="xla")
  logits = np.asarray(logits[0, -1], np.float64)
  softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
  stat, dof = _chi_square(counts, softmax(logits / temperature))
  assert dof >= 10, dof  # The distribution is spread enough to test something.
  assert stat < dof + 6 * np.sqrt(2 * dof), (stat, dof)  # ~4 standard deviations.
  assert _chi_square(counts, softmax(logits))[0] > 2 * stat  # Temperature 1 fits worse.


def test_sampler_top_p_and_top_k_keep_the_right_tokens():
  # Probabilities 0.5, 0.3, 0.15, 0.05 (shuffled). top_p=0.7 keeps the first two (the
  # mass before the third is 0.8 >= 0.7), renormalized to 0.625 / 0.375.
  probs = np.array([0.15, 0.5, 0.05, 0.3])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None, :]
  keys = jax.random.split(jax.random.key(5), 4000)

  def draws(sampling):
    fn = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, sampling)[0]))
    return np.bincount(np.asarray(fn(keys)), minlength=4)

  counts = draws(Sampling(temperature=1.0, top_p=0.7))
  assert counts[0] == counts[2] == 0
  stat, dof = _chi_square(counts, np.array([0, 0.625, 0, 0.375]))
  assert stat < 15, (counts, stat, dof)
  counts = draws(Sampling(temperature=1.0))  # Full distribution.
  assert _chi_square(counts, probs)[0] < 20, counts
  counts = draws(Sampling(temperature=1.0, top_k=3))
  assert counts[2] == 0 and _chi_square(counts, np.array([0.15, 0.5, 0, 0.3]) / 0.95)[0] < 20


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=slow_unless(f == "int8"))
                                 for f in ("int8", "fp8_e4m3", "int4", "k8v4")])
def test_every_format_generates_valid_ids(model, fmt):
  # bf16 runs in the tests above.
  out = generate(model, PROMPTS[:2], max_new_tokens=3, kv_format=fmt, impl="xla",
                 sampling=Sampling(temperature=0.8, top_p=0.9))
  assert out.cache.fmt == kvtpu.KVFormat.parse(fmt)
  assert all(len(t) == 3 and all(0 <= i < TINY.vocab_size for i in t) for t in out.tokens)
  np.testing.assert_array_equal(out.cache.lengths, [4, 8])


@pytest.mark.slow  # Generation through the interpreted kernel.
def test_pallas_interpret_with_a_finished_row(model):
  """int8 through the Pallas kernels (interpret mode), row 0 idle (valid_len 0) for
  all but the first decode step; row 1 unaffected."""
  kw = dict(max_new_tokens=3, kv_format="int8", impl="interpret")
  free = generate(model, PROMPTS[:2], **kw)
  assert all(0 <= i < TINY.vocab_size for t in free.tokens for i in t)
  stop = free.tokens[0][0]
  out = generate(model, PROMPTS[:2], **kw, stop_ids=[stop])
  assert out.tokens[0] == [stop] and out.stopped[0] and not out.compiled
  assert stop not in free.tokens[1], "fixture seed: row 1 must not produce row 0's first token"
  assert out.tokens[1] == free.tokens[1] and out.decode_steps == 3
  np.testing.assert_array_equal(out.cache.lengths, [2, 8])


def test_same_shapes_do_not_recompile(model):
  generate(model, PROMPTS, **STD)
  before = dict(TRACE_COUNTS)
  # Other ids, other lengths within the prompt bucket, other stop ids, temperature,
  # top_p and key, and another model of the same structure: the same compiled functions.
  again = generate(model, [[9] * 16, [4], [3, 3]], **STD, key=jax.random.key(9),
                       stop_ids=[1, 2, 3], sampling=Sampling(temperature=0.5, top_p=0.8))
  other = generate(Llama(model.cfg, rngs=nnx.Rngs(7)), PROMPTS, **STD)
  assert dict(TRACE_COUNTS) == before and not again.compiled and not other.compiled


def test_explicit_max_len_and_the_default(model):
  assert default_max_len([1, 5, 11], 6) == 128 and default_max_len([120], 9) == 256
  # Whole groups of a c<N> spec, in any format of a plan.
  assert default_max_len([120], 9, "int8|int4-c256+recent256@1") == 256
  assert default_max_len([300], 9, "k=int4-c384,v=int8+recent384") == 384
  traces = TRACE_COUNTS["decode"]
  out = generate(model, PROMPTS, max_new_tokens=2, impl="xla", max_len=13)
  assert out.compiled and TRACE_COUNTS["decode"] == traces + 1  # A new shape.
  assert out.cache.max_len == 13 and out.cache.lengths.tolist() == [3, 7, 13]
  assert not out.cache.overflow.any()
  with pytest.raises(ValueError, match=r"max_len=12 is too small: the longest prompt \(11 "
                     r"tokens\) plus max_new_tokens=2 need 13"):
    generate(model, PROMPTS, max_new_tokens=2, max_len=12)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompts=[]), ValueError, "prompts is empty"),
    (dict(prompts=[[1], []]), ValueError, r"prompts\[1\] is empty"),
    (dict(prompts=["hello"]), TypeError, r"prompts\[0\] is a string"),
    (dict(prompts=[[1, 97]]), ValueError, r"prompts\[0\] has token ids outside"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
    (dict(kv_format="int7"), ValueError, "invalid KV format"),
    (dict(pad_id=97), ValueError, "pad_id=97 must be < vocab_size=97"),
    (dict(sampling=0.5), TypeError, "sampling must be a Sampling"),
    (dict(stop_ids=["eos"]), TypeError, "stop_ids must be int token ids"),
])
def test_bad_arguments_are_clear_errors(model, kwargs, error, match):
  args = {"prompts": [[1, 2]], "max_new_tokens": 2, **kwargs}
  with pytest.raises(error, match=match):
    generate(model, args.pop("prompts"), **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be None or an int >= 1"),
])
def test_bad_sampling_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Sampling(**kwargs)

"""Jitted text generation for `kvtpu.models.llama.Llama` on the kvtpu cache.

`generate(model, prompts, max_new_tokens=N)` runs a ragged batch of prompts in two
compiled calls:

* `prefill`: the prompts, right-padded to a common length P, go through the model
  with `valid_len = lengths` (padding is neither written to the cache nor attended
  to), in one call or, for long prompts, a `lax.scan` over chunks of
  `prefill_chunk` tokens; only each row's position `lengths[b] - 1` goes through the
  output projection (`logits_at`), and its logits give the first new token.
* `decode`: a `lax.while_loop` of single-token steps `[B, 1]`. Each step writes the
  previous token of every row that still has one to write (`valid_len = 1`; rows
  that are finished pass `valid_len = 0`, so their cache no longer advances) and
  samples the next token of every row still generating. A row stops generating at
  its first stop id or after N tokens; the loop ends when every row's last token is
  in the cache (at most N steps). So the final cache holds prompt + all generated
  tokens (ready for a follow-up turn), and every generated token went through the
  model exactly once in the decode phase.

The model is split with `nnx.split`: the jitted functions take the graph definition
as a static argument and the parameter state as an ordinary one, and merge them
inside, so the compiled executables are cached across calls and models with the
same structure: a second call with the same shapes (batch, padded prompt length P,
max_new_tokens, cache format and max_len, number of stop ids in buckets of 8, top_k,
impl) does not trace or compile again. `TRACE_COUNTS` counts traces, for tests and
diagnostics. Sampling's temperature and top_p are traced values (changing them does not
recompile); greedy (temperature 0) and nucleus (top_p < 1) are chosen at run time
with `lax.cond`, so no branch costs a vocabulary sort when it is not used.

Shapes: B sequences, P padded prompt length, N = max_new_tokens, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import numbers
import operator
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvtpu
from kvtpu.attention import IMPLS
from kvtpu.qtensor import QuantizedKV

__all__ = ["Sampling", "Generation", "generate", "prefill", "decode", "sample_logits",
           "default_max_len", "pad_prompts", "TRACE_COUNTS", "MAX_LEN_MULTIPLE", "PROMPT_BUCKET",
           "STOP_BUCKET"]

# The cache's max_len is rounded up to a multiple of 128: the Pallas kernels tile S in
# blocks of a power of two >= 128 (`decode_attention.default_block_sizes`), or take S
# whole when it is smaller than the block; a block smaller than S must be a multiple of
# 128 (the lane width: the scale blocks put S in lanes).
MAX_LEN_MULTIPLE = 128
# Prompts are right-padded to a multiple of this many tokens, so that batches whose
# longest prompts differ a little share one compiled prefill.
PROMPT_BUCKET = 16
# Stop ids are padded to a multiple of this many, for the same reason.
STOP_BUCKET = 8

# Traces of the jitted functions, by name: a trace means a compile (tests check that a
# second call with the same shapes adds none).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def _check_number(name: str, value, ok, requirement: str) -> None:
  """Validates a Python number. Other leaves pass: jax rebuilds the pytree with
  tracers (under jit) and placeholder objects, and `generate` checks its own."""
  if isinstance(value, (bool, str, bytes)):
    raise TypeError(f"{name} must be a number, got {name}={value!r}")
  if isinstance(value, numbers.Real) and not (math.isfinite(value) and ok(value)):
    raise ValueError(f"{name} must be {requirement}, got {name}={value!r}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["temperature", "top_p"],
                   meta_fields=["top_k"])
@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen from the logits.

  A pytree: temperature and top_p are data (traced under jit: changing them does not
  recompile), top_k is static.

  Attributes:
    temperature: 0 for greedy (argmax); > 0 divides the logits before sampling.
    top_p: nucleus sampling, in (0, 1]: sample among the most likely tokens whose
      probabilities (after temperature) sum to top_p, always keeping the top token.
      1 disables it. Ignored when greedy.
    top_k: if set (>= 1), sample among the k most likely tokens only (before top_p).
  """

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int | None = None

  def __post_init__(self):
    _check_number("temperature", self.temperature, lambda t: t >= 0, "a finite number >= 0")
    _check_number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
    if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                   or self.top_k < 1):
      raise ValueError(f"top_k must be None or an int >= 1, got top_k={self.top_k!r}")


@dataclasses.dataclass
class Generation:
  """The result of `generate`.

  Attributes:
    tokens: the generated ids per sequence, up to and including its stop token.
    stopped: per sequence, whether it ended at a stop id (False: it ran out of
      max_new_tokens).
    prompt_lengths: tokens per prompt.
    prefill_seconds, decode_seconds: wall time of the `prefill` and `decode` calls,
      each to `block_until_ready`, host-side preparation excluded. They include
      tracing and compiling when `compiled` is True (the first call with these
      shapes); call `generate` twice for warm figures.
    cache: the final cache: `lengths[b] = prompt_lengths[b] + len(tokens[b])`.
    decode_steps: iterations of the decode loop (<= max_new_tokens).
    compiled: whether this call traced (and so compiled) `prefill` or `decode`.
  """

  tokens: list[list[int]]
  stopped: list[bool]
  prompt_lengths: list[int]
  prefill_seconds: float
  decode_seconds: float
  cache: kvtpu.KVCache
  decode_steps: int = 0
  compiled: bool = False

  @property
  def prefill_tokens_per_s(self) -> float:
    """Prompt tokens (padding not counted) per second of prefill."""
    return sum(self.prompt_lengths) / self.prefill_seconds

  @property
  def decode_tokens_per_s(self) -> float:
    """Generated tokens per second of decode.

    Every generated token goes through the model exactly once in the decode loop,
    in the step that writes it to the cache; finished rows' idle slots in later steps
    are not counted. So this is `sum(len(t) for t in tokens) / decode_seconds`: for an
    unstopped batch, `B * decode_steps / decode_seconds`.
    """
    return sum(len(t) for t in self.tokens) / self.decode_seconds


# ------------------------------------------------------------------------ sampling
def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """The next token per row from `logits: f32[B, V]`: `i32[B]`.

  Greedy (argmax) when `sampling.temperature == 0`; else a draw from
  `softmax(logits / temperature)` restricted to the top_k tokens (if set) and then
  to the nucleus of mass top_p (the smallest set of most likely tokens whose
  probabilities reach top_p; the top token is always kept). Rows draw independently
  from the one key.
  """
  v = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  temperature = jnp.asarray(sampling.temperature, jnp.float32)
  top_p = jnp.asarray(sampling.top_p, jnp.float32)

  def greedy():
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def truncated(scaled):
    # Sorted descending (lax.top_k breaks ties toward the lower index, as argmax does).
    vals, idx = jax.lax.top_k(scaled, v if sampling.top_k is None else min(sampling.top_k, v))
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the more likely tokens.
    keep = (before < top_p) | (jnp.arange(vals.shape[-1]) == 0)[None, :]
    choice = jax.random.categorical(key, jnp.where(keep, vals, -jnp.inf), axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

  def stochastic():
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    if sampling.top_k is not None:
      return truncated(scaled)
    plain = lambda: jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(top_p < 1, lambda: truncated(scaled), plain)

  return jax.lax.cond(temperature == 0, greedy, stochastic)


# ----------------------------------------------------------------- jitted phases
@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "chunk"),
                   donate_argnames=("cache",))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, cache: kvtpu.KVCache, tokens: jax.Array,
            lengths: jax.Array, key: jax.Array, sampling: Sampling, *,
            impl: str = "auto", chunk: int | None = None) -> tuple[jax.Array, kvtpu.KVCache]:
  """Runs right-padded prompts through the model and samples each one's first new token.

  Args:
    graphdef, state: `nnx.split(model)` of a `Llama` (graphdef is static).
    cache: an empty cache of the model (`model.init_cache`), donated.
    tokens: `i32[B, P]`, prompt `b` in `tokens[b, :lengths[b]]`, then padding.
    lengths: `i32[B]`, each >= 1.
    key: PRNG key of the draw (unused when greedy).
    sampling: how to choose the token.
    impl: `kvtpu.attend` implementation.
    chunk: None: the whole `[B, P]` in one model call. Else P must be a multiple of
      it: a `lax.scan` over `[B, chunk]` chunks, each attending to the cache the
      earlier ones wrote (bounded activation memory at long context; rows whose
      prompt ended write nothing).

  Returns:
    `(first i32[B], cache)` with `cache.lengths == lengths` (plus the old lengths).
  """
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  if chunk is None or chunk >= p:
    logits, cache = model(tokens, cache, valid_len=lengths, impl=impl, logits_at=lengths - 1)
    return sample_logits(logits[:, 0], key, sampling), cache
  if p % chunk:
    raise ValueError(f"the padded prompt length P={p} must be a multiple of chunk={chunk}")

  def one_chunk(carry, start):
    cache, last = carry
    part = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)  # [B, chunk]
    valid = jnp.clip(lengths - start, 0, chunk)
    logits, cache = model(part, cache, valid_len=valid, impl=impl,
                          logits_at=jnp.clip(lengths - 1 - start, 0, chunk - 1))
    here = (lengths - 1 >= start) & (lengths - 1 < start + chunk)  # [B]
    return (cache, jnp.where(here[:, None], logits[:, 0], last)), None

  starts = jnp.arange(0, p, chunk, dtype=jnp.int32)
  last = jnp.zeros((b, model.cfg.vocab_size), jnp.float32)
  (cache, last), _ = jax.lax.scan(one_chunk, (cache, last), starts)
  return sample_logits(last, key, sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "impl"),
                   donate_argnames=("cache",))
def decode(graphdef: nnx.GraphDef, state: nnx.State, cache: kvtpu.KVCache, first: jax.Array,
           key: jax.Array, stop_ids: jax.Array, sampling: Sampling, *, max_new_tokens: int,
           impl: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, kvtpu.KVCache]:
  """The decode loop, one `lax.while_loop` from the first new token to the last.

  Step i writes the last token of every row that has one not yet in the cache
  (`valid_len` 1, others 0) and samples the next token of every row still
  generating, with the i-th split of `key`. A row stops generating after a token in
  `stop_ids` or after `max_new_tokens` tokens; the loop exits when every row's
  tokens are all in the cache (at most `max_new_tokens` steps).

  Args:
    graphdef, state: `nnx.split(model)` (graphdef is static).
    cache: the cache after `prefill`, donated.
    first: `i32[B]`, the tokens `prefill` sampled.
    key: PRNG key of the draws; split once per step.
    stop_ids: `i32[S]` (S >= 1; pad with -1 for none).
    sampling: how to choose each token.
    max_new_tokens: N, the tokens per row at most (first included).
    impl: `kvtpu.attend` implementation.

  Returns:
    `(tokens i32[B, N], num_generated i32[B], stopped bool[B], steps i32[], cache)`;
    row b's tokens are `tokens[b, :num_generated[b]]` (the rest is -1), and the
    cache holds them all.
  """
  TRACE_COUNTS["decode"] += 1
  model = nnx.merge(graphdef, state)
  b = first.shape[0]
  slots = jnp.arange(max_new_tokens, dtype=jnp.int32)[None, :]
  tokens = jnp.where(slots == 0, first[:, None], -1)  # [B, N]
  num_generated = jnp.ones((b,), jnp.int32)
  written = jnp.zeros((b,), jnp.int32)  # Generated tokens in the cache.
  stopped = jnp.isin(first, stop_ids)

  def pending(carry):
    num_generated, written = carry[4], carry[5]
    return jnp.any(written < num_generated)

  def step(carry):
    i, key, cache, tokens, num_generated, written, stopped = carry
    to_write = written < num_generated
    last = jnp.take_along_axis(tokens, (num_generated - 1)[:, None], axis=1)  # [B, 1]
    logits, cache = model(last, cache, valid_len=to_write.astype(jnp.int32), impl=impl)
    key, sub = jax.random.split(key)
    nxt = sample_logits(logits[:, 0], sub, sampling)
    generating = to_write & ~stopped & (num_generated < max_new_tokens)
    tokens = jnp.where(generating[:, None] & (slots == num_generated[:, None]), nxt[:, None],
                       tokens)
    stopped = stopped | (generating & jnp.isin(nxt, stop_ids))
    return (i + 1, key, cache, tokens, num_generated + generating, written + to_write, stopped)

  steps, _, cache, tokens, num_generated, _, stopped = jax.lax.while_loop(
      pending, step, (jnp.int32(0), key, cache, tokens, num_generated, written, stopped))
  return tokens, num_generated, stopped, steps, cache


# ------------------------------------------------------------------------- driver
def default_max_len(prompt_lengths: Sequence[int], max_new_tokens: int, kv_format=None) -> int:
  """Cache positions for the longest prompt plus max_new_tokens, rounded up to 128, or to
  what the format (or every format of a layer plan) needs max_len to be a multiple of
  (`QuantizedKV.max_len_multiple`: a `c<N>` spec's N)."""
  multiple = MAX_LEN_MULTIPLE
  if kv_format is not None:
    plan = kvtpu.LayerPlan.parse(kv_format)
    multiple = math.lcm(multiple, *(QuantizedKV.max_len_multiple(spec)
                                    for fmt in plan.all_formats
                                    for spec in (fmt.k, fmt.v)))
  need = max(prompt_lengths) + max_new_tokens
  return -(-need // multiple) * multiple


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
                max_len: int | None = None,
                chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts to a multiple of `PROMPT_BUCKET` (at most max_len), or of
  `chunk` when the longest prompt is longer than one chunk.

  Returns:
    `(tokens i32[B, P], lengths i32[B])`.
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  longest = int(lengths.max())
  if chunk is not None and longest > chunk:
    width = -(-longest // chunk) * chunk
  else:
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    if max_len is not None:
      width = max(min(width, max_len), longest)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, lengths


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
    raise TypeError(f"prompts must be a sequence of token-id sequences, got "
                    f"{type(prompts).__name__}")
  if not prompts:
    raise ValueError("prompts is empty: pass at least one prompt")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, (str, bytes)):
      raise TypeError(f"prompts[{i}] is a string; pass token ids (tokenizer.encode(text))")
    try:
      ids = [operator.index(t) for t in p]
    except TypeError:
      raise TypeError(f"prompts[{i}] must be a sequence of int token ids, got {p!r}") from None
    if not ids:
      raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"prompts[{i}] has token ids outside [0, vocab_size={vocab_size}): "
                       f"{bad[:5]}")
    out.append(ids)
  return out


def _check_int(name: str, value, low: int) -> int:
  try:
    if isinstance(value, bool):
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an int, got {name}={value!r}") from None
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {name}={value}")
  return value


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             kv_format: str | kvtpu.KVFormat | kvtpu.LayerPlan = "bf16",
             stop_ids: Sequence[int] = (),
             sampling: Sampling = Sampling(), key: jax.Array | None = None,
             max_len: int | None = None, impl: str = "auto", pad_id: int = 0,
             prefill_chunk: int | None = 512,
             static_scales: Mapping[str, jax.Array] | None = None,
             calibration=None) -> Generation:
  """Generates up to `max_new_tokens` tokens for each prompt, batched, on a kvtpu cache.

  Args:
    model: a `kvtpu.models.llama.Llama` (anything with its call, `init_cache` and `cfg`).
    prompts: B prompts of token ids, of any (ragged) lengths >= 1.
    max_new_tokens: N >= 1, the most tokens per prompt (the stop token included).
    kv_format: the cache format, a name (`"int8"`, `"k8v4"`, ...) or a `KVFormat`; or a
      `kvtpu.LayerPlan` (or plan name) of formats per layer.
    stop_ids: ids that end a sequence (e.g. eos and `<|im_end|>`); it is included in
      its tokens. Empty: every row runs to N.
    sampling: greedy by default; see `Sampling`.
    key: PRNG key of the sampling (default `jax.random.key(0)`); split into prefill
      and decode keys, and the decode key once per step.
    max_len: cache positions; default `default_max_len` (longest prompt + N, rounded
      up to 128). It must hold the longest prompt plus N.
    impl: `kvtpu.attend` implementation ("auto", "xla", "pallas", "interpret").
    pad_id: the token id padding the prompts (never attended to nor cached).
    prefill_chunk: prompts longer than this are prefilled in chunks of this many
      tokens (one compiled `lax.scan`), bounding activation memory; None: one call.
      On SmolLM2 at 4096 tokens on CPU, 512-token chunks are also faster (47 vs 36
      tokens/s).
    static_scales: calibrated scales for a static-scale `kv_format`, passed to
      `model.init_cache` (`k_scale=`, `v_scale=`, ...).
    calibration: or a `kvtpu.calibration.CalibrationArtifact` for `kv_format` (static
      scales or clip ratios), checked against the model.

  Returns:
    A `Generation`: tokens, stop flags, timings and the final cache.

  Raises:
    ValueError: for no prompts, an empty prompt, an id outside the vocabulary,
      max_new_tokens < 1, a max_len too small, an unknown impl or format name.
    TypeError: for arguments of the wrong type.
  """
  vocab = model.cfg.vocab_size
  prompts = _check_prompts(prompts, vocab)
  max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
  pad_id = _check_int("pad_id", pad_id, 0)
  if pad_id >= vocab:
    raise ValueError(f"pad_id={pad_id} must be < vocab_size={vocab}")
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
  for name in ("temperature", "top_p"):
    if not isinstance(getattr(sampling, name), numbers.Real):
      raise TypeError(f"sampling.{name} must be a real number, got {getattr(sampling, name)!r}")
  # Python floats: every value traces alike (weak float32), so none recompiles.
  sampling = Sampling(float(sampling.temperature), float(sampling.top_p), sampling.top_k)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
  try:
    stops = sorted({operator.index(s) for s in stop_ids})
  except TypeError:
    raise TypeError(f"stop_ids must be int token ids, got stop_ids={stop_ids!r}") from None
  fmt = kvtpu.LayerPlan.config(kv_format)
  lengths_list = [len(p) for p in prompts]
  need = max(lengths_list) + max_new_tokens
  if max_len is None:
    max_len = default_max_len(lengths_list, max_new_tokens, fmt)
  else:
    max_len = _check_int("max_len", max_len, 1)
    if max_len < need:
      raise ValueError(
          f"max_len={max_len} is too small: the longest prompt ({max(lengths_list)} tokens) plus "
          f"max_new_tokens={max_new_tokens} need {need} cache positions")
  if need > model.cfg.max_position:
    logging.warning("generate: %d positions exceed the %d that %s was trained for", need,
                    model.cfg.max_position, model.cfg.name)
  if key is None:
    key = jax.random.key(0)
  prefill_key, decode_key = jax.random.split(key)

  if prefill_chunk is not None:
    prefill_chunk = min(_check_int("prefill_chunk", prefill_chunk, 1), max_len)
  tokens, lengths = pad_prompts(prompts, pad_id=pad_id, max_len=max_len, chunk=prefill_chunk)
  cache = model.init_cache(fmt, batch=len(prompts), max_len=max_len, calibration=calibration,
                           **(static_scales or {}))
  # Padded with -1 (no token) to a multiple of STOP_BUCKET: one compile serves them all.
  width = max(1, -(-len(stops) // STOP_BUCKET)) * STOP_BUCKET
  stop_arr = jnp.asarray(stops + [-1] * (width - len(stops)), jnp.int32)
  graphdef, state = nnx.split(model)
  traces = sum(TRACE_COUNTS.values())
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  jax.block_until_ready((state, cache, tokens, lengths, stop_arr))

  start = time.perf_counter()
  first, cache = prefill(graphdef, state, cache, tokens, lengths, prefill_key, sampling, impl=impl,
                         chunk=prefill_chunk)
  jax.block_until_ready((first, cache))
  mid = time.perf_counter()
  out, num_generated, stopped, steps, cache = decode(
      graphdef, state, cache, first, decode_key, stop_arr, sampling,
      max_new_tokens=max_new_tokens, impl=impl)
  jax.block_until_ready((out, cache))
  end = time.perf_counter()

  out, num_generated, stopped, steps = jax.device_get((out, num_generated, stopped, steps))
  return Generation(
      tokens=[row[:n].tolist() for row, n in zip(out, num_generated, strict=True)],
      stopped=[bool(s) for s in stopped], prompt_lengths=lengths_list,
      prefill_seconds=mid - start, decode_seconds=end - mid, cache=cache,
      decode_steps=int(steps), compiled=sum(TRACE_COUNTS.values()) > traces)

"""Teacher-forced scoring through the cache: every scored token reads the quantized past.

Serving writes K/V into the cache and attends over what the cache holds, so a
quantized cache changes the model's output only through what it stores. The
protocol reproduces that: the tokens of a batch of sequences are fed in chunks,
each through the model's `update` / `attend` / `advance` path, into a reference
cache (bf16 by default) and into each cache under test. A chunk's logits at
position `t` predict the token at `t + 1`, and they were computed attending to the
keys and values of every earlier position as the cache stored them.

  Protocol(prefill=512, chunk=128)   the first chunk (a prompt's prefill), then
                                     chunks of `chunk` tokens (1: pure decode)

Sequences of different lengths run together (the concurrency regime): each
sequence's chunk is ragged (`valid_len`), its padding is neither written nor
scored. One jitted step per chunk shape runs the reference and, per cache under
test, one jitted step compares against the reference chunk's logits and attention
outputs (`metrics.token_metrics`), so only one chunk's reference logits are ever
held.

The model is a pure function `forward(params, tokens, cache, valid_len, observe) ->
(logits, cache)`: `tokens: i32[B, T]` at positions `cache.lengths + t`, `logits:
f32[B, T, V]`, the cache advanced by `valid_len`; `observe(layer, kind, x)` is called
while tracing, and `kind == "attn"` with `x` the layer's attention output `[B, T,
N, H]` gives the per-layer attention-output error (`kvtpu.models.evaluate.forward_fn`
wraps `kvtpu.models.llama.Llama`). kvtpu never imports a model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu.cache import KVCache
from kvtpu.eval import metrics as metrics_lib

__all__ = ["Protocol", "RunResult", "score", "ragged_lengths"]

Forward = Callable[..., tuple[jax.Array, KVCache]]


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How sequences are fed through the cache.

  Attributes:
    prefill: tokens of the first chunk (a prompt's prefill).
    chunk: tokens of every later chunk; 1 is pure decode.
    impl: the attention implementation the forward uses (recorded; the caller's
      forward applies it).
    reference: the reference cache format (bf16: what an unquantized server stores).
  """

  prefill: int = 512
  chunk: int = 128
  impl: str = "auto"
  reference: str = "bf16"

  def __post_init__(self):
    for name in ("prefill", "chunk"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Protocol.{name} must be a positive int, got {name}={value!r}")

  def schedule(self, length: int) -> list[tuple[int, int]]:
    """`(start, size)` of each chunk covering `length` positions.

    Sizes are capped at `length` (a chunk never outgrows the cache); the last chunk
    may overhang the end (its extra positions are padding).
    """
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}")
    out = [(0, min(self.prefill, length))]
    while out[-1][0] + out[-1][1] < length:
      start = out[-1][0] + out[-1][1]
      out.append((start, min(self.chunk, length)))
    return out

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def ragged_lengths(context: int, batch: int) -> np.ndarray:
  """Sequence lengths of a concurrent batch: `context * (1 - b / (2 * batch))`, b < batch.

  The first sequence is `context` long, the others progressively shorter (down to
  just over half), so ragged chunks, masking and per-sequence positions are always
  exercised.
  """
  if context < 2 or batch < 1:
    raise ValueError(f"need context >= 2 and batch >= 1, got context={context}, batch={batch}")
  return np.array([max(2, context - (b * context) // (2 * batch)) for b in range(batch)],
                  np.int32)


@dataclasses.dataclass
class RunResult:
  """One cache under test, over all its scored tokens.

  Attributes:
    metrics: `metrics.summarize` plus per layer `attn_rel_error` (||attn - attn_ref|| /
      ||attn_ref|| over the valid tokens, each layer's output in the full run, so
      errors of earlier layers propagate), `saturation_k`, `saturation_v` (the
      cache's run-time clip rates).
    per_token: the scored tokens' `nll_ref`, `nll`, `kl`, `agree` (1-D), in order of
      sequence, then position.
    cache: the cache after the last chunk.
  """

  metrics: dict[str, Any]
  per_token: dict[str, np.ndarray]
  cache: KVCache


def _run(forward, params, tokens, cache, valid_len):
  attn: dict[int, jax.Array] = {}

  def observe(layer, kind, x):
    if kind == "attn":
      attn[layer] = x

  logits, cache = forward(params, tokens, cache, valid_len, observe)
  stacked = jnp.stack([attn[k] for k in sorted(attn)]) if attn else jnp.zeros((0,))
  return logits, stacked, cache


def _reference_step(params, cache, tokens, valid_len, *, forward):
  return _run(forward, params, tokens, cache, valid_len)


def _compare_step(params, cache, tokens, valid_len, targets, ref_logits, ref_attn, *, forward):
  logits, attn, cache = _run(forward, params, tokens, cache, valid_len)
  m = metrics_lib.token_metrics(ref_logits, logits, targets)
  if attn.ndim == 5:  # [L, B, T, N, H]
    t = tokens.shape[1]
    valid = (jnp.arange(t)[None, :] < valid_len[:, None])[None, :, :, None, None]
    diff = jnp.where(valid, attn.astype(jnp.float32) - ref_attn.astype(jnp.float32), 0.0)
    ref = jnp.where(valid, ref_attn.astype(jnp.float32), 0.0)
    m["attn_err2"] = jnp.sum(jnp.square(diff), axis=(1, 2, 3, 4))
    m["attn_ref2"] = jnp.sum(jnp.square(ref), axis=(1, 2, 3, 4))
  return cache, m


def _commit(tree):
  return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, x.sharding), tree)


_STEPS: dict[Any, tuple[Callable, Callable]] = {}


def _steps(forward) -> tuple[Callable, Callable]:
  """The jitted steps of one forward, made once: jit caches compiles per shape and format."""
  if forward not in _STEPS:
    _STEPS[forward] = (
        jax.jit(lambda *a: _reference_step(*a, forward=forward), donate_argnums=(1,)),
        jax.jit(lambda *a: _compare_step(*a, forward=forward), donate_argnums=(1,)))
  return _STEPS[forward]


def score(forward: Forward, params, tokens: np.ndarray, lengths, caches: Mapping[str, KVCache],
          reference: KVCache, protocol: Protocol = Protocol(),
          progress: Callable[[int, int, float], None] | None = None) -> dict[str, RunResult]:
  """Scores every cache in `caches` against `reference` on the same sequences.

  Args:
    forward: the model as a pure function (module docstring); keep one object per
      model, the jitted steps are cached per forward.
    params: its parameters (a pytree; passed to every step).
    tokens: `int[B, S]` token ids; sequence b is `tokens[b, :lengths[b]]`.
    lengths: `int[B]`, each in [2, S]; the tokens after position 0 are scored.
    caches: label -> an empty cache under test (batch B, max_len >= S).
    reference: an empty reference cache (same batch, max_len >= S).
    protocol: chunk sizes.
    progress: called after each chunk as `progress(chunks_done, chunks_total, seconds)`.

  Returns:
    label -> `RunResult`.

  Raises:
    ValueError: for mismatched shapes, non-empty caches, or lengths out of range.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be an integer [B, S] array, got {tokens.dtype}{tokens.shape}")
  b, s = tokens.shape
  lengths = np.asarray(lengths, np.int32)
  if lengths.shape != (b,) or (lengths < 2).any() or (lengths > s).any():
    raise ValueError(f"lengths must be {b} ints in [2, {s}], got {lengths.tolist()}")
  if not caches:
    raise ValueError("caches is empty: nothing to score against the reference")
  for label, cache in {"reference": reference, **caches}.items():
    if cache.batch != b or cache.max_len < s:
      raise ValueError(f"cache {label!r} has batch={cache.batch}, max_len={cache.max_len}; the "
                       f"tokens need batch={b}, max_len >= {s}")
    if np.asarray(cache.lengths).any():
      raise ValueError(f"cache {label!r} is not empty (lengths {np.asarray(cache.lengths)})")
  ref_step, cmp_step = _steps(forward)
  # The steps return committed caches; committing the fresh ones too keeps the second
  # chunk from compiling the same step again for other argument placements.
  reference, caches = _commit(reference), {k: _commit(c) for k, c in caches.items()}
  schedule = protocol.schedule(s)
  padded = np.zeros((b, schedule[-1][0] + schedule[-1][1] + 1), np.int32)
  padded[:, :s] = tokens
  caches = dict(caches)
  kept: dict[str, dict[str, list]] = {k: {} for k in caches}
  where = []  # Per chunk, the scored tokens' b * width + position: to order them.
  start_time = time.perf_counter()
  for i, (start, size) in enumerate(schedule):
    chunk = jnp.asarray(padded[:, start:start + size])
    valid_len = jnp.asarray(np.clip(lengths - start, 0, size), jnp.int32)
    targets = jnp.asarray(padded[:, start + 1:start + size + 1])
    scored = (start + np.arange(size)[None, :] + 1) < lengths[:, None]
    where.append((np.arange(b)[:, None] * padded.shape[1] + start + np.arange(size))[scored])
    ref_logits, ref_attn, reference = ref_step(params, reference, chunk, valid_len)
    for label in caches:
      caches[label], m = cmp_step(params, caches[label], chunk, valid_len, targets, ref_logits,
                                  ref_attn)
      m = jax.device_get(m)
      for name, value in m.items():
        value = np.asarray(value)
        kept[label].setdefault(name, []).append(value if name.startswith("attn") else
                                                value[scored])
    if progress is not None:
      progress(i + 1, len(schedule), time.perf_counter() - start_time)
  order = np.argsort(np.concatenate(where), kind="stable")
  results = {}
  for label, cache in caches.items():
    per_token = {k: np.concatenate(v)[order] for k, v in kept[label].items()
                 if not k.startswith("attn")}
    out: dict[str, Any] = metrics_lib.summarize(per_token)
    if "attn_err2" in kept[label]:
      err2 = np.sum(kept[label]["attn_err2"], axis=0, dtype=np.float64)
      ref2 = np.sum(kept[label]["attn_ref2"], axis=0, dtype=np.float64)
      out["attn_rel_error"] = np.sqrt(err2 / np.maximum(ref2, 1e-30)).tolist()
    else:
      out["attn_rel_error"] = []
    rates = cache.saturation_rates()
    out["saturation_k"] = rates["k"].tolist()
    out["saturation_v"] = rates["v"].tolist()
    results[label] = RunResult(out, per_token, cache)
  return results

"""Shared test support, the one home of what several test modules use.

Comparisons that explain failures, data with outliers, NaN poisoning of unwritten
cache memory, the float64 attention oracle, the tiny model config, a calibration
statistics feeder. Test modules import from here (or from the support modules
`tests/models/reference.py` and `tests/pallas_kernels/cases.py`), never from each
other.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.models.config import ModelConfig

import kvtpu
from kvtpu.calibration import stats as stats_lib

# The tiny random Llama config of model, protocol, calibration and binary tests:
# 2 layers, GQA 3 (6 query heads over 2 kv heads), head dim 16.
TINY = ModelConfig("tiny", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=6, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                   tie_embeddings=True, max_position=64)


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "value") -> None:
  """Asserts |actual - expected| <= atol + rtol * |expected| elementwise.

  On failure the message gives the max abs and rel error, the number of mismatches
  and the first bad index with both values.
  """
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  if a.shape != e.shape:
    raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
  if a.size == 0:
    return
  err = np.abs(a - e)
  bad = ~(err <= atol + rtol * np.abs(e))  # NaN anywhere counts as bad.
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    rel = err / np.maximum(np.abs(e), 1e-30)
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.size} elements differ (atol={atol}, rtol={rtol}); "
        f"max abs err {np.nanmax(err):.3e}, max rel err {np.nanmax(rel):.3e}; first bad index "
        f"{idx}: actual {a[idx]!r}, expected {e[idx]!r}")


def kv_with_outliers(rng: np.random.Generator, shape, *, channel_scale: float = 50.0,
                     token_scale: float = 20.0, num_channels: int = 2,
                     num_tokens: int = 2) -> np.ndarray:
  """Normal data `[B, T, K, H]` with a few channels and tokens at 20-100x the typical size.

  Outlier channels (fixed per kv head, as in real keys) are multiplied by
  `channel_scale`; outlier tokens by `token_scale`.
  """
  x = rng.standard_normal(shape).astype(np.float32)
  _, t, _, h = shape
  chans = rng.choice(h, size=min(num_channels, h), replace=False)
  x[..., chans] *= channel_scale
  if t:
    toks = rng.choice(t, size=min(num_tokens, t), replace=False)
    x[:, toks] *= token_scale
  return x


def run_binary(module: str, *args: str, workdir, timeout: float = 600, env=None):
  """Runs `python -m <module> --workdir=<workdir> <args>` on CPU in a subprocess (absl
  flags are process-global, so experiment binaries cannot share the pytest process),
  with the test process's fake devices and its cheapest CPU code generation
  (tests/conftest.py: flags libtpu rejects, so for binaries run on the CPU only)."""
  import pathlib  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  flags = f"{os.environ.get('XLA_FLAGS', '')} {os.environ.get('KVTPU_TEST_CPU_XLA_FLAGS', '')}".strip()
  return subprocess.run(
      [sys.executable, "-m", module, f"--workdir={workdir}", *args], cwd=root,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **(env or {})},
      capture_output=True, text=True, timeout=timeout)


def flat_arrays(tree) -> dict:
  """`{"k.values": leaf, "k.scale": leaf, "lengths": leaf, ...}`: a pytree's leaves by path."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}


def poison(cache):
  """NaN in every float array of the cache (values, scales, zero points)."""
  def nan_like(x):
    if x is None or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jnp.full_like(x, jnp.nan)
  return dataclasses.replace(cache, k=jax.tree.map(nan_like, cache.k),
                             v=jax.tree.map(nan_like, cache.v))


def write_chunks(fmt, rng, steps, *, max_len: int, head_dim: int, layer: int = 1):
  """A NaN-poisoned 2-layer cache (2 kv heads) after writing the chunks `steps` (`(T,
  valid_len [B])` each, all but the last advanced) of K/V with outliers into `layer`.

  Every chunk goes to `update` `max_len` wide, its T tokens followed by NaN padding that
  `valid_len` leaves unwritten: one compiled write serves every chunk of a format, and
  a padding token that reached the cache (or a scale) would poison what the tests read.

  Returns the cache, the written K and V `[B, S, K, H]` (NaN where nothing was
  written), the tokens each sequence holds, and the last chunk's valid lengths.
  """
  b = len(steps[0][1])
  cache = poison(kvtpu.KVCache.init(fmt, num_layers=2, batch=b, kv_heads=2, max_len=max_len,
                                    head_dim=head_dim))
  keys, values = (np.full((b, max_len, 2, head_dim), np.nan, np.float32) for _ in range(2))
  held = np.zeros(b, np.int64)
  valid = np.zeros(b, np.int64)
  for i, (t, valid) in enumerate(steps):
    valid = np.asarray(valid)
    k, v = (kv_with_outliers(rng, (b, t, 2, head_dim)) for _ in range(2))
    pad = np.full((b, max_len - t, 2, head_dim), np.nan, np.float32)
    cache = cache.update(layer, *(jnp.asarray(np.concatenate([x, pad], axis=1)) for x in (k, v)),
                         valid_len=np.minimum(valid, t))
    for j in range(b):
      n = min(valid[j], max_len - held[j])
      keys[j, held[j]:held[j] + n] = k[j, :n]
      values[j, held[j]:held[j] + n] = v[j, :n]
    held = np.minimum(held + valid, max_len)
    if i < len(steps) - 1:
      cache = cache.advance(valid)
  return cache, keys, values, held, valid


def prefix_cases(fmts: Sequence[str], prefixes: Sequence, *, stride: int = 1) -> list:
  """`pytest.param(fmt, prefix, t)` for the format and `(prefix, t)` pairs (a cache
  holding `prefix` tokens per sequence, then a chunk of t) on every `stride`-th
  diagonal of the grid (1: all of it), the fast tier running one diagonal (each
  format and each prefix at least once when they are as many)."""
  return [pytest.param(fmt, prefix, t, id=f"{fmt}-{prefix}-{t}",
                       marks=slow_unless((i + j) % len(fmts) == 0))
          for i, fmt in enumerate(fmts) for j, (prefix, t) in enumerate(prefixes)
          if (i + j) % stride == 0]


def chunked(lengths, chunks) -> list:
  """`write_chunks` steps that write `lengths` tokens per sequence in chunks of the
  given sizes."""
  steps, done = [], np.zeros(len(lengths), np.int64)
  for t in chunks:
    valid = np.clip(np.asarray(lengths) - done, 0, t)
    steps.append((t, valid))
    done += valid
  return steps


def np_attention(q, keys, values, lengths, chunk, scale):
  """float64 loops: q [B,T,N,H]; keys/values [B,K,S,H] as stored (dequantized)."""
  b_, t_, n_, h_ = q.shape
  k_ = keys.shape[1]
  out = np.zeros(q.shape, np.float64)
  for b in range(b_):
    end = lengths[b] + chunk[b]
    for t in range(min(t_, chunk[b])):  # Rows past the chunk are padding: zeros.
      pos = lengths[b] + min(t, max(chunk[b] - 1, 0))
      n_keys = min(pos + 1, end)
      if n_keys == 0:
        continue
      for n in range(n_):
        kh = n // (n_ // k_)
        logits = keys[b, kh, :n_keys] @ q[b, t, n].astype(np.float64) * scale
        p = np.exp(logits - logits.max())
        out[b, t, n] = (p / p.sum()) @ values[b, kh, :n_keys]
  return out


def feed_stats(stats, layer: int, tokens: np.ndarray, *, chunk: int = 4096):
  """Observes `tokens: [n, K, H]` into calibration `stats` in padded `[1, chunk]` batches,
  the padding masked out by the valid mask (one batch shape, so one compile)."""
  n, k, h = tokens.shape
  padded = np.zeros((-(-n // chunk) * chunk, k, h), np.float32)
  padded[:n] = tokens
  valid = np.arange(padded.shape[0]) < n
  for i in range(0, padded.shape[0], chunk):
    stats = stats_lib.observe(stats, layer, jnp.asarray(padded[None, i:i + chunk]),
                              jnp.asarray(valid[None, i:i + chunk]))
  return stats


def covering_cases(name: str, full: dict[str, Sequence], sampled: dict[str, Sequence]) -> list[dict]:
  """Cases of a parameter grid too large to run whole: dicts of axis name -> value.

  The full product over the (small) `full` axes; each (large or secondary) `sampled`
  axis takes all its values. There are max(|product of full|, longest sampled axis)
  cases; case i takes combination i mod |product| of the full axes and, per sampled
  axis, the i-th entry of that axis's values repeated to the number of cases and
  shuffled by a seed from crc32(name + axis). So every value of every axis appears in
  some case, every combination of the full axes appears, and the pairings are fixed
  per `name` (the test's name) across runs and workers.
  """
  product = list(itertools.product(*full.values())) or [()]
  n = max([len(product)] + [len(v) for v in sampled.values()])
  picks = {axis: np.random.default_rng(zlib.crc32(f"{name}:{axis}".encode())).permutation(
      np.resize(np.arange(len(v)), n)) for axis, v in sampled.items()}
  cases = []
  for i in range(n):
    case = dict(zip(full, product[i % len(product)], strict=True))
    for axis, values in sampled.items():
      case[axis] = values[int(picks[axis][i])]
    cases.append(case)
  return cases


def bits(x) -> np.ndarray:
  """The stored bits of an array (gathered to the host; NaN payloads included), int4
  and int2 widened to int8."""
  x = np.asarray(x)
  if x.dtype in (jnp.int4, jnp.int2):
    return x.astype(np.int8)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.view(f"uint{8 * x.dtype.itemsize}")
  return x


def slow_unless(fast: bool) -> list:
  """Marks for `pytest.param`: none for a case of the fast tier, `slow` for the rest."""
  return [] if fast else [pytest.mark.slow]


class ByteTokenizer:
  """A tiny stand-in tokenizer: id = byte + 3; optionally adds BOS (id 1) to every encode."""

  vocab_size = 259

  def __init__(self, add_bos: bool = False):
    self.add_bos = add_bos
    self.bos_id = 1

  def encode(self, text: str) -> list[int]:
    return [1] * self.add_bos + [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

  def encode_chat(self, messages, *, add_generation_prompt: bool = True) -> list[int]:
    text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
    return self.encode(text + ("<assistant>" if add_generation_prompt else ""))

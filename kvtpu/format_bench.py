"""Cache formats side by side: bytes per token, and attention error against a bf16 cache.

The library side of the demo (`kvtpu.models.runs.demo`), as plain functions:

  bytes_table           exact bytes per token per layer (`kvtpu.memory.bytes_per_token`)
                        and the ratio to bf16, with the byte targets at head_dim 128.
  attention_error_rows  fills a cache of each format with the same synthetic K/V
                        (outlier channels and tokens, as real keys have) by one jitted
                        step (`update` -> `attend` -> `advance` per layer, the cache
                        donated) over a fixed-shape token buffer with per-sequence valid
                        lengths: ragged prefill chunks, then decode steps. Each decode
                        step's `attend(impl="xla")` output is compared with the bf16
                        cache's output for the same q/k/v.
  render_markdown       the two report tables (relative errors in percent).

Only dynamic (per-token scale) formats are measured: static formats need scales
calibrated on a model's K/V, which synthetic data cannot stand in for. K/V are
synthetic, not from a model, so there is no weight precision and no calibration
workload to report.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import kvtpu
from kvtpu import KVCache, KVFormat, reports

__all__ = ["KV_HEADS", "Q_HEADS", "NUM_LAYERS", "TARGETS", "split_formats", "check_formats",
           "synthetic_kv", "synthetic_qkv", "schedule", "bytes_table", "attention_error_rows",
           "merge_rows", "bytes_markdown", "error_markdown", "render_markdown"]

KV_HEADS = 8
Q_HEADS = 32  # Grouped-query attention: 4 query heads per kv head.
NUM_LAYERS = 2
PREFILL_CHUNKS = 2
MAX_DECODE_STEPS = 3
CHANNEL_OUTLIER_SCALE = 50.0
TOKEN_OUTLIER_SCALE = 20.0

# Bytes per token relative to bf16 at head_dim 128 that each format must meet (per-token-
# head scales).
TARGET_HEAD_DIM = 128
TARGETS = {"int8": 0.53, "fp8_e4m3": 0.53, "fp8_e5m2": 0.53, "int4": 0.28}

WEIGHT_PRECISION = "n/a (synthetic K/V, no model)"
DYNAMIC_CALIBRATION = "dynamic per-token scales (no calibration workload)"
BF16_CALIBRATION = "n/a (bf16, not quantized)"
STATIC_ERROR = ("static formats need scales calibrated on a model's K/V (kvtpu.experiments."
                "calibrate), not synthetic data; use a dynamic format (per-token scales), e.g. "
                "one of {presets}")


def split_formats(text: str) -> list[str]:
  """Splits a comma-separated list of format names, keeping `k=<spec>,v=<spec>` whole."""
  names: list[str] = []
  for part in (p.strip() for p in text.split(",")):
    if not part:
      continue
    if part.lower().startswith("v=") and names and names[-1].lower().startswith("k=") \
        and ",v=" not in names[-1].lower():
      names[-1] += "," + part
    else:
      names.append(part)
  return names


def check_formats(names) -> list[KVFormat]:
  """Parses format names; only dynamic-scale (or bf16) formats are accepted.

  Raises:
    ValueError: for an unknown name (listing the valid ones), a static format, or
      an empty list.
  """
  fmts = [KVFormat.parse(n) for n in names]
  if not fmts:
    raise ValueError("formats is empty; give at least one format name")
  static = [f.name for f in fmts if f.static]
  if static:
    dynamic = [p for p in kvtpu.PRESETS if not KVFormat.parse(p).static]
    raise ValueError(f"formats={static}: " + STATIC_ERROR.format(presets=", ".join(dynamic)))
  return list(dict.fromkeys(fmts))  # Drops repeats, keeps order.


def _check_head_dims(fmts, head_dims) -> None:
  if not head_dims:
    raise ValueError("head_dims is empty; give at least one head dimension")
  for h in head_dims:
    if not isinstance(h, int) or h < 1:
      raise ValueError(f"head_dims must be positive ints, got head_dims={list(head_dims)}")
    for f in fmts:
      for spec in (f.k, f.v):
        if spec.per_token:
          spec.num_groups(h)  # Raises for a group size that does not divide h.


def _ratio(fmt: KVFormat, head_dim: int, kv_heads: int) -> tuple[float, float]:
  b = kvtpu.memory.bytes_per_token(fmt, kv_heads=kv_heads, head_dim=head_dim)
  return b, b / kvtpu.memory.bytes_per_token("bf16", kv_heads=kv_heads, head_dim=head_dim)


def _field(fmt: KVFormat, fn) -> str:
  """One report field for K and V: shared value, or `k=...,v=...` when they differ."""
  k, v = fn(fmt.k), fn(fmt.v)
  return k if k == v else f"k={k},v={v}"


def _granularity(spec) -> str:
  g = spec.granularity.value
  if g == "channel_group":
    return f"channel per {spec.group_size} positions"
  return f"group{spec.group_size}" if g == "group" else g


def _scale_dtype(spec) -> str:
  return spec.scale_dtype if spec.quantized else "none"


def bytes_table(formats, head_dims, kv_heads: int = KV_HEADS) -> list[dict]:
  """Bytes one token adds to one layer, per format and head_dim, and the ratio to bf16.

  Args:
    formats: format names or `KVFormat`s.
    head_dims: head dimensions to tabulate.
    kv_heads: K, the number of kv heads.

  Returns:
    One dict per (format, head_dim): kv_format, k_dtype, v_dtype, granularity,
    scale_dtype, head_dim, kv_heads, bytes_per_token_per_layer, ratio_vs_bf16, and
    target / meets_target (None where no target is set: other formats, or
    head_dim != 128).
  """
  fmts = [KVFormat.parse(f) for f in formats]
  _check_head_dims(fmts, head_dims)
  rows = []
  for fmt in fmts:
    for h in head_dims:
      nbytes, ratio = _ratio(fmt, h, kv_heads)
      target = TARGETS.get(fmt.name) if h == TARGET_HEAD_DIM else None
      rows.append({
          "kv_format": fmt.name,
          "k_dtype": fmt.k.dtype.value,
          "v_dtype": fmt.v.dtype.value,
          "granularity": _field(fmt, _granularity),
          "scale_dtype": _field(fmt, _scale_dtype),
          "head_dim": h,
          "kv_heads": kv_heads,
          "bytes_per_token_per_layer": nbytes,
          "ratio_vs_bf16": ratio,
          "target": target,
          "meets_target": None if target is None else bool(ratio <= target),
      })
  return rows


def synthetic_kv(rng: np.random.Generator, shape, *, channel_outliers: bool,
                 num_channels: int = 2, num_tokens: int = 2) -> np.ndarray:
  """Standard-normal `[L, B, S, K, H]` data with outliers, float32.

  With `channel_outliers`, `num_channels` channels per (layer, kv head), fixed across
  tokens as in real keys, are scaled by 50x (+-20%). Position 0 (an attention-sink-like
  token) and `num_tokens` random positions are scaled by 20x (+-20%).
  """
  x = rng.standard_normal(shape).astype(np.float32)
  num_layers, _, s, kv_heads, h = shape
  if channel_outliers:
    for layer in range(num_layers):
      for head in range(kv_heads):
        chans = rng.choice(h, size=min(num_channels, h), replace=False)
        factor = CHANNEL_OUTLIER_SCALE * rng.uniform(0.8, 1.2, size=len(chans))
        x[layer, :, :, head, chans] *= factor[:, None, None].astype(np.float32)  # [C, B, S]
  toks = np.unique(np.concatenate([[0], rng.choice(s, size=min(num_tokens, s), replace=False)]))
  x[:, :, toks] *= (TOKEN_OUTLIER_SCALE * rng.uniform(0.8, 1.2, size=len(toks)))[:, None, None]
  return x


def synthetic_qkv(rng: np.random.Generator, *, num_layers: int, batch: int, context: int,
                  kv_heads: int, q_heads: int, head_dim: int, steps: int) -> dict:
  """Keys with outlier channels and tokens, values with outlier tokens, decode queries.

  Returns `{"k", "v": [L, B, S, K, H], "q": [L, B, steps, N, H]}`. Queries are standard
  normal divided by the keys' typical RMS (the median over tokens, outlier channels
  included), so that ordinary tokens' logits `q.k / sqrt(H)` have about unit variance
  and outlier tokens stand out; with unscaled queries the 50x channels alone would make
  every softmax nearly one-hot and the error table a count of rare argmax flips.
  """
  shape = (num_layers, batch, context, kv_heads, head_dim)
  k = synthetic_kv(rng, shape, channel_outliers=True)
  v = synthetic_kv(rng, shape, channel_outliers=False)
  q = rng.standard_normal((num_layers, batch, steps, q_heads, head_dim)).astype(np.float32)
  q /= np.sqrt(np.mean(np.median(np.square(k), axis=2)))
  return {"k": k, "v": v, "q": q}


def _step(cache: KVCache, q, k, v, valid_len):
  """One step over all layers: write a fixed-shape token buffer, attend, advance.

  k, v: `[L, B, C, K, H]`, a buffer of C token slots of which the first
  `valid_len[b]` are real (a prefill chunk, or one decode token and padding);
  q: `[L, B, 1, N, H]`, the query of the first buffered token, at position
  `lengths[b]`. Returns the new cache and the attention output `[L, B, 1, N, H]`.
  """
  outs = []
  for layer in range(cache.num_layers):
    cache = cache.update(layer, k[layer], v[layer], valid_len=valid_len)
    outs.append(kvtpu.attend(q[layer], cache, layer, valid_len=valid_len, impl="xla"))
  return cache.advance(valid_len), jnp.stack(outs)


# Under jit with the cache donated. Prefill chunks and decode steps share one buffer
# shape, as in a serving engine's ragged batch, so each format compiles once: on CPU
# compiling costs more than running.
step = jax.jit(_step, donate_argnums=0)


def schedule(context: int, batch: int) -> dict:
  """The fill plan: ragged prefill lengths, buffer (chunk) size and decode steps.

  Sequence 0 ends exactly at `context` (= max_len); the others end earlier.
  """
  if context < 4:
    raise ValueError(f"context must be >= 4, got context={context}")
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got batch={batch}")
  steps = min(MAX_DECODE_STEPS, max(1, context // 8))
  prefill = context - steps
  lens = [max(1, prefill - b * (prefill // (batch + 1))) for b in range(batch)]
  return {"decode_steps": steps, "prefill_lengths": lens,
          "chunk": math.ceil(prefill / PREFILL_CHUNKS), "chunks": PREFILL_CHUNKS}


def _run_format(fmt: KVFormat, data: dict, plan: dict) -> tuple[np.ndarray, dict]:
  """Fills a cache of `fmt` per `plan`; returns decode outputs `[steps, L, B, 1, N, H]`."""
  k_all, v_all, q_all = data["k"], data["v"], data["q"]  # [L, B, S, K, H]; q [L, B, steps, N, H]
  num_layers, batch, context, kv_heads, head_dim = k_all.shape
  cache = KVCache.init(fmt, num_layers=num_layers, batch=batch, kv_heads=kv_heads,
                       max_len=context, head_dim=head_dim)
  lens = np.asarray(plan["prefill_lengths"])
  c = plan["chunk"]
  q_none = jnp.zeros(q_all[:, :, :1].shape, q_all.dtype)  # Prefill outputs are not used.
  for i in range(plan["chunks"]):
    valid = np.clip(lens - i * c, 0, c).astype(np.int32)
    # Every sequence still filling sits at i * c; finished ones write nothing.
    sl = slice(i * c, (i + 1) * c)
    k, v = _pad_to(k_all[:, :, sl], c), _pad_to(v_all[:, :, sl], c)
    cache, _ = step(cache, q_none, jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid))
  outs = []
  one = jnp.ones((batch,), jnp.int32)
  for i in range(plan["decode_steps"]):
    pos = lens + i  # [B]: each sequence decodes at its own length.
    k, v = (_pad_to(_at_positions(a, pos), c) for a in (k_all, v_all))
    cache, out = step(cache, jnp.asarray(q_all[:, :, i:i + 1]), jnp.asarray(k), jnp.asarray(v),
                      one)
    outs.append(np.asarray(out))
  got = np.asarray(cache.lengths)
  if not np.array_equal(got, lens + plan["decode_steps"]) or bool(np.asarray(cache.overflow).any()):
    raise AssertionError(f"{fmt.name}: lengths {got.tolist()} after the fill, expected "
                         f"{(lens + plan['decode_steps']).tolist()} and no overflow")
  counts = cache.counts()
  stats = {name: int(counts[name].sum()) for name in kvtpu.memory.COUNTERS}
  return np.stack(outs), stats


def _pad_to(x: np.ndarray, t: int) -> np.ndarray:
  """Pads axis 2 (tokens) of `[L, B, T', ...]` with zeros to length t."""
  pad = [(0, 0)] * x.ndim
  pad[2] = (0, t - x.shape[2])
  return np.pad(x, pad)


def _at_positions(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
  """`a: [L, B, S, X, H]`, `pos: [B]` -> `[L, B, 1, X, H]` at each sequence's position."""
  idx = pos.reshape(1, -1, 1, 1, 1)
  return np.take_along_axis(a, np.broadcast_to(idx, (a.shape[0], a.shape[1], 1, *a.shape[3:])),
                            axis=2)


def attention_error_rows(formats, head_dims, *, context: int, batch: int, seed: int = 0,
                         kv_heads: int = KV_HEADS, q_heads: int = Q_HEADS,
                         num_layers: int = NUM_LAYERS, log=None) -> list[dict]:
  """Attention-output error of each format against a bf16 cache, same q/k/v.

  For each head_dim, synthetic K/V/Q are drawn once (`seed`); each format's cache is
  filled with them (ragged prefill chunks, then decode steps, see `schedule`) and
  the decode steps' `attend(impl="xla")` outputs are compared with those of a bf16
  cache filled the same way (bf16 itself is run again, so its row checks that the
  comparison is exact).

  Args:
    formats: format names or `KVFormat`s; dynamic or bf16 only.
    head_dims: head dimensions to measure.
    context: max_len of the cache; sequence 0 fills it exactly.
    batch: B, sequences (ragged lengths).
    seed: numpy seed of the synthetic data.
    kv_heads, q_heads, num_layers: K, N (a multiple of K) and L.
    log: optional callable taking one progress string.

  Returns:
    One dict per (format, head_dim), in input order: kv_format, head_dim,
    attention_rel_error (relative Frobenius norm over all decode outputs),
    attention_max_abs_error, output_rms (of the bf16 output), the cache counters
    summed over layers (written, k_saturated, ...), and the fill plan.

  Raises:
    ValueError: for an unknown or static format, or bad dimensions.
  """
  fmts = check_formats(formats)
  _check_head_dims(fmts, head_dims)
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
  plan = schedule(context, batch)
  steps = plan["decode_steps"]
  data = {}
  for h in head_dims:
    data[h] = synthetic_qkv(np.random.default_rng([seed, h]), num_layers=num_layers,
                            batch=batch, context=context, kv_heads=kv_heads, q_heads=q_heads,
                            head_dim=h, steps=steps)
  bf16 = KVFormat.parse("bf16")
  refs = {h: _run_format(bf16, data[h], plan)[0].astype(np.float64) for h in head_dims}
  rows = []
  for h in head_dims:
    for fmt in fmts:
      out, stats = _run_format(fmt, data[h], plan)
      err = out.astype(np.float64) - refs[h]
      rows.append({
          "kv_format": fmt.name,
          "head_dim": h,
          "attention_rel_error": float(np.linalg.norm(err) / np.linalg.norm(refs[h])),
          "attention_max_abs_error": float(np.abs(err).max()),
          "output_rms": float(np.sqrt(np.mean(refs[h]**2))),
          **stats,
          "context": context, "batch": batch, "kv_heads": kv_heads, "q_heads": q_heads,
          "num_layers": num_layers, **plan,
      })
      if log:
        log(f"{fmt.name} head_dim={h}: attention rel error {rows[-1]['attention_rel_error']:.3e}")
  return rows


def merge_rows(byte_rows: list[dict], error_rows: list[dict]) -> list[dict]:
  """Joins the two tables on (kv_format, head_dim) and adds the disclosure fields."""
  errors = {(r["kv_format"], r["head_dim"]): r for r in error_rows}
  out = []
  for b in byte_rows:
    fmt = KVFormat.parse(b["kv_format"])
    e = errors.get((b["kv_format"], b["head_dim"]), {})
    out.append({
        **b, **e,
        "weight_precision": WEIGHT_PRECISION,
        "calibration": DYNAMIC_CALIBRATION if fmt.quantized else BF16_CALIBRATION,
    })
  return out


def _by_format(rows: list[dict]) -> tuple[list[str], list[int], dict]:
  names = list(dict.fromkeys(r["kv_format"] for r in rows))
  dims = sorted({r["head_dim"] for r in rows})
  return names, dims, {(r["kv_format"], r["head_dim"]): r for r in rows}


def bytes_markdown(rows: list[dict]) -> str:
  """Bytes per token per layer and ratio to bf16 per head_dim, with the targets."""
  names, dims, at = _by_format(rows)
  kv_heads = rows[0]["kv_heads"] if rows else KV_HEADS
  header = ["format"] + [f"bytes @ H={h} (x bf16)" for h in dims] + [
      f"target @ H={TARGET_HEAD_DIM}", "result"]
  body = []
  for name in names:
    cells = [f"`{name}`"]
    for h in dims:
      r = at.get((name, h))
      cells.append("-" if r is None else
                   f"{r['bytes_per_token_per_layer']:g} ({r['ratio_vs_bf16']:.3f}x)")
    r = at.get((name, TARGET_HEAD_DIM))
    if r is None or r.get("target") is None:
      cells += ["-", "no target"]
    else:
      cells += [f"<= {r['target']:.2f}x", "PASS" if r["meets_target"] else "FAIL"]
    body.append(cells)
  title = (f"Cache bytes per token per layer (K and V, scales included), kv_heads={kv_heads}; "
           "ratio to bf16 in parentheses.")
  return title + "\n\n" + reports.markdown_table(header, body)


def error_markdown(rows: list[dict]) -> str:
  """Attention-output error vs the bf16 cache per format and head_dim (relative error in %)."""
  rows = [r for r in rows if "attention_rel_error" in r]
  names, dims, at = _by_format(rows)
  header = ["format"] + [f"{what} @ H={h}" for h in dims
                         for what in ("rel err (%)", "max abs err")]
  body = []
  for name in names:
    cells = [f"`{name}`"]
    for h in dims:
      r = at.get((name, h))
      cells += ["-", "-"] if r is None else [reports.percent(r["attention_rel_error"], "{:.3g}"),
                                             f"{r['attention_max_abs_error']:.2e}"]
    body.append(cells)
  if rows:
    r = rows[0]
    title = (f"Attention output error vs the bf16 cache (same q/k/v; relative Frobenius norm "
             f"and max abs), over {r['decode_steps']} decode steps x {r['num_layers']} layers "
             f"at context {r['context']}, batch {r['batch']} with prefill lengths "
             f"{r['prefill_lengths']}, {r['q_heads']} query / {r['kv_heads']} kv heads; "
             "synthetic K/V: keys with 2 outlier channels per head (~50x), keys and values with 3 "
             "outlier tokens (~20x); queries scaled so ordinary logits have unit variance.")
  else:
    title = "Attention output error vs the bf16 cache: no rows."
  return title + "\n\n" + reports.markdown_table(header, body)


def render_markdown(rows: list[dict]) -> str:
  """Both report tables from merged rows (`merge_rows`)."""
  return bytes_markdown(rows) + "\n\n" + error_markdown(rows) + "\n"

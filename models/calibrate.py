"""KV statistics of a model over calibration batches, in one jitted step per batch.

`collect_statistics(model, batches)` runs each `[B, T]` batch of token ids through the
model on a bf16 cache, and the model's `observe` hook hands every layer's keys
before RoPE (`k_pre`), after RoPE (`k`, what the cache stores) and values (`v`) to
`kvtpu.calibration.stats.observe` inside the same compiled step: activations are
reduced per layer as they are produced, so memory is one batch's activations plus
the fixed-size statistics, whatever the number of tokens. `k_rot` and `v_rot` are
the keys and values in the coordinates a rotated spec stores (`kvtpu.rotation`),
which is where its static scales and clip ratios are fitted.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvtpu import rotation
from kvtpu.calibration import stats as kv_stats

__all__ = ["KINDS", "ROTATED_KINDS", "collect_statistics"]

KINDS = ("k_pre", "k", "v")
ROTATED_KINDS = ("k_rot", "v_rot")  # Observed on request: `k` and `v` times `rotation.rotate`.


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"), donate_argnames=("stats",))
def _step(graphdef, state, stats: dict, tokens: jax.Array, *, impl: str) -> dict:
  """One batch through the model, every layer's observed tensors added to `stats`.

  The forward only captures each layer's tensors; one `fori_loop` over the stacked
  layers then adds them, so the statistics code is compiled once, not once per layer
  (which made this step's compile grow with the depth of the model).
  """
  model = nnx.merge(graphdef, state)
  seen: dict = {kind: [] for kind in stats}

  def observe(layer: int, kind: str, x: jax.Array) -> None:
    if kind in seen:
      seen[kind].append((layer, x))
    if f"{kind}_rot" in seen:
      seen[f"{kind}_rot"].append((layer, rotation.rotate(x, jnp.float32)))

  b, t = tokens.shape
  model(tokens, model.init_cache("bf16", batch=b, max_len=t), impl=impl, observe=observe,
        logits_at=jnp.zeros((b,), jnp.int32))  # The logits are not needed.
  out = {}
  for kind, observed in seen.items():
    layers = [layer for layer, _ in observed]
    if layers != list(range(model.cfg.num_layers)):
      raise AssertionError(f"the forward observed {kind!r} at layers {layers}, not once per layer")
    stacked = jnp.stack([x for _, x in observed])  # [L, B, T, K, H]
    out[kind] = jax.lax.fori_loop(
        0, len(layers), lambda layer, st, xs=stacked: kv_stats.observe(st, layer, xs[layer]),
        stats[kind])
  return out


def collect_statistics(model, batches: Iterable[np.ndarray], *, kinds=KINDS, impl: str = "auto",
                       stats: dict | None = None,
                       progress: Callable[[int, float], None] | None = None,
                       **stats_options) -> dict[str, kv_stats.TensorStats]:
  """Per-layer, per-head, per-channel statistics of K (pre/post RoPE) and V.

  Args:
    model: a `kvtpu.models.llama.Llama`.
    batches: int32 `[B, T]` token windows (e.g. `Workload.windows(...)`); one
      compile serves every batch of the same shape.
    kinds: which tensors to observe, from `KINDS + ROTATED_KINDS`.
    impl: attention implementation of the forward.
    stats: statistics to continue from (e.g. over several workloads); default new.
    progress: called after each batch with (tokens so far, seconds so far).
    **stats_options: passed to `kvtpu.calibration.stats.init_stats`.

  Returns:
    `{kind: TensorStats}`.

  Raises:
    ValueError: for an unknown kind or a batch that is not a 2-D integer array.
  """
  unknown = sorted(set(kinds) - set(KINDS + ROTATED_KINDS))
  if unknown:
    raise ValueError(f"unknown kinds {unknown}; choose from {KINDS + ROTATED_KINDS}")
  cfg = model.cfg
  if stats is None:
    stats = {k: kv_stats.init_stats(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                    **stats_options) for k in kinds}
  # The step returns committed arrays; committing the first input too keeps every call on
  # one compiled step (uncommitted inputs would compile a second one).
  stats = jax.device_put(stats, jax.devices()[0])
  graphdef, state = nnx.split(model)
  seen, start = 0, time.perf_counter()
  for tokens in batches:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"each batch must be an integer [B, T] array, got {tokens.dtype}"
                       f"{tokens.shape}")
    stats = _step(graphdef, state, stats, jnp.asarray(tokens, jnp.int32), impl=impl)
    seen += tokens.size
    if progress is not None:
      jax.block_until_ready(stats)
      progress(seen, time.perf_counter() - start)
  return jax.block_until_ready(stats)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"))
def _capture(graphdef, state, tokens: jax.Array, *, impl: str) -> dict:
  """Every layer's q (after RoPE), k (after RoPE) and v for one batch."""
  model = nnx.merge(graphdef, state)
  out: dict = {}

  def observe(layer: int, kind: str, x: jax.Array) -> None:
    if kind in ("q", "k", "v"):
      out[layer, kind] = x

  b, t = tokens.shape
  model(tokens, model.init_cache("bf16", batch=b, max_len=t), impl=impl, observe=observe,
        logits_at=jnp.zeros((b,), jnp.int32))
  return {f"{layer}/{kind}": x for (layer, kind), x in out.items()}


def attention_inputs(model, tokens: np.ndarray, *, impl: str = "auto") -> list[dict]:
  """Per layer `{"q", "k", "v"}` of one `[B, T]` batch (for `learn_scales`)."""
  graphdef, state = nnx.split(model)
  flat = _capture(graphdef, state, jnp.asarray(tokens, jnp.int32), impl=impl)
  return [{kind: flat[f"{layer}/{kind}"] for kind in ("q", "k", "v")}
          for layer in range(model.cfg.num_layers)]


def outlier_table(stats: dict[str, kv_stats.TensorStats], *, top: int = 4) -> dict:
  """Per kind and layer: the outlier indicators a report shows (JSON-able)."""
  table = {}
  for kind, st in stats.items():
    s = kv_stats.summary(st, top=top)
    table[kind] = {"outlier_ratio": s["outlier_ratio"], "top_channels": s["top_channels"],
                   "head_absmax": s["head_absmax"], "head_p99.99": s["head_p99.99"],
                   "beyond_k_sigma": s["beyond_k_sigma"], "k_sigma": float(s["k_sigma"]),
                   "tokens": s["tokens"]}
  return table


def _stored_coordinates(x: dict, fmt) -> dict:
  """One layer's `{"q", "k", "v"}` in the coordinates the cache stores: keys (and the
  queries that meet them) rotated for a rotated key spec, values for a rotated value
  spec. Attention outputs then differ from the model's by the value rotation, which
  keeps every error norm the calibration objectives measure."""
  x = dict(x)
  if fmt.k.rotation:
    x["q"], x["k"] = rotation.rotate(x["q"], jnp.float32), rotation.rotate(x["k"], jnp.float32)
  if fmt.v.rotation:
    x["v"] = rotation.rotate(x["v"], jnp.float32)
  return x


def calibrate(model, workloads, fmt, *, method: str = "absmax", seq_len: int = 512,
              batch: int = 4, num_tokens: int | None = None, method_options=None,
              learn_steps: int = 200, impl: str = "auto",
              progress: Callable[[str, int, float], None] | None = None):
  """Calibrates the quantized specs of `fmt` for `model` on `workloads`.

  Static specs (granularity tensor, head or channel) get scales from the streaming
  statistics of every calibration token (`kvtpu.calibration.compute_scales`). A
  rotated spec is calibrated on the rotated tensors it stores (`k_rot`, `v_rot`).
  Dynamic specs (per-token scales) get clip ratios per layer and kv head
  (`kvtpu.calibration.clipping`) from sample tokens: the first `[batch, seq_len]`
  window batch of each workload.

  Args:
    model: a `kvtpu.models.llama.Llama` (its `cfg.name` and `weight_precision` are disclosed).
    workloads: `kvtpu.eval.workloads.Workload`s, observed in order.
    fmt: a cache format (name or `KVFormat`) with at least one quantized spec.
    method: "absmax", "percentile", "mse" or "learned" (optax on the attention-output
      error per layer, from the absmax scales or unit clip ratios, on the first batch
      of the first workload).
    seq_len, batch: the calibration windows `[batch, seq_len]`.
    num_tokens: tokens per workload (default: all of it, in whole batches).
    method_options: options of the method (e.g. `{"percentile": 99.9}`).
    learn_steps: optimizer steps per layer for "learned".
    impl: attention implementation of the forward passes.
    progress: called as `progress(workload_name, tokens_so_far, seconds)` per batch.

  Returns:
    `(artifact, stats)`: the `CalibrationArtifact` and `{kind: TensorStats}`.
  """
  from kvtpu import KVFormat
  from kvtpu.calibration import artifact as artifact_lib
  from kvtpu.calibration import clipping, methods

  fmt = KVFormat.parse(fmt)
  specs = {w: s for w, s in (("k", fmt.k), ("v", fmt.v)) if s.calibrated}
  if not specs:
    raise ValueError(f"format {fmt.name} has nothing to calibrate: K and V are unquantized, "
                     "scaled per token by their RMS onto a fixed (non-uniform) codebook, or "
                     "scaled per channel over groups of positions (c<N>, each group's full range)")
  if method not in (*methods.METHODS, "learned"):
    raise ValueError(f"unknown method={method!r}; valid: {(*methods.METHODS, 'learned')}")
  if not workloads:
    raise ValueError("workloads is empty: calibrate on at least one workload")
  options = dict(method_options or {})
  stats = None
  disclosed = []
  samples: list[list[dict]] = []  # Per workload, per layer {"q", "k", "v"} of its first batch.
  dynamic = any(s.dynamic for s in specs.values())
  kind_of = {w: f"{w}_rot" if s.rotation else w for w, s in specs.items()}
  kinds = tuple(dict.fromkeys((*KINDS, *kind_of.values())))
  for w in workloads:
    n = w.num_batches(seq_len, batch=batch, num_tokens=num_tokens)
    report = None if progress is None else functools.partial(progress, w.name)
    stats = collect_statistics(model, w.windows(seq_len, batch=batch, num_tokens=num_tokens),
                               kinds=kinds, impl=impl, stats=stats, progress=report)
    if dynamic or method == "learned":
      first = next(iter(w.windows(seq_len, batch=batch, num_tokens=num_tokens)))
      samples.append([_stored_coordinates(x, fmt)
                      for x in attention_inputs(model, first, impl=impl)])
    disclosed.append({**w.disclosure(), "tokens_used": n * batch * seq_len,
                      "seq_len": seq_len, "batch": batch})
  scales, clipped = {}, {}
  for which, spec in specs.items():
    st = stats[kind_of[which]]
    if spec.dynamic:
      tokens = [np.concatenate([np.asarray(s[layer][which]) for s in samples])
                for layer in range(model.cfg.num_layers)]
      if method == "learned":
        learned = [clipping.learn_clip(x["q"], x["k"], x["v"], spec,
                                       np.ones(model.cfg.num_kv_heads, np.float32),
                                       which=which, steps=learn_steps, **options)
                   for x in samples[0]]
        clip = np.stack([r.clip for r in learned])
      else:
        clip = clipping.compute_clip(tokens, spec, method, **options)
      scales[which] = {"clip": np.asarray(clip, np.float32)}
      clipped[which] = clipping.clip_fraction(tokens, spec, clip)
      continue
    if method == "learned":
      init_scale, init_zero = methods.compute_scales(st, spec, "absmax")
      learned = [methods.learn_scales(x["q"], x["k"], x["v"], spec, init_scale[layer],
                                      init_zero=None if init_zero is None else init_zero[layer],
                                      which=which, steps=learn_steps, **options)
                 for layer, x in enumerate(samples[0])]
      scale = jnp.stack([r.scale for r in learned])
      zero = None if spec.symmetric else jnp.stack([r.zero for r in learned])
    else:
      scale, zero = methods.compute_scales(st, spec, method, **options)
    scales[which] = {"scale": np.asarray(scale, np.float32)}
    if zero is not None:
      scales[which]["zero"] = np.asarray(zero, np.float32)
    clipped[which] = np.nan_to_num(methods.clip_fraction(st, spec, scale, zero))
  cfg = model.cfg
  art = artifact_lib.CalibrationArtifact(
      fmt=fmt, scales=scales, clip_fraction=clipped,
      model={"name": cfg.name, "weight_precision": model.weight_precision,
             "num_layers": cfg.num_layers, "kv_heads": cfg.num_kv_heads,
             "head_dim": cfg.head_dim},
      method=method, method_options={**options, **(
          {"learn_steps": learn_steps} if method == "learned" else {})},
      workloads=tuple(disclosed), summary=outlier_table(stats))
  return art, stats


def plan_layers(model, workloads, low, high, *, target_bits: float, context: int = 8192,
                seq_len: int = 512, batch: int = 2, chunk: int = 128, impl: str = "auto"):
  """A per-layer precision plan for `model` within `target_bits` effective bits per value
  at `context` tokens (`kvtpu.calibration.layer_plan`).

  Each layer's cost is measured on the queries, keys and values it computes on the
  first `[batch, seq_len]` window batch of every workload (the batches side by side),
  written and attended `chunk` tokens at a time.

  Args:
    model: a `kvtpu.models.llama.Llama`.
    workloads: `kvtpu.eval.workloads.Workload`s.
    low, high: the cheaper and the dearer format (dynamic or unquantized).
    target_bits, context: the budget.
    seq_len, batch, chunk: the calibration windows and the chunk size.
    impl: attention implementation of the forward passes.

  Returns:
    A `LayerPlanArtifact`.
  """
  from kvtpu.calibration import layer_plan  # noqa: PLC0415

  if not workloads:
    raise ValueError("workloads is empty: measure layer costs on at least one workload")
  per_layer: list[dict[str, list[np.ndarray]]] = [
      {"q": [], "k": [], "v": []} for _ in range(model.cfg.num_layers)]
  disclosed = []
  for w in workloads:
    first = next(iter(w.windows(seq_len, batch=batch, num_tokens=seq_len * batch)))
    for layer, x in enumerate(attention_inputs(model, first, impl=impl)):
      for kind in ("q", "k", "v"):
        per_layer[layer][kind].append(np.asarray(x[kind]))
    disclosed.append({**w.disclosure(), "tokens_used": batch * seq_len, "seq_len": seq_len,
                      "batch": batch})
  samples = [{kind: np.concatenate(xs, axis=0) for kind, xs in layer.items()}
             for layer in per_layer]
  costs = layer_plan.layer_costs(samples, low, high, chunk=chunk)
  cfg = model.cfg
  plan = layer_plan.assign(costs, low, high, target_bits=target_bits, context=context,
                           kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
  return layer_plan.LayerPlanArtifact(
      plan=plan, low=low, high=high, target_bits=target_bits, context=context, costs=costs,
      model={"name": cfg.name, "weight_precision": model.weight_precision,
             "num_layers": cfg.num_layers, "kv_heads": cfg.num_kv_heads,
             "head_dim": cfg.head_dim},
      workloads=disclosed,
      method={"name": "attention_output_error", "chunk": chunk, "impl": impl,
              "reference": "f32 cache"})

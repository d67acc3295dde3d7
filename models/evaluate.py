"""Evaluation of cache precisions on a model: the glue between `kvtpu.eval` and `Llama`.

  forward_fn(model)        the model as the pure function `kvtpu.eval.protocol.score` runs
  CacheConfig(fmt, art)    a cache under test: a format, dynamic or calibrated
  score_workload(...)      result rows (schema of `kvtpu.eval.report`) for one
                           workload, context length and batch size
  passkey_rows(...)        greedy passkey retrieval per length and depth

Every row states the model and its weight precision as loaded, and apart from them
the KV precision (K and V dtype, granularity, scheme), the calibration ("dynamic" or
the artifact's method and workloads with token counts and hashes), the evaluation
workload with its hashes, and the protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx
from kvtpu.models.generation import generate

import kvtpu
from kvtpu import memory
from kvtpu.calibration.layer_plan import LayerPlanArtifact
from kvtpu.eval import protocol as protocol_lib
from kvtpu.eval import workloads as workloads_lib
from kvtpu.headroom.solver import EFFECTIVE_BITS_CONTEXT

__all__ = ["LlamaForward", "forward_fn", "CacheConfig", "row_header", "score_workload",
           "passkey_rows"]


@dataclasses.dataclass(frozen=True)
class LlamaForward:
  """`forward(params, tokens, cache, valid_len, observe)` of one model graph and attend impl.

  Hashable by value, so `kvtpu.eval.protocol.score` compiles its steps once per model.
  """

  graphdef: Any
  impl: str = "auto"

  def __call__(self, params, tokens, cache, valid_len, observe):
    model = nnx.merge(self.graphdef, params)
    return model(tokens, cache, valid_len=valid_len, impl=self.impl, observe=observe)


def forward_fn(model, impl: str = "auto") -> tuple[LlamaForward, Any]:
  """`(forward, params)` of a `kvtpu.models.llama.Llama` for `kvtpu.eval.protocol.score`."""
  graphdef, params = nnx.split(model)
  return LlamaForward(graphdef, impl), params


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """A cache under test: a format with dynamic scales, or calibrated by an artifact.

  Attributes:
    fmt: the cache format (name or `KVFormat`), or a `kvtpu.LayerPlan` (or plan name)
      of formats per layer.
    calibration: a `CalibrationArtifact` for `fmt` (static scales or clip ratios), or
      the `LayerPlanArtifact` that chose the plan `fmt`; None: dynamic scales as
      computed on write (static formats need one).
  """

  fmt: kvtpu.KVFormat | kvtpu.LayerPlan | str
  calibration: Any = None

  def __post_init__(self):
    plan = kvtpu.LayerPlan.parse(self.fmt)
    object.__setattr__(self, "fmt", kvtpu.LayerPlan.config(plan))
    if isinstance(self.calibration, LayerPlanArtifact):
      if self.calibration.plan != plan:
        raise ValueError(f"layer plan artifact is for {self.calibration.plan.name}, not "
                         f"{self.fmt.name}")
      return
    if self.calibration is None and self.fmt.static:
      raise ValueError(f"format {self.fmt.name} has static scales: give it a calibration "
                       "artifact")
    if self.calibration is not None and self.calibration.fmt != self.fmt:
      raise ValueError(f"calibration artifact is for {self.calibration.fmt.name}, not "
                       f"{self.fmt.name}")

  @property
  def cache_calibration(self):
    """What the cache itself takes: a `CalibrationArtifact`, or None (a plan's artifact
    chose its layers' formats, which need no calibrated parameters)."""
    return None if isinstance(self.calibration, LayerPlanArtifact) else self.calibration

  @property
  def calibration_name(self) -> str:
    if self.calibration is None:
      return "dynamic"
    return "+".join(w["name"] for w in self.calibration.workloads)

  @property
  def label(self) -> str:
    return f"{self.fmt.name} | {self.calibration_name}"


def _bytes_per_token(model, fmt) -> float:
  """Cache bytes one token adds over all layers of `model` (a format or a plan)."""
  cfg = model.cfg
  return memory.plan_bytes_per_token(fmt, num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
                                     head_dim=cfg.head_dim)


def row_header(model, config: CacheConfig, reference: str | None = None) -> dict[str, Any]:
  """The fields every result row carries: model, weights, KV precision, calibration, and,
  given the reference cache's format, its bytes per token."""
  cfg = model.cfg
  fmt = config.fmt
  art = config.calibration
  calibration: Any = "dynamic"
  if isinstance(art, LayerPlanArtifact):
    calibration = {"method": "layer_plan", "method_options": {
        **art.method, "low": art.low.name, "high": art.high.name,
        "target_bits": art.target_bits, "context": art.context},
        "workloads": list(art.workloads), "kvtpu_version": art.kvtpu_version,
        "created": art.created}
  elif art is not None:
    d = art.disclosure()
    calibration = {"method": d["method"], "method_options": d["method_options"],
                   "workloads": d["workloads"], "kvtpu_version": d["kvtpu_version"],
                   "created": d["created"]}
  header = {"model": cfg.name, "weight_precision": model.weight_precision,
            "kv_format": fmt.name, "kv_precision": fmt.to_dict(),
            "kv_bytes_per_token": _bytes_per_token(model, fmt),
            "kv_effective_bits": memory.plan_effective_bits(
                fmt, context=EFFECTIVE_BITS_CONTEXT, num_layers=cfg.num_layers,
                kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim),
            "calibration": calibration, "calibration_name": config.calibration_name}
  if reference is not None:
    header["reference_bytes_per_token"] = _bytes_per_token(model, reference)
  return header


_DEFAULT_PROTOCOL = protocol_lib.Protocol()


def score_workload(model, workload: workloads_lib.Workload, configs: Sequence[CacheConfig], *,
                   context: int, batch: int, max_len: int | None = None,
                   protocol: protocol_lib.Protocol = _DEFAULT_PROTOCOL,
                   progress: Callable[[int, int, float], None] | None = None
                   ) -> list[dict[str, Any]]:
  """Teacher-forced scoring of each config against the reference cache.

  The batch is the workload's first `batch` windows of `context` tokens, cut to the
  ragged lengths of `protocol.ragged_lengths(context, batch)`. `max_len` (default
  `context`) sizes the caches: one value for several contexts lets their chunks
  share one compiled step.

  Returns:
    One "score" row per config (`kvtpu.eval.report` schema).

  Raises:
    ValueError: for a workload shorter than `batch * context` tokens.
  """
  need = batch * context
  if workload.num_tokens < need:
    raise ValueError(f"workload {workload.name} has {workload.num_tokens} tokens; context="
                     f"{context} x batch={batch} needs {need}")
  tokens = next(iter(workload.windows(context, batch=batch)))
  lengths = protocol_lib.ragged_lengths(context, batch)
  forward, params = forward_fn(model, protocol.impl)
  max_len = context if max_len is None else max_len
  caches = {c.label: model.init_cache(c.fmt, batch=batch, max_len=max_len,
                                      calibration=c.cache_calibration) for c in configs}
  if len(caches) != len(configs):
    raise ValueError(f"configs repeat a label: {[c.label for c in configs]}")
  reference = model.init_cache(protocol.reference, batch=batch, max_len=max_len)
  results = protocol_lib.score(forward, params, tokens, lengths, caches, reference, protocol,
                               progress=progress)
  rows = []
  for c in configs:
    rows.append({"kind": "score", **row_header(model, c, protocol.reference),
                 "eval_workload": workload.disclosure(), "context": context, "batch": batch,
                 "lengths": lengths.tolist(), "protocol": protocol.to_dict(),
                 "metrics": results[c.label].metrics})
  return rows


def passkey_rows(model, tokenizer, configs: Sequence[CacheConfig], *, lengths: Sequence[int],
                 depths: Sequence[float], num_samples: int = 4, seed: int = 0,
                 reference: str = "bf16", impl: str = "auto", max_new_tokens: int = 8,
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
  """Greedy passkey retrieval per (length, depth), for each config and the reference.

  A sample is retrieved when its five-digit key appears in the greedy continuation
  (`max_new_tokens` tokens) of the prompt. The samples of one (length, depth) run
  as one batch. A length at the model's context (`cfg.max_position`) gets a prompt
  `max_new_tokens` shorter, so that prompt and answer fit (`prompt_tokens`).

  Returns:
    One "passkey" row per config, length and depth, with `accuracy` and the
    reference cache's `accuracy_ref` on the same prompts.
  """
  rows = []
  for length in lengths:
    # The prompt and the answer fit in the model's context: at the full context the
    # prompt is `max_new_tokens` shorter.
    prompt_len = min(length, model.cfg.max_position - max_new_tokens)
    for depth in depths:
      w = workloads_lib.passkey(tokenizer, length=prompt_len, depth=depth,
                                num_samples=num_samples, seed=seed)
      prompts = [d.tolist() for d in w.documents]

      def accuracy(fmt, calibration=None, prompts=prompts, answers=w.answers):
        gen = generate(model, prompts, max_new_tokens=max_new_tokens, kv_format=fmt,
                       impl=impl, calibration=calibration, stop_ids=tokenizer.stop_ids)
        hits = [key in tokenizer.decode(toks) for key, toks in zip(answers, gen.tokens,
                                                                   strict=True)]
        return float(np.mean(hits))

      ref = accuracy(reference)
      for c in configs:
        acc = accuracy(c.fmt, c.cache_calibration)
        rows.append({"kind": "passkey", **row_header(model, c, reference),
                     "eval_workload": w.disclosure(),
                     "context": length, "batch": num_samples, "depth": float(depth),
                     "prompt_tokens": prompt_len,
                     "protocol": {"decoding": "greedy", "max_new_tokens": max_new_tokens,
                                  "reference": reference, "impl": impl},
                     "metrics": {"accuracy": acc, "accuracy_ref": ref,
                                 "num_samples": num_samples}})
      if progress is not None:
        progress(f"passkey length={length} depth={depth:g}: reference {ref:.2f}, " + ", ".join(
            f"{r['kv_format']}|{r['calibration_name']} {r['metrics']['accuracy']:.2f}"
            for r in rows[-len(configs):]))
  return rows

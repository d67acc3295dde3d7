"""The tpu_check run: the compiled kernels on a real TPU against the references, in one verdict.

Every kernel has been compiled for TPU generations ahead of time, but a wrong result
on hardware (a layout, a masked edge block, an int4 unpack) would only show on a TPU.
This run is the self-check for a TPU VM. It prints one verdict line per check
(`PASS` / `FAIL`, the check, the measured figure and its bound) and writes them to
`verdicts.jsonl` and `report.md`:

1. Kernels: for every format and head dim, decode (T = 1 and T = 8) and chunked
   prefill (T = 33) calls of `kvtpu.attend(impl=<impl>)` on a ragged batch at the
   edge lengths of the kernel's KV block (0, 1, block - 1, block, block + 1 and the
   cache's capacity), with keys carrying outlier channels and unwritten memory
   poisoned with NaN, against the XLA reference (`impl="xla"`) and, unless
   `interpret=False`, the same kernel in Pallas interpret mode. The bound is relative
   to the largest output magnitude.
2. kernel_bench: the timing table with each row's fraction of the chip's HBM
   roofline (`kvtpu.models.runs.kernel_bench`); a row that did not run is a FAIL.
3. Evaluation: a short SmolLM2 evaluation with the kernels and with the XLA
   reference on the same device; perplexities must agree to `eval_rtol`, and the
   report carries the targets table.

Off TPU, `run` with `impl="pallas"` raises `NotOnTpu` before doing anything (the
binary prints it and exits non-zero). `impl="interpret"` runs check 1 anywhere,
which is how the tests exercise the verdict logic on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from kvtpu.models.runs import common
from kvtpu.models.runs.common import check, format_list, int_list, one_of
from kvtpu.pallas_kernels.decode_attention import MAX_DECODE_T, default_block_sizes, layout_error

import kvtpu
from kvtpu import attention, reports

__all__ = ["TpuCheckConfig", "TpuCheckResult", "NotOnTpu", "KERNEL_FORMATS", "kernel_checks",
           "run"]

# Every storage dtype, scale layout and option the kernels read, and the binaries' schemes
# (rotation, bf16 windows, int2, non-uniform codes).
KERNEL_FORMATS = ("f32", "bf16", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "k8v4", "int8-asym",
                  "int4-asym-g16", "int4-g32", "fp8_e4m3-sbf16", common.FOUR_BIT_SCHEME,
                  common.FOUR_BIT_NU_SCHEME, common.TWO_BIT_SCHEME)
PHASES = (1, MAX_DECODE_T, 33)  # Query tokens: decode, the largest decode chunk, prefill.


class NotOnTpu(RuntimeError):
  """The check of compiled kernels was asked for where there is no TPU."""


@dataclasses.dataclass(frozen=True)
class TpuCheckConfig:
  """What the self-check runs (each field is the tpu_check binary's flag of the same name).

  Attributes:
    formats: cache formats of the kernel checks (dynamic scales).
    head_dims: head dims of the kernel checks.
    impl: the implementation checked: "pallas" (compiled, needs a TPU) or "interpret".
    interpret: also compare the compiled kernel with interpret mode (check 1).
    kernel_bench: run check 2.
    evaluate: run check 3 (loads SmolLM2).
    rtol: kernel bound, relative to the largest |output| of the reference.
    eval_rtol: bound on the relative perplexity difference, kernels vs reference.
  """

  formats: tuple[str, ...] = KERNEL_FORMATS
  head_dims: tuple[int, ...] = (64, 128)
  impl: str = "pallas"
  interpret: bool = True
  kernel_bench: bool = True
  evaluate: bool = True
  rtol: float = 1e-4
  eval_rtol: float = 1e-3

  def __post_init__(self):
    object.__setattr__(self, "formats", format_list(
        "formats", self.formats, dynamic_only="the kernel checks write dynamic-scale caches"))
    object.__setattr__(self, "head_dims", int_list("head_dims", self.head_dims))
    one_of("impl", self.impl, ("pallas", "interpret"))
    for name in ("rtol", "eval_rtol"):
      value = getattr(self, name)
      check(isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 < value < 1, name, f"expected a number in (0, 1), got {value!r}")
    for name in ("interpret", "kernel_bench", "evaluate"):
      check(isinstance(getattr(self, name), bool), name,
            f"expected True or False, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class TpuCheckResult:
  """The verdicts (one dict per check) and the paths of the reports."""

  verdicts: list[dict]
  paths: dict[str, Path]

  @property
  def passed(self) -> bool:
    return bool(self.verdicts) and all(v["ok"] for v in self.verdicts)


def _verdict(check_name: str, ok: bool, measured: str, bound: str) -> dict:
  line = f"{'PASS' if ok else 'FAIL'}  {check_name}: {measured} ({bound})"
  print(line, flush=True)
  return {"check": check_name, "ok": bool(ok), "measured": measured, "bound": bound,
          "line": line}


def _refusal_verdict(fmt: str, head_dim: int, impl: str, refusal: str) -> dict:
  """A format the kernels cannot compile here (int2 rows of 64 lanes; sub-byte dtypes on
  older generations): `attend` must refuse it at trace time with exactly `refusal`,
  before Mosaic sees it."""
  cache = kvtpu.KVCache.init(fmt, num_layers=1, batch=1, kv_heads=1, max_len=128,
                             head_dim=head_dim)
  q = jnp.zeros((1, 1, 1, head_dim), jnp.float32)
  name = f"kernel {fmt} H={head_dim} refused"
  try:
    kvtpu.attend(q, cache, 0, impl=impl)
  except ValueError as e:
    return _verdict(name, str(e) == refusal, f"ValueError: {str(e)[:80]}", "the support error")
  return _verdict(name, False, "attend ran", "refused at trace time")


def _edge_lengths(block: int, max_len: int, t: int) -> np.ndarray:
  """Lengths held before a chunk of t tokens: empty, one token, around the block edge,
  and the capacity that leaves room for the chunk."""
  return np.array([0, 1, block - 1, block, block + 1, max_len - t], np.int32)


def _keys_with_outliers(rng: np.random.Generator, shape) -> np.ndarray:
  """Standard normal values with two outlier channels per head at 20x and one token at 100x."""
  x = rng.standard_normal(shape).astype(np.float32)
  x[..., :2] *= 20.0
  x[:, :1] *= 100.0 / 20.0
  return x


def _poisoned(cache: kvtpu.KVCache) -> kvtpu.KVCache:
  """The cache with every floating array NaN: positions the kernels must mask read NaN."""
  def poison(x):
    if x is None or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jnp.full_like(x, jnp.nan)

  return dataclasses.replace(cache, k=jax.tree.map(poison, cache.k),
                             v=jax.tree.map(poison, cache.v))


def kernel_checks(config: TpuCheckConfig, *, seed: int = 0) -> list[dict]:
  """Check 1 of the module docstring: a verdict per (format, head dim, phase, comparison)."""
  verdicts = []
  kv_heads, groups = 2, 4
  for fmt in config.formats:
    f = kvtpu.KVFormat.parse(fmt)
    for head_dim in config.head_dims:
      block = default_block_sizes(f.k.dtype.jnp_dtype, f.v.dtype.jnp_dtype, head_dim).block_s
      max_len = 2 * block + 128  # An edge block shorter than the others.
      layout = kvtpu.memory.cache_layout(f, num_layers=2, batch=1, kv_heads=kv_heads,
                                         max_len=max_len, head_dim=head_dim)
      transposed = (layout.k.transposed, layout.v.transposed)  # As the caches below store.
      if config.impl == "pallas":  # The generation's table and the layout.
        refusal = attention.kernel_support_error(jax.devices()[0].device_kind, f, head_dim,
                                                 transposed)
      else:
        refusal = layout_error(f.k.storage_dtype, f.v.storage_dtype, head_dim, transposed)
      if refusal is not None:
        verdicts.append(_refusal_verdict(fmt, head_dim, config.impl, refusal))
        continue
      for t in PHASES:
        rng = np.random.default_rng([seed, head_dim, t, len(fmt)])
        lengths = _edge_lengths(block, max_len, t)
        b = len(lengths)
        cache = _poisoned(kvtpu.KVCache.init(fmt, num_layers=2, batch=b, kv_heads=kv_heads,
                                             max_len=max_len, head_dim=head_dim))
        prefix = _keys_with_outliers(rng, (b, int(lengths.max()), kv_heads, head_dim))
        cache = cache.update(1, prefix, prefix[:, ::-1] * 0.5, valid_len=lengths).advance(lengths)
        chunk = np.minimum(rng.integers(0, t + 1, b), t).astype(np.int32)
        chunk[-1] = t  # The sequence at capacity fills it exactly.
        new = _keys_with_outliers(rng, (b, t, kv_heads, head_dim))
        cache = cache.update(1, new, new * 0.5, valid_len=chunk)
        q = jnp.asarray(rng.standard_normal((b, t, kv_heads * groups, head_dim)), jnp.float32)
        got = np.asarray(kvtpu.attend(q, cache, 1, valid_len=chunk, impl=config.impl))
        name = f"kernel {fmt} H={head_dim} T={t} lengths={lengths.tolist()}"
        against = [("xla", kvtpu.attend(q, cache, 1, valid_len=chunk, impl="xla"))]
        if config.interpret and config.impl != "interpret":
          against.append(("interpret", kvtpu.attend(q, cache, 1, valid_len=chunk,
                                                    impl="interpret")))
        for ref_name, ref in against:
          ref = np.asarray(ref, np.float64)
          scale = float(np.nanmax(np.abs(ref))) if np.isfinite(ref).any() else 1.0
          err = np.abs(got - ref) / max(scale, 1e-30)
          worst = float(np.max(np.where(np.isnan(err), np.inf, err)))
          verdicts.append(_verdict(f"{name} vs {ref_name}", worst <= config.rtol,
                                   f"max |err| / max |ref| = {worst:.2e}",
                                   f"bound {config.rtol:g}"))
  return verdicts


def _bench_checks(workdir: Path) -> list[dict]:
  from kvtpu.models.runs import kernel_bench  # Deferred: only this check needs it.

  result = kernel_bench.run(kernel_bench.KernelBenchConfig(
      formats=("bf16", "int8", "int4", "k8v4"), contexts=(4096, 32768), batches=(1, 8)),
      workdir / "kernel_bench", overwrite=True)
  print(result.tables, flush=True)
  verdicts = []
  for row in result.rows:
    name = f"kernel_bench {row['kv_format']} S={row['context']} B={row['batch']} {row['phase']}"
    if row["oom"]:
      verdicts.append(_verdict(name, False, "out of memory", "ran"))
      continue
    fraction = row["roofline_fraction"]
    ok = np.isfinite(row["seconds"]) and row["seconds"] > 0 and fraction is not None
    measured = (f"{reports.percent(fraction)} % of the HBM roofline, "
                f"{row['bytes_over_min']:.2f}x the minimum bytes" if fraction is not None
                else "no roofline figure (chip not in kvtpu.accelerators)")
    verdicts.append(_verdict(name, ok, measured, "ran, a finite time and a roofline figure"))
  return verdicts


def _evaluation_checks(config: TpuCheckConfig, workdir: Path) -> list[dict]:
  from kvtpu.models.runs import evaluate  # Deferred: loads the model.

  common_fields = dict(preset="none", kv_formats=("int8", "int4"), eval_workloads=("prose",),
                       contexts=(2048,), batches=(2,))
  results = {impl: evaluate.run(evaluate.EvaluateConfig(impl=impl, **common_fields),
                                workdir / f"evaluate_{impl}", overwrite=True)
             for impl in ("pallas", "xla")}
  print(evaluate.targets_markdown(results["pallas"].rows), flush=True)
  by_key = {impl: {(r["kv_format"], r["eval_workload"]["name"]): r for r in res.rows
                   if r["kind"] == "score"} for impl, res in results.items()}
  verdicts = []
  for key, row in sorted(by_key["pallas"].items()):
    ref = by_key["xla"].get(key)
    if ref is None:
      verdicts.append(_verdict(f"evaluation {key[0]} on {key[1]}", False,
                               "no XLA row to compare", "both implementations scored"))
      continue
    a, b = row["metrics"]["ppl"], ref["metrics"]["ppl"]
    diff = abs(a - b) / b
    verdicts.append(_verdict(f"evaluation {key[0]} on {key[1]} (pallas vs xla)",
                             diff <= config.eval_rtol,
                             f"perplexity {a:.4f} vs {b:.4f}, rel. diff {diff:.2e}",
                             f"bound {config.eval_rtol:g}"))
  return verdicts


def run(config: TpuCheckConfig, workdir: str | os.PathLike, *,
        overwrite: bool = False) -> TpuCheckResult:
  """Runs the checks of `config` (see the module docstring); never raises on a FAIL.

  Raises:
    NotOnTpu: `impl="pallas"` where JAX's default backend is not a TPU (before any work).
    ConfigError: the workdir rule (`kvtpu.models.runs.common.check_workdir`).
  """
  if config.impl == "pallas" and jax.default_backend() != "tpu":
    raise NotOnTpu(f"no TPU here (JAX's default backend is {jax.default_backend()}): the "
                   "compiled kernels can only be checked on a TPU VM; nothing was run")
  workdir = common.check_workdir(workdir, config, overwrite=overwrite)
  workdir = common.start(workdir, config)
  paths = {"verdicts": workdir / "verdicts.jsonl", "report": workdir / "report.md"}
  device = jax.devices()[0].device_kind
  logging.info("tpu_check on %s (%d devices), impl=%s", device, jax.device_count(), config.impl)
  verdicts = kernel_checks(config)
  if config.kernel_bench:
    verdicts += _bench_checks(workdir)
  if config.evaluate:
    verdicts += _evaluation_checks(config, workdir)
  reports.write_jsonl(verdicts, paths["verdicts"])
  failed = [v for v in verdicts if not v["ok"]]
  summary = (f"{len(verdicts) - len(failed)} of {len(verdicts)} checks passed on {device} "
             f"(impl={config.impl})")
  reports.write_text(paths["report"], (
      f"# TPU self-check\n\n{summary}.\n\nConfig: `{json.dumps(dataclasses.asdict(config))}`\n\n"
      "```text\n" + "\n".join(v["line"] for v in verdicts) + "\n```\n"))
  print(f"{'PASS' if not failed else 'FAIL'}  tpu_check: {summary}; report: {paths['report']}",
        flush=True)
  return TpuCheckResult(verdicts, paths)

"""What every run shares: config errors and checks, the workdir rule and the run's start
(config.json), resuming from saved rows, the chat workload's answers, artifact storage and
progress with an ETA.

The workdir rule: a run writes into an empty (or new) workdir. An existing non-empty one is
refused before any work (`check_workdir`) unless the caller says what to do with it:
`overwrite` (every binary's --overwrite) replaces the outputs of the same names, `resume`
(--resume of evaluate and headroom) continues the earlier run after checking that its
config.json records the same configuration. Outputs are written to a temporary name and
renamed (`kvtpu.reports`), and result rows are appended as they finish, so a run never
half-writes a file and an interrupted one keeps its finished rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging

import kvtpu
from kvtpu import reports

__all__ = ["FOUR_BIT_SCHEME", "FOUR_BIT_NU_SCHEME", "TWO_BIT_SCHEME", "ConfigError", "Progress", "calibration_progress", "chat_responder", "check",
           "check_head_dim", "check_workdir", "done_items", "environment", "finite_number",
           "format_list", "impl_choice", "int_list", "model_name", "one_of", "positive_int",
           "sampling", "save_artifact", "start", "str_list", "workload_list", "write_config"]


# The 4-bit cache the binaries' defaults compare: int4 with bf16 per-token scales, rotated
# per head, the first 4 and the last 252 tokens of each sequence kept in bf16. 4.75
# effective bits per value at head_dim 64 (SmolLM2) and 8K context, 4.625 at 128
# (docs/schemes.md has the measurements behind the choice).
FOUR_BIT_SCHEME = "int4-sbf16-rot+sink4+recent252"

# The same with a 16-level Lloyd-Max code (`nu`) instead of the uniform grid: each token
# scaled by its RMS, so it needs no calibration; same bytes.
FOUR_BIT_NU_SCHEME = "int4-nu-sbf16-rot+sink4+recent252"

# The 2-bit cache the binaries' defaults compare: int2 as a four-level Lloyd-Max code
# (`nu`: each token scaled by its RMS after the rotation, no calibration), with the
# 4-bit scheme's other options; 2.75 effective bits at head_dim 64 and 8K context, 2.625
# at 128.
TWO_BIT_SCHEME = "int2-nu-sbf16-rot+sink4+recent252"


class ConfigError(ValueError):
  """An invalid config field. `field` is the config field, which is also the name of the
  binary's flag; the message starts with it."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"{field}: {message}")


def check(ok: bool, field: str, message: str) -> None:
  """Raises `ConfigError(field, message)` unless `ok`."""
  if not ok:
    raise ConfigError(field, message)


def sampling(temperature: Any, top_p: Any, top_k: Any):
  """The `kvtpu.models.Sampling` of a config's temperature, top_p and top_k fields, else a
  ConfigError on the field its error names."""
  from kvtpu.models.generation import Sampling  # noqa: PLC0415

  try:
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
  except ValueError as e:
    field = next((f for f in ("temperature", "top_p", "top_k") if f in str(e)), "temperature")
    raise ConfigError(field, str(e)) from None


def one_of(field: str, value: Any, choices: Iterable[Any]) -> Any:
  """`value` if it is one of `choices`, else a ConfigError listing them."""
  choices = tuple(choices)
  check(value in choices, field, f"expected one of {list(choices)}, got {value!r}")
  return value


def positive_int(field: str, value: Any, low: int = 1) -> int:
  """`value` as an int >= `low` (ints, or strings of them), else a ConfigError."""
  try:
    out = int(value)
    ok = not isinstance(value, bool) and out == float(value)
  except (TypeError, ValueError):
    ok = False
  check(ok, field, f"expected an integer >= {low}, got {value!r}")
  check(out >= low, field, f"expected an integer >= {low}, got {out}")
  return out


def finite_number(field: str, value: Any, *, low: float | None = None,
                  high: float | None = None, low_open: bool = False,
                  high_open: bool = False) -> float:
  """`value` as a finite float within the bounds (open or closed ends), else a ConfigError
  saying the interval."""
  if low is not None and high is not None:
    interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  elif low is not None:
    interval = f"{'>' if low_open else '>='} {low:g}"
  else:
    interval = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
  ok = reports.is_num(value)
  if ok:
    value = float(value)
    ok = ((low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
  check(ok, field, f"expected a finite number {interval}".rstrip() + f", got {value!r}")
  return value


def int_list(field: str, values: Any, low: int = 1, *, allow_empty: bool = False
             ) -> tuple[int, ...]:
  """A sequence of distinct ints >= `low` (or strings of them) as a tuple, else a
  ConfigError."""
  values = _sequence(field, values)
  check(allow_empty or bool(values), field, "expected at least one value, got none")
  try:
    out = tuple(int(v) for v in values)
    ok = all(not isinstance(v, bool) and int(v) == float(v) for v in values)
  except (TypeError, ValueError, OverflowError):
    ok = False
  check(ok, field, f"expected integers, got {list(values)}")
  check(all(v >= low for v in out), field, f"expected integers >= {low}, got {list(out)}")
  _distinct(field, out)
  return out


def str_list(field: str, values: Any, *, allow_empty: bool = False,
             distinct: bool = False) -> tuple[str, ...]:
  """A sequence of non-empty strings (stripped; `distinct`: no repeats) as a tuple, else a
  ConfigError."""
  values = _sequence(field, values)
  check(all(reports.is_str(v) for v in values), field,
        f"expected non-empty strings, got {list(values)}")
  check(allow_empty or bool(values), field, "expected at least one value, got none")
  out = tuple(v.strip() for v in values)
  if distinct:
    _distinct(field, out)
  return out


def format_list(field: str, values: Any, *, allow_empty: bool = False,
                dynamic_only: str | None = None, plans: bool = False) -> tuple[str, ...]:
  """Distinct KV format names (`kvtpu.KVFormat.parse`), or with `plans` also layer plan
  names (`kvtpu.LayerPlan.parse`, of dynamic formats), as their canonical names, else a
  ConfigError.

  Args:
    dynamic_only: when given, a format with static scales is an error whose message ends
      with this advice.
    plans: whether the field takes layer plans (formats per layer).
  """
  names = str_list(field, values, allow_empty=allow_empty)
  out = []
  for name in names:
    try:
      plan = kvtpu.LayerPlan.parse(name)
    except ValueError as e:
      raise ConfigError(field, str(e)) from None
    fmt = kvtpu.LayerPlan.config(plan)
    check(plans or not plan.overrides, field,
          f"{name} is a layer plan (formats per layer), which this binary does not take; the "
          "evaluate and headroom binaries do")
    check(not (plan.overrides and plan.static), field,
          f"{name}: a layer plan takes dynamic or unquantized formats")
    if dynamic_only is not None and fmt.static:
      raise ConfigError(field, f"{name} has static scales: {dynamic_only}")
    out.append(fmt.name)
  _distinct(field, tuple(out))
  return tuple(out)


def check_head_dim(field: str, formats: Iterable[str], head_dim: int,
                   where: str = "") -> None:
  """A ConfigError on `field` when a format's scale groups do not divide `head_dim`
  (`where` says whose head_dim it is, e.g. "of model smollm2-135m")."""
  for name in formats:
    plan = kvtpu.LayerPlan.parse(name)
    for spec in (s for f in plan.all_formats for s in (f.k, f.v)):
      if spec.per_token and spec.group_size:
        check(head_dim % spec.group_size == 0, field,
              f"{plan.name} groups {spec.group_size} channels, which does not divide "
              f"head_dim={head_dim}{' ' + where if where else ''}")


def check_plan_layers(field: str, formats: Iterable[str], num_layers: int, model: str) -> None:
  """A ConfigError on `field` when a layer plan gives a format to a layer that model
  `model` (of `num_layers` layers) does not have."""
  for name in formats:
    try:
      kvtpu.LayerPlan.parse(name).formats(num_layers)
    except ValueError as e:
      raise ConfigError(field, f"{e} (model {model})") from None


def impl_choice(field: str, value: Any) -> str:
  """An attend implementation (`kvtpu.attention.IMPLS`) that can run here: "pallas" compiles
  the TPU kernels, so off a TPU it is a ConfigError advising "interpret" or "xla"."""
  one_of(field, value, kvtpu.attention.IMPLS)
  backend = jax.default_backend()
  check(value != "pallas" or backend == "tpu", field,
        f"pallas compiles the TPU kernels, but jax runs on {backend}: use interpret (the same "
        "kernels, interpreted) or xla (the reference)")
  return value


def model_name(field: str, value: Any, *, also: Sequence[str] = ()) -> str:
  """A `load_pretrained` name (`KNOWN_MODELS`, or one of `also`) or an existing file or
  folder, else a ConfigError listing the names. The file's contents are checked when it is
  loaded."""
  from kvtpu.models.pretrained import KNOWN_MODELS  # noqa: PLC0415

  check(reports.is_str(value), field, f"expected a model name or path, got {value!r}")
  names = [*also, *sorted(KNOWN_MODELS)]
  check(value.strip().lower() in names or Path(value).exists(), field,
        f"{value!r} is no known model name ({', '.join(names)}) and no such file or folder")
  return value


class _SpecChecked(BaseException):
  """Raised by `_SpecOnlyTokenizer` at its first use: the spec parsed (a BaseException, so
  that no builder's `except Exception` takes it for a failure)."""


class _SpecOnlyTokenizer:
  """A tokenizer that stops a workload builder when it first needs tokens."""

  def __getattr__(self, name):
    raise _SpecChecked


def workload_list(field: str, values: Any, *, allow_empty: bool = False,
                  seed: int = 0) -> tuple[str, ...]:
  """Distinct workload specs (`kvtpu.eval.workloads.load`), each checked up to the point
  where its builder needs the tokenizer: the name, its options, and that a file exists and
  reads as text. Else a ConfigError naming the spec."""
  from kvtpu.eval import workloads as workloads_lib  # noqa: PLC0415

  specs = str_list(field, values, allow_empty=allow_empty, distinct=True)
  for spec in specs:
    try:
      workloads_lib.load(spec, _SpecOnlyTokenizer(), seed=seed, respond=lambda prompts: [])
    except _SpecChecked:
      pass
    except ValueError as e:
      raise ConfigError(field, str(e)) from None
  return specs


def _distinct(field: str, values: tuple) -> None:
  repeated = sorted({str(v) for v in values if values.count(v) > 1})
  check(not repeated, field, f"{', '.join(repeated)} listed more than once in {list(values)}")


def _sequence(field: str, values: Any) -> tuple:
  if isinstance(values, str) or not isinstance(values, Sequence):
    raise ConfigError(field, f"expected a list, got {values!r}")
  return tuple(values)


def environment() -> dict[str, Any]:
  """The software and devices a run ran on (for config.json)."""
  return {"jax_version": jax.__version__, "kvtpu_version": kvtpu.__version__,
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def write_config(workdir: str | os.PathLike, config: Any, **extra: Any) -> Path:
  """Writes `workdir`/config.json: the config's fields, `extra` and `environment()`."""
  return reports.write_json(Path(workdir) / "config.json",
                            {**dataclasses.asdict(config), **extra, **environment()})


def start(workdir: str | os.PathLike, config: Any, **extra: Any) -> Path:
  """Creates `workdir`, logs the devices and writes config.json (`write_config`); returns
  the workdir as a Path. Call `check_workdir` first."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  write_config(workdir, config, **extra)
  return workdir


# What config.json records of the environment that changes results: a resumed run must
# match it too.
_RESULT_ENVIRONMENT = ("backend", "jax_version", "kvtpu_version")


def check_workdir(workdir: str | os.PathLike, config: Any, *, resume: bool = False,
                  overwrite: bool = False, resumable: bool = False,
                  not_compared: Sequence[str] = ()) -> Path:
  """The workdir rule (module docstring), checked before any work; writes nothing.

  Args:
    workdir: the run's output folder.
    config: the run's config (a dataclass, as `write_config` records it).
    resume: continue the run in `workdir`: its config.json must hold the same values of
      every field of `config` (but `not_compared`) and of `_RESULT_ENVIRONMENT`. An empty
      or missing workdir starts afresh.
    overwrite: write into a non-empty `workdir`, replacing the outputs of the same names.
    resumable: whether the run can resume (the advice names --resume only then).
    not_compared: config fields that do not change the results (e.g. how the others
      were filled).

  Returns:
    `workdir` as a Path.

  Raises:
    ConfigError: on "workdir" for a file or a non-empty folder given neither `resume` nor
      `overwrite`; on "resume" for both, or for a folder without config.json; on the
      first field whose saved value differs.
  """
  workdir = Path(workdir)
  check(not (resume and overwrite), "resume",
        "give resume (continue the earlier run) or overwrite (replace its outputs), not both")
  check(not workdir.exists() or workdir.is_dir(), "workdir", f"{workdir} is a file, not a folder")
  entries = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
  if not entries or overwrite:
    return workdir
  flags = "--resume to continue it or --overwrite" if resumable else "--overwrite"
  check(resume, "workdir",
        f"{workdir} already holds an earlier run's outputs ({', '.join(entries[:4])}"
        f"{', ...' if len(entries) > 4 else ''}): give a new workdir, or {flags} to replace "
        "its outputs")
  path = workdir / "config.json"
  check(path.is_file(), "resume", f"{workdir} holds no config.json: not a run's workdir, "
        "nothing to resume")
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError("resume", f"{path} is not JSON ({e}): nothing to resume") from None
  current = json.loads(json.dumps(dataclasses.asdict(config)))
  for name, value in current.items():
    if name not in not_compared and saved.get(name, "(missing)") != value:
      raise ConfigError(name, f"{path} records {name}={saved.get(name, '(missing)')!r} and "
                        f"this run has {value!r}: resume with the same value, or start a new "
                        "workdir")
  env = environment()
  for name in _RESULT_ENVIRONMENT:
    check(saved.get(name) == env[name], "resume",
          f"{path} records {name}={saved.get(name)!r}, this process has {env[name]!r}: rows "
          "computed on both would be mixed; start a new workdir")
  return workdir


def done_items(log: reports.RowLog, key: Callable[[dict], Hashable],
               complete: Callable[[Hashable, list[dict]], bool] = lambda key, rows: True
               ) -> set:
  """The items (`key(row)`) whose rows a resumed `log` holds completely; the rows of other
  items are dropped from it (and its file), so that the run computes them again.

  When the log's last write was cut short (`log.truncated`), the item it was writing is
  incomplete whatever `complete` says.
  """
  by_item: dict[Hashable, list[dict]] = {}
  for row in log.rows:
    by_item.setdefault(key(row), []).append(row)
  cut = key(log.rows[-1]) if log.truncated and log.rows else None
  done = {k for k, rows in by_item.items() if k != cut and complete(k, rows)}
  dropped = log.keep(lambda row: key(row) in done)
  if done or dropped:
    logging.info("resuming %s: %d finished items kept, %d rows of unfinished ones dropped",
                 log.path, len(done), len(dropped))
  return done


def save_artifact(artifact, path: str | os.PathLike) -> Path:
  """Saves a calibration artifact to `path`, replacing what is there only once the new one
  is complete (saved beside it, then renamed)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  if tmp.exists():
    shutil.rmtree(tmp)
  artifact.save(tmp)
  if path.exists():
    shutil.rmtree(path)
  os.replace(tmp, path)
  return path


def chat_responder(model, tokenizer, *, max_new_tokens: int = 64):
  """`respond` for the chat workload: the model's own greedy answers (bf16 cache)."""
  from kvtpu.models.generation import generate  # noqa: PLC0415

  def respond(prompts):
    return generate(model, prompts, max_new_tokens=max_new_tokens, kv_format="bf16",
                    stop_ids=tokenizer.stop_ids).tokens
  return respond


def calibration_progress(what: str, totals: dict[str, int]) -> Callable[[str, int, float], None]:
  """The `progress` callback of `kvtpu.models.calibrate.calibrate`: per workload a
  `Progress` over the tokens it uses (`totals[name]`), logged as "<what> <workload>:
  <tokens>/<total> tokens, <s> s, ETA <s> s; <n> tokens/s"."""
  bars: dict[str, Progress] = {}

  def progress(name: str, tokens: int, seconds: float) -> None:
    if name not in bars:
      bars[name] = Progress(f"{what} {name}", totals.get(name, tokens), "tokens")
    bars[name].update(tokens, f"{tokens / max(seconds, 1e-9):.0f} tokens/s", elapsed=seconds)
  return progress


class Progress:
  """Logs the progress of a long step (absl INFO) with the time it has taken and an ETA:

    "calibration prose: 1,024/2,048 tokens, 41 s, ETA 41 s; 25 tokens/s"

  The ETA assumes the units left take as long each as those done so far. Updates within
  a long item (`update(..., throttle=True)`) log at most once per `every` seconds.
  """

  def __init__(self, what: str, total: float, unit: str, *, every: float = 30.0,
               log: Callable[..., Any] | None = None,
               clock: Callable[[], float] = time.perf_counter):
    self.what, self.total, self.unit, self.every = what, total, unit, every
    self.done = 0.0
    self._log = logging.info if log is None else log
    self._clock = clock
    self._start = self._logged = clock()

  def update(self, done: float, detail: str = "", *, elapsed: float | None = None,
             throttle: bool = False) -> str:
    """Records `done` units in all (`elapsed`: seconds so far, default since creation) and
    returns the line; logs it unless `throttle` and a line was logged less than `every`
    seconds ago."""
    self.done = done
    now = self._clock()
    if elapsed is None:
      elapsed = now - self._start
    eta = f"{elapsed / done * (self.total - done):.0f} s" if done > 0 else "unknown"
    line = (f"{self.what}: {_count(done)}/{_count(self.total)} {self.unit}, {elapsed:.0f} s, "
            f"ETA {eta}" + (f"; {detail}" if detail else ""))
    if not throttle or now - self._logged >= self.every:
      self._log("%s", line)
      self._logged = now
    return line

  def add(self, units: float, detail: str = "") -> str:
    """Records `units` more done; logs and returns the line."""
    return self.update(self.done + units, detail)


def _count(x: float) -> str:
  return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"

"""What every run shares: config errors and checks, the run's start (config.json), the
chat workload's answers, artifact storage and progress with an ETA."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging

import kvtpu
from kvtpu import reports

__all__ = ["ConfigError", "Eta", "chat_responder", "check", "environment", "format_list",
           "int_list", "one_of", "positive_int", "save_artifact", "start", "str_list", "write_config"]


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


def int_list(field: str, values: Any, low: int = 1, *, allow_empty: bool = False) -> tuple[int, ...]:
  """A sequence of ints >= `low` (or strings of them) as a tuple, else a ConfigError."""
  values = _sequence(field, values)
  check(allow_empty or bool(values), field, "expected at least one value, got none")
  try:
    out = tuple(int(v) for v in values)
    ok = all(not isinstance(v, bool) and int(v) == float(v) for v in values)
  except (TypeError, ValueError):
    ok = False
  check(ok, field, f"expected integers, got {list(values)}")
  check(all(v >= low for v in out), field, f"expected integers >= {low}, got {list(out)}")
  return out


def str_list(field: str, values: Any, *, allow_empty: bool = False) -> tuple[str, ...]:
  """A sequence of non-empty strings as a tuple, else a ConfigError."""
  values = _sequence(field, values)
  check(all(reports.is_str(v) for v in values), field,
        f"expected non-empty strings, got {list(values)}")
  check(allow_empty or bool(values), field, "expected at least one value, got none")
  return tuple(v.strip() for v in values)


def format_list(field: str, values: Any, *, allow_empty: bool = False,
                dynamic_only: str | None = None) -> tuple[str, ...]:
  """KV format names (`kvtpu.KVFormat.parse`) as their canonical names, else a ConfigError.

  Args:
    dynamic_only: when given, a format with static scales is an error whose message ends
      with this advice.
  """
  names = str_list(field, values, allow_empty=allow_empty)
  out = []
  for name in names:
    try:
      fmt = kvtpu.KVFormat.parse(name)
    except ValueError as e:
      raise ConfigError(field, str(e)) from None
    if dynamic_only is not None and fmt.static:
      raise ConfigError(field, f"{name} has static scales: {dynamic_only}")
    out.append(fmt.name)
  return tuple(out)


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
  the workdir as a Path."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  write_config(workdir, config, **extra)
  return workdir


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


class Eta:
  """Logs progress over a known number of work units (e.g. token forwards) with an ETA."""

  def __init__(self, total: float):
    self.total, self.done, self.start = total, 0.0, time.perf_counter()

  def add(self, units: float, what: str) -> None:
    self.done += units
    elapsed = time.perf_counter() - self.start
    eta = elapsed / max(self.done, 1e-9) * (self.total - self.done)
    logging.info("[%5.1f%%] %s; elapsed %.0f s, ETA %.0f s", 100 * self.done / self.total, what,
                 elapsed, max(eta, 0.0))

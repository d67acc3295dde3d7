"""Serving traffic: requests with arrival times, from a JSONL trace or a seeded generator.

A `Trace` is a tuple of `Request`s in arrival order with a canonical `name`, a one-line
`description` and a `sha256` that pins exactly what was served (record `disclosure()`
in every serving report):

  * `sha256`: for each request in order, its id (UTF-8, length-prefixed), its arrival
    time (float64), its prompt (length, then the ids as int32), its token budget and
    whether the budget is the exact output length; all integers little-endian (8-byte
    lengths and budgets, 4-byte ids, 1-byte flag). Any changed token, time or budget
    changes it.

Two sources:

  `load_jsonl(path, tokenizer, max_context=...)`: one JSON object per line,

      {"id": "r7", "arrival_s": 0.25, "prompt": "text"     | "prompt_ids": [1, 2, 3]
                                       | "messages": [{"role": "user", "content": "..."}]
                                       | "prompt_len": 512,
       "max_new_tokens": 64 | "output_len": 128}

    `arrival_s` seconds from the trace's start, non-decreasing; `id` optional (default
    "line<N>"), unique. One prompt key: text (tokenized), token ids, chat messages (the
    tokenizer's chat template with the generation prompt) or a length, whose tokens
    are consecutive windows of a `filler` stream. One budget key: `max_new_tokens`
    (generation stops earlier at a stop id) or `output_len` (exactly that many tokens,
    stop ids ignored: a recorded output length). Blank lines are skipped.

  `poisson(rate=..., num_requests=..., prompt_len=..., output_len=..., seed=...)`:
    Poisson arrivals (exponential gaps of mean 1 / rate) with prompt and output lengths
    drawn from named `Distribution`s; prompts are windows of the filler stream; every
    request generates exactly its drawn output length.

  `chat(tokenizer, rate=..., num_requests=..., output_len=..., seed=...)`: the same
    arrivals, each request one of `kvtpu.eval.workloads.CHAT_QUESTIONS` in the model's
    chat template (`workloads.chat_prompts`), its budget drawn from `output_len`; it
    ends at a stop id or at its budget, as a chat server's requests do.

Every request must fit the model's context: prompt + budget <= `max_context` (a bad
line is an error naming the file and line; a generator whose distributions could
exceed it is refused before drawing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtpu.eval.workloads import TokenizerLike, Workload, chat_prompts

__all__ = ["Distribution", "Request", "Trace", "DISTRIBUTIONS", "chat", "load_jsonl", "poisson",
           "trace_sha256"]

# name -> (required parameters, optional parameters), all numbers.
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fixed": (("value",), ()),
    "uniform": (("low", "high"), ()),
    "lognormal": (("median", "sigma", "max"), ("min",)),
}
_DIST = re.compile(r"^\s*(\w+)\s*(?::\s*(.*))?$")


class _Invalid(Exception):
  """A distribution's parameters are invalid (`reason`); re-raised as a ValueError naming
  the spec or the distribution."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _finite(value) -> bool:
  """Whether a Python number is finite as a float (a huge int is not)."""
  try:
    return math.isfinite(value)
  except OverflowError:
    return False


def _exact(value: float) -> str:
  """A number as text that parses back to the same value."""
  return str(int(value)) if float(value).is_integer() else repr(float(value))


def _number(text: str, where: str) -> float:
  try:
    value = float(text)
  except ValueError as e:
    raise ValueError(f"{where}: {text!r} is not a number") from e
  if not math.isfinite(value):
    raise ValueError(f"{where}: {text!r} must be finite")
  return value


def _validate(kind: str, p: dict) -> None:
  """Raises `_Invalid` unless `p` are valid parameters of a `kind` distribution."""
  if kind not in DISTRIBUTIONS:
    raise _Invalid(f"kind must be one of {', '.join(DISTRIBUTIONS)}")
  required, optional = DISTRIBUTIONS[kind]
  if set(p) - set(required + optional) or set(required) - set(p):
    raise _Invalid(f"{kind} takes {', '.join(required)} (and optionally "
                   f"{', '.join(optional) or 'nothing else'})")
  for key, value in p.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
        value):
      raise _Invalid(f"{key}={value!r} must be a finite number")
  counts = {k: v for k, v in p.items() if k != "sigma"}
  for key, value in counts.items():
    if value != int(value) or value < 1:
      raise _Invalid(f"{key}={value:g} must be an integer >= 1")
  if kind == "uniform" and p["low"] > p["high"]:
    raise _Invalid(f"low={p['low']:g} is above high={p['high']:g}")
  if kind == "lognormal":
    if p["sigma"] <= 0:
      raise _Invalid(f"sigma={p['sigma']:g} must be > 0")
    if p.get("min", 1) > p["max"]:
      raise _Invalid(f"min={p['min']:g} is above max={p['max']:g}")


@dataclasses.dataclass(frozen=True)
class Distribution:
  """A distribution of token counts (integers >= 1), from a spec such as "fixed:128",
  "uniform:low=16,high=256" (inclusive) or "lognormal:median=200,sigma=0.6,max=1024"
  (rounded to integers and clipped to [min, max]; min defaults to 1). Every
  distribution is bounded (`high`), so a trace can be checked against the model's
  context before any draw.
  """

  kind: str
  params: tuple[tuple[str, float], ...]

  @classmethod
  def parse(cls, spec: str) -> Distribution:
    if isinstance(spec, Distribution):
      return spec
    where = f"distribution spec {spec!r}"
    match = _DIST.match(spec) if isinstance(spec, str) else None
    if match is None or match.group(1) not in DISTRIBUTIONS:
      raise ValueError(f"{where}: want one of {', '.join(DISTRIBUTIONS)} followed by ':' and "
                       "its parameters, e.g. 'lognormal:median=200,sigma=0.6,max=1024'")
    kind, rest = match.group(1), (match.group(2) or "").strip()
    required, optional = DISTRIBUTIONS[kind]
    params: dict[str, float] = {}
    if kind == "fixed" and rest and "=" not in rest:
      rest = f"value={rest}"
    for item in filter(None, (p.strip() for p in rest.split(","))):
      key, sep, value = item.partition("=")
      key = key.strip()
      if not sep or key not in required + optional:
        raise ValueError(f"{where}: {item!r} is not one of {kind}'s parameters "
                         f"{', '.join(required + optional)} (as name=value)")
      if key in params:
        raise ValueError(f"{where}: {key} given twice")
      params[key] = _number(value.strip(), where)
    missing = [k for k in required if k not in params]
    if missing:
      raise ValueError(f"{where}: {kind} needs {', '.join(missing)}")
    try:
      _validate(kind, params)
    except _Invalid as e:
      raise ValueError(f"{where}: {e.reason}") from None
    return cls(kind, tuple(sorted(params.items())))

  def __post_init__(self):
    try:
      _validate(self.kind, dict(self.params))
    except _Invalid as e:
      raise ValueError(f"distribution {self.kind}:{dict(self.params)}: {e.reason}") from None


  @property
  def name(self) -> str:
    """The spec `parse` rebuilds it from (exact: integers as integers, floats by repr)."""
    return f"{self.kind}:" + ",".join(f"{k}={_exact(v)}" for k, v in self.params)

  @property
  def high(self) -> int:
    """The largest count it can draw."""
    p = dict(self.params)
    return int({"fixed": p.get("value"), "uniform": p.get("high"), "lognormal": p.get("max")}[
        self.kind])

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` draws, int64 in [1, high]."""
    p = dict(self.params)
    if self.kind == "fixed":
      return np.full(n, int(p["value"]), np.int64)
    if self.kind == "uniform":
      return rng.integers(int(p["low"]), int(p["high"]) + 1, size=n).astype(np.int64)
    x = np.rint(p["median"] * np.exp(p["sigma"] * rng.standard_normal(n)))
    return np.clip(x, p.get("min", 1), p["max"]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Request:
  """One request of a trace.

  Attributes:
    id: unique within its trace.
    arrival_s: seconds from the trace's start.
    prompt: int32 token ids (non-empty, read-only).
    max_new_tokens: the token budget.
    exact_length: True: generate exactly `max_new_tokens` tokens (stop ids ignored: a
      prescribed output length); False: stop at the first stop id, or at the budget.
  """

  id: str
  arrival_s: float
  prompt: np.ndarray
  max_new_tokens: int
  exact_length: bool = False

  def __post_init__(self):
    if not isinstance(self.id, str) or not self.id:
      raise ValueError(f"request id must be a non-empty string, got {self.id!r}")
    if not isinstance(self.exact_length, (bool, np.bool_)):
      raise ValueError(f"request {self.id!r}: exact_length must be a bool, got "
                       f"{self.exact_length!r}")
    object.__setattr__(self, "exact_length", bool(self.exact_length))
    ids = np.asarray(self.prompt)
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"request {self.id!r}: prompt must be integer token ids, got dtype "
                       f"{ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"request {self.id!r}: prompt must be a non-empty 1-D list of token "
                       f"ids, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
      raise ValueError(f"request {self.id!r}: prompt ids must be in [0, 2**31)")
    ids = ids.astype(np.int32)
    ids.setflags(write=False)
    object.__setattr__(self, "prompt", ids)
    if not (isinstance(self.arrival_s, (int, float)) and not isinstance(self.arrival_s, bool)
            and _finite(self.arrival_s) and self.arrival_s >= 0):
      raise ValueError(f"request {self.id!r}: arrival_s must be a finite number >= 0, got "
                       f"{self.arrival_s!r}")
    object.__setattr__(self, "arrival_s", float(self.arrival_s) + 0.0)  # -0.0 -> 0.0
    if isinstance(self.max_new_tokens, bool) or not isinstance(
        self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
      raise ValueError(f"request {self.id!r}: max_new_tokens must be an int >= 1, got "
                       f"{self.max_new_tokens!r}")
    object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))

  @property
  def prompt_len(self) -> int:
    return int(self.prompt.size)


def trace_sha256(requests: Sequence[Request]) -> str:
  """The sha256 of `requests` in the byte layout the module docstring gives."""
  h = hashlib.sha256()
  for r in requests:
    name = r.id.encode()
    h.update(struct.pack("<Q", len(name)) + name + struct.pack("<d", r.arrival_s))
    h.update(struct.pack("<Q", r.prompt_len) + r.prompt.astype("<i4").tobytes())
    h.update(struct.pack("<QB", r.max_new_tokens, r.exact_length))
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Trace:
  """Requests in arrival order (non-decreasing `arrival_s`, unique ids), with `sha256 ==
  trace_sha256(requests)` (checked). `filler`: the disclosure of the workload whose
  tokens fill length-only prompts, if any request has one."""

  name: str
  description: str
  requests: tuple[Request, ...]
  sha256: str = ""
  seed: int | None = None
  filler: Mapping[str, Any] | None = None

  def __post_init__(self):
    requests = tuple(self.requests)
    if not requests:
      raise ValueError(f"trace {self.name!r} has no requests")
    seen: set[str] = set()
    for i, r in enumerate(requests):
      if r.id in seen:
        raise ValueError(f"trace {self.name!r}: request id {r.id!r} appears twice")
      seen.add(r.id)
      if i and r.arrival_s < requests[i - 1].arrival_s:
        raise ValueError(f"trace {self.name!r}: request {r.id!r} arrives at {r.arrival_s} s, "
                         f"before the request before it ({requests[i - 1].arrival_s} s)")
    object.__setattr__(self, "requests", requests)
    digest = trace_sha256(requests)
    if self.sha256 and self.sha256 != digest:
      raise ValueError(f"trace {self.name!r}: sha256={self.sha256} does not match its requests "
                       f"({digest})")
    object.__setattr__(self, "sha256", digest)

  def __len__(self) -> int:
    return len(self.requests)

  @property
  def prompt_tokens(self) -> int:
    return sum(r.prompt_len for r in self.requests)

  @property
  def max_output_tokens(self) -> int:
    """The sum of the budgets: what the trace generates at most."""
    return sum(r.max_new_tokens for r in self.requests)

  @property
  def duration_s(self) -> float:
    """The last arrival."""
    return self.requests[-1].arrival_s

  def longest(self) -> int:
    """The most positions one request needs: prompt + budget."""
    return max(r.prompt_len + r.max_new_tokens for r in self.requests)

  def disclosure(self) -> dict[str, Any]:
    """What to record wherever the trace is served."""
    out = {"name": self.name, "description": self.description, "num_requests": len(self),
           "prompt_tokens": self.prompt_tokens, "max_output_tokens": self.max_output_tokens,
           "duration_s": self.duration_s, "sha256": self.sha256, "seed": self.seed}
    if self.filler is not None:
      out["filler"] = dict(self.filler)
    return out


class _Filler:
  """Consecutive windows of a token stream for length-only prompts (wrapping at its end)."""

  def __init__(self, filler: Workload | np.ndarray | Sequence[int] | None):
    self.disclosure = filler.disclosure() if isinstance(filler, Workload) else None
    self.stream = None if filler is None else (
        filler.stream() if isinstance(filler, Workload) else np.asarray(filler, np.int32))
    if self.stream is not None and (self.stream.ndim != 1 or self.stream.size == 0):
      raise ValueError(f"filler must be a workload or a non-empty 1-D token stream, got "
                       f"shape {self.stream.shape}")
    if self.disclosure is None and self.stream is not None:
      self.disclosure = {"name": "token stream", "num_tokens": int(self.stream.size),
                         "token_sha256": hashlib.sha256(
                             self.stream.astype("<i4").tobytes()).hexdigest()}
    self.offset = 0
    self.used = False

  def take(self, n: int, where: str) -> np.ndarray:
    if self.stream is None:
      raise ValueError(f"{where}: a prompt given by its length needs a filler workload "
                       "(filler=...) to take its tokens from")
    if n > self.stream.size:
      raise ValueError(f"{where}: prompt_len={n} is longer than the filler's "
                       f"{self.stream.size} tokens")
    self.used = True
    start = self.offset if self.offset + n <= self.stream.size else 0
    self.offset = start + n
    return self.stream[start:start + n]


def _fit(where: str, prompt_len: int, budget: int, max_context: int) -> None:
  if prompt_len + budget > max_context:
    raise ValueError(f"{where}: a prompt of {prompt_len} tokens plus {budget} new tokens needs "
                     f"{prompt_len + budget} positions, more than the model context "
                     f"max_context={max_context}")


def _check_context(max_context) -> int:
  if isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer)) or (
      max_context < 2):
    raise ValueError(f"max_context must be an int >= 2 (the model's positions), got "
                     f"{max_context!r}")
  return int(max_context)


_PROMPT_KEYS = ("prompt", "prompt_ids", "messages", "prompt_len")
_BUDGET_KEYS = ("max_new_tokens", "output_len")
_KEYS = ("id", "arrival_s", *_PROMPT_KEYS, *_BUDGET_KEYS)


def _positive_int(value, where: str, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
  return value


def _request(record: Any, where: str, tokenizer: TokenizerLike | None, filler: _Filler,
             max_context: int, default_id: str) -> Request:
  if not isinstance(record, dict):
    raise ValueError(f"{where}: want a JSON object, got {type(record).__name__}")
  unknown = sorted(set(record) - set(_KEYS))
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
  arrival = record.get("arrival_s")
  if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not (
      _finite(arrival) and arrival >= 0):
    raise ValueError(f"{where}: arrival_s must be a number >= 0 (seconds from the trace's "
                     f"start), got {arrival!r}")
  rid = record.get("id", default_id)
  if not isinstance(rid, str) or not rid:
    raise ValueError(f"{where}: id must be a non-empty string, got {rid!r}")
  prompt_keys = [k for k in _PROMPT_KEYS if k in record]
  budget_keys = [k for k in _BUDGET_KEYS if k in record]
  if len(prompt_keys) != 1:
    raise ValueError(f"{where}: give exactly one of {', '.join(_PROMPT_KEYS)}, got "
                     f"{prompt_keys or 'none'}")
  if len(budget_keys) != 1:
    raise ValueError(f"{where}: give exactly one of {', '.join(_BUDGET_KEYS)}, got "
                     f"{budget_keys or 'none'}")
  (kind,), (budget_key,) = prompt_keys, budget_keys
  budget = _positive_int(record[budget_key], where, budget_key)
  value = record[kind]
  if kind in ("prompt", "messages") and tokenizer is None:
    raise ValueError(f"{where}: a {kind!r} prompt needs a tokenizer")
  if kind == "prompt":
    if not isinstance(value, str) or not value:
      raise ValueError(f"{where}: prompt must be a non-empty string")
    ids = tokenizer.encode(value)
  elif kind == "messages":
    if not isinstance(value, list) or not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value):
      raise ValueError(f"{where}: messages must be a non-empty list of "
                       '{"role": str, "content": str} objects')
    ids = tokenizer.encode_chat(value, add_generation_prompt=True)
  elif kind == "prompt_ids":
    if not isinstance(value, list) or not value or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value):
      raise ValueError(f"{where}: prompt_ids must be a non-empty list of integers")
    vocab = getattr(tokenizer, "vocab_size", None)
    limit = vocab if vocab is not None else 2**31
    bad = [i for i in value if i < 0 or i >= limit]
    if bad:
      raise ValueError(f"{where}: prompt_ids holds {bad[0]}, outside [0, "
                       f"{vocab if vocab is not None else '2**31'})")
    ids = value
  else:
    ids = None
  prompt_len = len(ids) if ids is not None else _positive_int(value, where, "prompt_len")
  if prompt_len == 0:
    raise ValueError(f"{where}: the prompt encodes to no tokens")
  _fit(where, prompt_len, budget, max_context)
  if ids is None:
    ids = filler.take(prompt_len, where)
  return Request(rid, float(arrival), np.asarray(ids), budget, budget_key == "output_len")


def load_jsonl(path: str | Path, tokenizer: TokenizerLike | None = None, *, max_context: int,
               filler: Workload | np.ndarray | None = None) -> Trace:
  """A trace from a JSONL file (format in the module docstring).

  Args:
    path: the file.
    tokenizer: encodes "prompt" and "messages" prompts, and bounds "prompt_ids" by its
      `vocab_size`; may be None when neither is used.
    max_context: the model's positions: each request's prompt + budget must fit.
    filler: the tokens of "prompt_len" prompts (consecutive windows of its stream).

  Raises:
    ValueError: naming `path:line` for a malformed line, a missing or unknown key, a
      negative or zero length, an arrival before the previous line's, a duplicate id,
      or a request longer than `max_context`; a file with no requests.
  """
  max_context = _check_context(max_context)
  path = Path(path)
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read trace {path}: {e}") from e
  source = _Filler(filler)
  requests: list[Request] = []
  ids: dict[str, int] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e.msg})") from e
    r = _request(record, where, tokenizer, source, max_context, f"line{number}")
    if requests and r.arrival_s < requests[-1].arrival_s:
      raise ValueError(f"{where}: arrival_s={r.arrival_s} is before the previous request's "
                       f"{requests[-1].arrival_s}: a trace is in arrival order")
    if r.id in ids:
      raise ValueError(f"{where}: id {r.id!r} was already used on line {ids[r.id]}")
    ids[r.id] = number
    requests.append(r)
  if not requests:
    raise ValueError(f"trace {path} holds no requests")
  return Trace(name=f"jsonl:{path.resolve()}",
               description=f"{len(requests)} requests from {path.name}",
               requests=tuple(requests), filler=source.disclosure if source.used else None)


def _check_arrivals(rate, num_requests, seed) -> None:
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
      math.isfinite(rate) and rate > 0):
    raise ValueError(f"rate must be a finite number of requests per second > 0, got {rate!r}")
  if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
    raise ValueError(f"num_requests must be an int >= 1, got {num_requests!r}")
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def poisson(*, rate: float, num_requests: int, prompt_len: str | Distribution,
            output_len: str | Distribution, max_context: int, filler: Workload | np.ndarray,
            seed: int = 0) -> Trace:
  """A synthetic trace: Poisson arrivals at `rate` requests per second (exponential gaps;
  the first request arrives after one gap), prompt and output lengths drawn from
  `Distribution`s, prompts from consecutive windows of `filler`, every request
  generating exactly its output length. Deterministic for `seed`.

  Raises:
    ValueError: a non-positive rate or count, a bad distribution spec, or distributions
      whose largest prompt plus largest output exceed `max_context` (checked before
      drawing), or a prompt longer than the filler.
  """
  max_context = _check_context(max_context)
  _check_arrivals(rate, num_requests, seed)
  prompts, outputs = Distribution.parse(prompt_len), Distribution.parse(output_len)
  _fit(f"prompt_len={prompts.name} and output_len={outputs.name}", prompts.high, outputs.high,
       max_context)
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
  p, o = prompts.sample(rng, num_requests), outputs.sample(rng, num_requests)
  source = _Filler(filler)
  requests = tuple(
      Request(f"r{i}", float(arrivals[i]), source.take(int(p[i]), f"request r{i}"), int(o[i]),
              exact_length=True) for i in range(num_requests))
  name = (f"poisson:rate={_exact(rate)},num_requests={num_requests},prompt_len={prompts.name},"
          f"output_len={outputs.name},seed={seed}")
  return Trace(name=name, description=(
      f"{num_requests} requests, Poisson arrivals at {rate:g}/s, prompt lengths {prompts.name}, "
      f"output lengths {outputs.name}"), requests=requests, seed=seed, filler=source.disclosure)


def chat(tokenizer: TokenizerLike, *, rate: float, num_requests: int,
         output_len: str | Distribution, max_context: int, seed: int = 0) -> Trace:
  """A chat trace: Poisson arrivals at `rate` (as `poisson`'s) of the first
  `num_requests` questions of `workloads.CHAT_QUESTIONS` shuffled by `seed`, each one
  user turn in `tokenizer`'s chat template with the generation prompt
  (`workloads.chat_prompts`), with a budget drawn from `output_len`: generation ends at
  a stop id or at the budget. Deterministic for `seed`.

  Raises:
    ValueError: a non-positive rate, a count outside [1, len(CHAT_QUESTIONS)], a bad
      distribution spec, or a prompt plus the largest budget past `max_context`.
  """
  max_context = _check_context(max_context)
  _check_arrivals(rate, num_requests, seed)
  outputs = Distribution.parse(output_len)
  _, prompts = chat_prompts(tokenizer, num_questions=num_requests, seed=seed)
  longest = max(len(p) for p in prompts)
  _fit(f"the longest chat prompt ({longest} tokens) and output_len={outputs.name}", longest,
       outputs.high, max_context)
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
  o = outputs.sample(rng, num_requests)
  requests = tuple(Request(f"r{i}", float(arrivals[i]), np.asarray(prompts[i], np.int32),
                           int(o[i])) for i in range(num_requests))
  name = (f"chat:rate={_exact(rate)},num_requests={num_requests},output_len={outputs.name},"
          f"seed={seed}")
  return Trace(name=name, description=(
      f"{num_requests} chat questions (kvtpu.eval.workloads.CHAT_QUESTIONS, shuffled by seed "
      f"{seed}) in the model's chat template, Poisson arrivals at {rate:g}/s, budgets "
      f"{outputs.name} (ending at a stop id)"), requests=requests, seed=seed)

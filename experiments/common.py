"""What the experiment binaries share: argv and flag checks, flag values as config
fields, and multi-host start-up.

A binary defines its flags in `define_flags(fv)` (on the global `FLAGS` only when run
as a program), builds its config with `config_from_flags(fv)` inside `usage_errors()`
(a `ConfigError` becomes a `UsageError` naming the flag) and calls the run of
`kvtpu.models.runs`. `parse_flags` gives tests a private `FlagValues` to parse into.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

from absl import app, flags
from kvtpu.models.runs.common import ConfigError

__all__ = ["check_argv", "format_names", "maybe_initialize_distributed", "multihost_tpu",
           "parse_flags", "usage_errors"]


def check_argv(argv: Sequence[str]) -> None:
  """Rejects positional arguments (everything is a flag)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {list(argv[1:])}")


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
  """Turns a `ConfigError` (an invalid config field) into a `UsageError` naming the flag of
  the same name: "--<field>: <message>"."""
  try:
    yield
  except ConfigError as e:
    raise app.UsageError(f"--{e}") from None


def parse_flags(define_flags: Callable[[flags.FlagValues], None],
                argv: Sequence[str]) -> flags.FlagValues:
  """A fresh `FlagValues` with a binary's flags, parsed from `argv` (flags only)."""
  fv = flags.FlagValues()
  define_flags(fv)
  fv(["prog", *argv])
  return fv


def format_names(values: list[str]) -> list[str]:
  """A list flag of format names, with `k=<spec>,v=<spec>` rejoined.

  absl list flags split on commas, which also separate the K and V specs of a mixed
  format: `--kv_formats=int8,k=int8-channel,v=int8` arrives as three items.
  """
  out: list[str] = []
  for v in values:
    if v.strip().lower().startswith("v=") and out and out[-1].strip().lower().startswith("k="):
      out[-1] = f"{out[-1]},{v}"
    else:
      out.append(v)
  return out


def multihost_tpu() -> bool:
  """Whether this process is one host of a multi-host Cloud TPU slice (the TPU
  runtime lists several worker hostnames)."""
  hosts = [h.strip() for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")]
  # libtpu's own "WARNING: could not determine TPU worker hostnames, ..." is no list.
  return len(hosts) > 1 and all(h and not any(c.isspace() for c in h) for h in hosts)


def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """Calls `jax.distributed.initialize()` ("yes"; "auto": on a multi-host TPU slice, where
  it finds the coordinator itself); returns whether it did."""
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"mode must be 'auto', 'yes' or 'no', got mode={mode!r}")
  if mode == "yes" or (mode == "auto" and multihost_tpu()):
    import jax  # noqa: PLC0415

    jax.distributed.initialize()
    return True
  return False

"""What the experiment binaries share: argv and flag checks, flag values as config
fields, the workdir flags, usage errors and multi-host start-up.

A binary defines its flags in `define_flags(fv)` (on the global `FLAGS` only when run
as a program), builds its config with `config_from_flags(fv)` inside `usage_errors()`
(a `ConfigError` becomes a `UsageError` naming the flag) and calls the run of
`kvtpu.models.runs` from `main(argv, fv)`. Every flag is checked when the config is
built and the workdir when the run starts, before any model load, calibration, compile
or scoring. `run_main` is the program's entry point: a usage error (a flag absl cannot
parse, an invalid config, a refused workdir) prints `error: <message>` as its first
line and a hint to --help, not the module docstring, and exits with status 1.
--help shows the module docstring and the flags.
`parse_flags` gives tests a private `FlagValues` to parse into.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from absl import app, flags
from kvtpu.models.runs.common import ConfigError

FLAGS = flags.FLAGS

__all__ = ["call_or_exit", "check_argv", "define_workdir_flags", "exit_on_usage_error",
           "format_names", "maybe_initialize_distributed", "multihost_tpu", "parse_flags",
           "parse_or_exit", "run_main", "usage_errors", "workdir_options", "workload_names"]


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


def define_workdir_flags(fv: flags.FlagValues, default: str | None, *,
                         resumable: bool = False, what: str = "Output directory") -> None:
  """--workdir (its help starting with `what`), --overwrite and (`resumable`) --resume, on
  `fv`."""
  reuse = "--overwrite or --resume" if resumable else "--overwrite"
  flags.DEFINE_string("workdir", default, f"{what}: a new or empty folder (unless {reuse}).",
                      flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Write into a non-empty --workdir, replacing the "
                       "outputs of the same names (other files stay).", flag_values=fv)
  if resumable:
    flags.DEFINE_boolean("resume", False, "Continue the run in --workdir: keep the finished "
                         "items of its results.jsonl and compute only the others (its "
                         "config.json must record the same flags; an empty --workdir starts "
                         "afresh).", flag_values=fv)


def workdir_options(fv: flags.FlagValues) -> dict[str, bool]:
  """The keyword arguments of a run's workdir rule: `overwrite` and, when defined, `resume`."""
  out = {"overwrite": fv["overwrite"].value}
  if "resume" in fv:
    out["resume"] = fv["resume"].value
  return out


def exit_on_usage_error(message: str, exitcode: int = 1) -> NoReturn:
  """Prints "error: <message>" and a hint to --help to stderr, then exits with `exitcode`."""
  sys.stderr.write(f"error: {message}\nRun with --help to see the flags.\n")
  sys.exit(exitcode)


def parse_or_exit(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """`fv(argv)`; a value absl cannot parse exits through `exit_on_usage_error`."""
  try:
    return fv(list(argv))
  except flags.Error as e:
    exit_on_usage_error(str(e))


def call_or_exit(main: Callable[[list[str], flags.FlagValues], None], argv: list[str],
                 fv: flags.FlagValues) -> None:
  """`main(argv, fv)`; a UsageError or ConfigError exits through `exit_on_usage_error`."""
  try:
    with usage_errors():
      main(argv, fv)
  except app.UsageError as e:
    exit_on_usage_error(str(e), 1 if e.exitcode is None else e.exitcode)


def run_main(main: Callable[[list[str], flags.FlagValues], None],
             define_flags: Callable[[flags.FlagValues], None]) -> None:
  """A binary's entry point: defines its flags on `FLAGS` and runs `main(argv, FLAGS)` with
  absl (`parse_or_exit`, `call_or_exit`): a usage error prints "error: <message>" as its
  first line, not the module docstring that absl prints before it."""
  define_flags(FLAGS)
  app.run(lambda argv: call_or_exit(main, argv, FLAGS),
          flags_parser=lambda argv: parse_or_exit(FLAGS, argv))


def parse_flags(define_flags: Callable[[flags.FlagValues], None],
                argv: Sequence[str]) -> flags.FlagValues:
  """A fresh `FlagValues` with a binary's flags, parsed from `argv` (flags only)."""
  fv = flags.FlagValues()
  define_flags(fv)
  fv(["prog", *argv])
  return fv


def format_names(values: list[str]) -> list[str]:
  """A list flag of format names, with `k=<spec>,v=<spec>` and layer lists rejoined.

  absl list flags split on commas, which also separate the K and V specs of a mixed
  format (`--kv_formats=int8,k=int8-channel,v=int8` arrives as three items) and the
  layers of a layer plan's override (`int8|int4@3,5-7` as two).
  """
  out: list[str] = []
  for v in values:
    # The last format of the previous item (a plan's last override, or the item).
    tail = out[-1].rsplit("|", 1)[-1].strip().lower() if out else ""
    if v.strip().lower().startswith("v=") and tail.startswith("k=") and "@" not in tail:
      out[-1] = f"{out[-1]},{v}"
    elif re.fullmatch(r"\s*\d+(-\d+)?\s*", v) and "@" in tail:
      out[-1] = f"{out[-1]},{v}"
    else:
      out.append(v)
  return out


_OPTION = re.compile(r"\s*\w+\s*=")


def workload_names(values: list[str]) -> list[str]:
  """A list flag of workload specs, with the options of `kind:key=value,key=value` rejoined.

  absl list flags split on commas, which also separate a spec's options:
  `--eval_workloads=prose,random:num_tokens=4096,seed=1` arrives as three items. An item
  that is a `key=value` option (not a .txt/.jsonl path) belongs to the spec before it.
  """
  out: list[str] = []
  for v in values:
    if out and ":" in out[-1] and _OPTION.match(v) and not v.strip().endswith((".txt", ".jsonl")):
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

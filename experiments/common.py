"""Helpers shared by the experiment binaries (flag parsing)."""

from __future__ import annotations

from absl import app


def positive_ints(name: str, values: list[str]) -> list[int]:
  """A list flag's values as positive ints, or a `UsageError` naming `--name`."""
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name} must be comma-separated integers, got {values}") from None
  if not out or min(out) < 1:
    raise app.UsageError(f"--{name} must be positive integers, got {values}")
  return out

"""Helpers shared by the experiment binaries (flag parsing, the chat workload's answers)."""

from __future__ import annotations

import os

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


def chat_responder(model, tokenizer, *, max_new_tokens: int = 64):
  """`respond` for the chat workload: the model's own greedy answers (bf16 cache)."""
  from kvtpu.models.generation import generate

  def respond(prompts):
    return generate(model, prompts, max_new_tokens=max_new_tokens, kv_format="bf16",
                    stop_ids=tokenizer.stop_ids).tokens
  return respond


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

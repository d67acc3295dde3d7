"""Helpers shared by the experiment binaries (flag parsing, the chat workload's answers)."""

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


def chat_responder(model, tokenizer, *, max_new_tokens: int = 64):
  """`respond` for the chat workload: the model's own greedy answers (bf16 cache)."""
  from models.generation import generate

  def respond(prompts):
    return generate(model, prompts, max_new_tokens=max_new_tokens, kv_format="bf16",
                    stop_ids=tokenizer.stop_ids).tokens
  return respond

"""Support of the binaries' tests: a tiny model saved as a checkpoint with SmolLM2's
tokenizer (so every workload tokenizes as for the real model), a fake tokenizer, a fake
`load_pretrained` giving both without files, and `forbid`, which makes a run's expensive
steps fail so that a test proves a check came before them."""

from __future__ import annotations

import dataclasses
import pathlib

from flax import nnx
from kvtpu.models import loaders
from kvtpu.models.llama import Llama
from kvtpu.models.pretrained import load_pretrained

from tests.helpers import TINY

# TINY (2 layers, 2 kv heads, head dim 16) with SmolLM2's vocabulary and a 2048-token context.
TINY_SMOLLM_VOCAB = dataclasses.replace(TINY, name="tiny-smollm-vocab", vocab_size=49152,
                                        max_position=2048)


def save_tiny_checkpoint(path: pathlib.Path) -> pathlib.Path:
  """Saves a random-weight `TINY_SMOLLM_VOCAB` Llama and SmolLM2's tokenizer at `path`, a
  folder `load_pretrained` (and every binary's --model) takes."""
  _, tokenizer = load_pretrained("smollm2-135m")
  cfg = dataclasses.replace(TINY_SMOLLM_VOCAB, vocab_size=tokenizer.vocab_size)
  loaders.save_checkpoint(Llama(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tokenizer)
  return path


class FakeTokenizer:
  """Characters to ids (mod the vocabulary), a chat template of two marker ids."""

  stop_ids = frozenset({3, 4})
  pad_id = 0
  bos_id = None
  vocab_size = TINY.vocab_size  # Ids below it: the "random" workload fits TINY.

  def encode(self, text):
    return [10 + ord(c) % 80 for c in text]

  def encode_chat(self, messages, add_generation_prompt=True):
    assert add_generation_prompt and messages[-1]["role"] == "user"
    return [1] + self.encode(messages[-1]["content"]) + [2]

  def decode(self, ids, skip_special_tokens=True):
    return "".join("" if skip_special_tokens and i < 10 else chr(ord("a") + i % 26) for i in ids)


def fake_pretrained(cfg=TINY):
  """A stand-in for `load_pretrained`: a random-weight Llama of `cfg` and a FakeTokenizer,
  whatever the name."""
  def load(name_or_path, *, param_dtype=None, **kwargs):
    return Llama(cfg, rngs=nnx.Rngs(0)), FakeTokenizer()
  return load


def forbid(monkeypatch, module, *names: str) -> None:
  """Replaces each `module.<name>` with a function that fails the test when called."""
  for name in names:
    def forbidden(*args, _name=name, **kwargs):
      raise AssertionError(f"{module.__name__}.{_name} must not be called")
    monkeypatch.setattr(module, name, forbidden)

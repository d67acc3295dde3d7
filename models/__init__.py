"""Flax decoders (Llama family) on the kvtpu cache, with real weights and generation.

  model, tokenizer = models.load_pretrained("smollm2-135m")   # or a .gguf / HF folder
  out = models.generate(model, [tokenizer.encode_chat(messages)], max_new_tokens=32,
                        kv_format="int8", stop_ids=tokenizer.stop_ids)

Continuous batching over a paged cache: `models.Engine(model, kv_format=..., slots=...,
num_pages=..., page_len=..., max_len=...).run(trace)` (`kvtpu.models.serving`).

Model shapes: `ModelConfig`, with well-known models in `kvtpu.models.presets`. Imports
`kvtpu`, never `experiments`.
"""

from kvtpu.models.config import ModelConfig, RopeScaling
from kvtpu.models.generation import Generation, Sampling, generate
from kvtpu.models.llama import Llama
from kvtpu.models.pretrained import load_pretrained
from kvtpu.models.serving import Engine
from kvtpu.models.tokenizer import Tokenizer

__all__ = ["Engine", "Generation", "Llama", "ModelConfig", "RopeScaling", "Sampling", "Tokenizer",
           "generate", "load_pretrained"]

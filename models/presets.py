"""Shapes of well-known decoders, from their published Hugging Face `config.json`s.

Enough to size weights and KV caches without the weight files (the headroom sweep
and reports); loading real weights is `kvtpu.models.load_pretrained`'s job.
"""

from __future__ import annotations

from kvtpu.models.config import ModelConfig, RopeScaling

__all__ = ["PRESETS", "get"]

_LLAMA3_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position=8192)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (
    ModelConfig("llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                rope_scaling=_LLAMA3_SCALING, max_position=131072),
    ModelConfig("llama-3.1-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                rope_scaling=_LLAMA3_SCALING, max_position=131072),
    ModelConfig("mistral-7b", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                rope_theta=1000000.0, max_position=32768),  # v0.3
    ModelConfig("qwen2.5-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True, max_position=32768),
    # Gemma-2's attention soft-capping and sliding window change no shape that sizes
    # weights or caches; its sandwich norms add two RMSNorm weights per layer.
    ModelConfig("gemma-2-9b", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, rms_norm_eps=1e-6,
                tie_embeddings=True, max_position=8192, norms_per_layer=4),
    ModelConfig("smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                tie_embeddings=True, max_position=8192),
)}


def get(name: str) -> ModelConfig:
  """The preset called `name` (case-insensitive)."""
  key = name.strip().lower()
  if key not in PRESETS:
    raise ValueError(f"unknown model preset name={name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key]

"""Decoder model configuration (Llama family): the shapes that size weights and caches."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["RopeScaling", "ModelConfig"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 rotary frequency scaling (`rope_type: llama3` in HF configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder.

  Attributes:
    name: model id for reports.
    vocab_size, hidden_size, intermediate_size: embedding and MLP widths.
    num_layers: L.
    num_heads: N query heads; num_kv_heads: K (N a multiple of K).
    head_dim: H (not always hidden_size / num_heads, e.g. Gemma-2).
    rope_theta: rotary base; rope_scaling: Llama-3 frequency scaling or None.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection shares the embedding matrix.
    qkv_bias: q/k/v projections have biases (Qwen2).
    max_position: the context the model was trained for.
    norms_per_layer: RMSNorm weights per layer (2; Gemma-2's sandwich norms: 4).
  """

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  max_position: int = 4096
  norms_per_layer: int = 2

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field} must be a positive int, got {field}={value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")

  def num_params(self) -> int:
    """Parameter count: embeddings, attention, SwiGLU MLP, norms, output head."""
    d, h = self.hidden_size, self.head_dim
    q, kv = self.num_heads * h, self.num_kv_heads * h
    attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if self.qkv_bias else 0)
    mlp = 3 * d * self.intermediate_size
    per_layer = attn + mlp + self.norms_per_layer * d
    embed = self.vocab_size * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return embed + self.num_layers * per_layer + d + head

  def weight_bytes(self, bits_per_weight: float) -> int:
    """Bytes of all weights stored at `bits_per_weight` (16 for bf16, 8, 4, ...)."""
    return math.ceil(self.num_params() * bits_per_weight / 8)

"""Model presets: parameter counts against the published ones, cache sizing, errors."""

import pytest
from kvtpu.models import presets
from kvtpu.models.config import ModelConfig

import kvtpu

# Parameter counts from each model's Hugging Face model card / safetensors index: an
# independent check of every shape in the preset.
PUBLISHED_PARAMS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-2-9b": 9_241_705_984,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(name):
  assert presets.get(name).num_params() == PUBLISHED_PARAMS[name]


def test_kv_cache_sizing_by_hand():
  # Llama-3.1-8B, bf16 cache: 2 (K, V) x 32 layers x 8 kv heads x 128 x 2 bytes
  # = 131072 bytes per token = 128 KiB; at 128K tokens, 16 GiB.
  c = presets.get("Llama-3.1-8B")
  per_token = c.num_layers * kvtpu.memory.bytes_per_token(
      "bf16", kv_heads=c.num_kv_heads, head_dim=c.head_dim)
  assert per_token == 131072
  assert per_token * 131072 == 16 * 2**30
  assert c.weight_bytes(16) == 2 * 8_030_261_248


def test_errors():
  with pytest.raises(ValueError, match="unknown model preset name='llama-9'; known:"):
    presets.get("llama-9")
  with pytest.raises(ValueError, match="num_heads=9 must be a multiple of num_kv_heads=4"):
    ModelConfig("x", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=9, num_kv_heads=4, head_dim=8)
  with pytest.raises(ValueError, match="head_dim must be a positive int"):
    ModelConfig("x", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=1, num_kv_heads=1, head_dim=0)

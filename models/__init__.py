"""Flax decoders (Llama family) on the kvtpu cache, weight loaders, tokenizer and jitted
generation (issue #4). Model shapes: `models.config.ModelConfig`, with well-known models
in `models.presets`. Imports `kvtpu`, never `experiments`."""

"""Flax decoders (Llama family) on the kvtpu cache, weight loaders, tokenizer and
jitted generation, arriving with issue #4. Imports `kvtpu`, never `experiments`."""

"""Pallas TPU kernels over raw arrays, each with a pure-jnp reference.

One package per kernel (`decode_attention/`, `prefill_attention/`). Kernels know storage dtypes and scale layouts as static arguments and
nothing about calibration or models; this package never imports `kvtpu`.
"""

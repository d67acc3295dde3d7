"""Chunked-prefill attention over a quantized KV cache: Pallas TPU kernel and reference."""

from kvtpu.pallas_kernels.prefill_attention.kernel import (
    PrefillBlockSizes,
    default_prefill_block_sizes,
    prefill_attention,
    prefill_vmem_estimate_bytes,
)
from kvtpu.pallas_kernels.prefill_attention.reference import (
    ref_prefill_attention,
    validate_prefill_inputs,
)

__all__ = ["PrefillBlockSizes", "default_prefill_block_sizes", "prefill_attention",
           "prefill_vmem_estimate_bytes", "ref_prefill_attention", "validate_prefill_inputs"]

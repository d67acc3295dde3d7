"""Decode attention (T <= 8) over a quantized KV cache: Pallas TPU kernel and reference."""

from kvtpu.pallas_kernels.decode_attention.kernel import (
    BlockSizes,
    check_precision,
    check_span,
    decode_attention,
    default_block_sizes,
    hbm_bytes,
    layout_error,
    merge_partials,
    min_hbm_bytes,
    vmem_estimate_bytes,
)
from kvtpu.pallas_kernels.decode_attention.reference import (
    MAX_DECODE_T,
    Dims,
    Window,
    decode_codes,
    dequantize_layer,
    dequantize_per_token,
    dequantize_token_groups,
    gather_pages,
    logical,
    masked_attention,
    ref_decode_attention,
    unpack_codes,
    unpack_operands,
    unpack_token_groups,
    unpack_transposed,
    validate_inputs,
    window_slots,
    window_transposed,
)

__all__ = ["BlockSizes", "check_precision", "check_span", "merge_partials", "decode_attention", "default_block_sizes", "hbm_bytes",
           "layout_error", "min_hbm_bytes", "vmem_estimate_bytes", "MAX_DECODE_T", "Dims",
           "masked_attention", "ref_decode_attention", "validate_inputs", "unpack_operands",
           "dequantize_per_token", "dequantize_token_groups", "dequantize_layer", "decode_codes",
           "unpack_codes", "unpack_token_groups", "unpack_transposed", "logical", "gather_pages",
           "Window", "window_slots", "window_transposed"]

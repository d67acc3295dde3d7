"""Writing a chunk of new tokens into a cache array in place: Pallas TPU kernel and reference."""

from kvtpu.pallas_kernels.cache_write.kernel import (
    cache_write,
    hbm_bytes,
    layout_error,
    place_chunk,
    tile_positions,
    tiles_touched,
    window_blocks,
    window_vmem_bytes,
    window_write,
)
from kvtpu.pallas_kernels.cache_write.reference import ref_cache_write

__all__ = ["cache_write", "hbm_bytes", "layout_error", "place_chunk", "tile_positions", "tiles_touched",
           "ref_cache_write", "window_blocks", "window_vmem_bytes", "window_write"]

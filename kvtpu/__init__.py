"""kvtpu: quantized (INT8 / INT4 / FP8) KV caches for JAX on TPU.

Public API:
  KVFormat, QuantSpec      storage formats (`KVFormat.parse("int8")`)
  KVCache                  the cache pytree: init / update / advance / counts (contiguous
                           or paged: `init(..., page_len=, num_pages=)`)
  PageAllocator, OutOfPages
                           host-side pages of a paged cache (`kvtpu.paging`)
  LayerPlan, LayeredKVCache
                           formats per layer, and the cache of layer groups that holds them
  attend                   attention over the cache (`impl="xla" | "pallas" | ...`)
  quantize, dequantize     the reference quantization math
  memory                   exact bytes per token and per cache
  sharding                 the cache on a (data, model) mesh: CacheSharding
  headroom                 the largest context / concurrency that fits in HBM
"""

from kvtpu import headroom, memory, sharding
from kvtpu.attention import attend
from kvtpu.cache import KVCache
from kvtpu.formats import PRESETS, Granularity, KVFormat, LayerPlan, QuantSpec, StorageDtype
from kvtpu.layered import LayeredKVCache
from kvtpu.paging import OutOfPages, PageAllocator
from kvtpu.quant import dequantize, quantize

__version__ = "0.1.0"

__all__ = ["KVFormat", "QuantSpec", "StorageDtype", "Granularity", "PRESETS", "KVCache",
           "LayerPlan", "LayeredKVCache", "PageAllocator", "OutOfPages",
           "attend", "quantize", "dequantize", "memory", "sharding", "headroom",
           "__version__"]

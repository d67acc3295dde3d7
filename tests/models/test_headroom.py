"""Measured headroom of a real decode step: the deployment's weight bytes by hand, the
AOT-compiled step's bytes against the analytic ones, the live step on the fake CPU mesh,
and the solver on the boundary with a measure that compiles or runs."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import pytest
from kvtpu.models import headroom as mh
from kvtpu.models import presets
from kvtpu.models.config import ModelConfig

from kvtpu import accelerators, memory
from kvtpu import headroom as hr
from kvtpu.formats import KVFormat

MIB = 2**20

requires_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (the `tpu` extra) is not installed: no TPU compiler")


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("text,expect", [
    ("data:2,model:4", {"data": 2, "model": 4}),
    ("model:8,data:1", {"data": 1, "model": 8}),
    (" data:1 , model:1 ", {"data": 1, "model": 1}),
])
def test_parse_mesh(text, expect):
  assert mh.parse_mesh(text) == expect


@pytest.mark.parametrize("text,match", [
    ("data:0,model:4", "got part 'data:0'"),
    ("data:2,model:x", "got part 'model:x'"),
    ("data:2,model:-1", "got part 'model:-1'"),
    ("batch:2,model:4", "got part 'batch:2'"),
    ("data:2,data:2", "got part 'data:2'"),
    ("data:2;model:4", "got part 'data:2;model:4'"),
    ("", "got part ''"),
    ("data:2", "name both axes"),
    ("model:4", "name both axes"),
])
def test_bad_meshes_name_the_problem(text, match):
  with pytest.raises(ValueError, match=f"mesh={text!r}: .*{match}"):
    mh.parse_mesh(text)


def test_make_mesh_uses_every_device():
  mesh = mh.make_mesh(jax.devices()[:4], 2, 2)
  assert dict(mesh.shape) == {"data": 2, "model": 2}
  with pytest.raises(ValueError, match=r"data:2 x model:2 = 4 devices, but the accelerator has 8"):
    mh.make_mesh(jax.devices(), 2, 2)
  with pytest.raises(ValueError, match=r"data:3 x model:1 = 3 devices, .* has 4"):
    mh.make_mesh(jax.devices()[:4], 3, 1)


def test_weight_dtype():
  assert mh.weight_dtype("bf16") == jnp.bfloat16
  assert mh.weight_dtype("int4") == jnp.int4
  with pytest.raises(ValueError, match="weight_dtype must be one of .* got 'bf8'"):
    mh.weight_dtype("bf8")
  with pytest.raises(ValueError, match="weight_dtype must be one of"):
    mh.deployment(presets.get("smollm2-135m"), weights="fp16", hbm_per_device=MIB, data=1,
                  model=1)


def test_aot_needs_a_tpu_topology():
  with pytest.raises(ValueError, match="accelerator='h200-8': ahead-of-time compiles need a TPU"):
    mh.AotMeasure(presets.get("smollm2-135m"), weights="bf16",
                  slice_=accelerators.parse_slice("h200-8"), data=2, model=4)


@pytest.mark.parametrize("weights,value_bytes", [("bf16", 2), ("int8", 1), ("int4", 0.5)])
def test_llama_weights_per_device_are_the_tensor_parallel_bytes(weights, value_bytes):
  cfg = presets.get("llama-3.1-8b")
  dep = mh.deployment(cfg, weights=weights, hbm_per_device=16 * 2**30, data=2, model=4)
  d, h, v, f, n = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size, 32
  q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
  # Every matrix splits over model:4 (all of 4096, 1024, 14336, 128256 divide by 4): the
  # embedding and untied head (vocabulary), q/k/v/o and the SwiGLU MLP of each layer.
  matrices = 2 * v * d + n * (d * q + 2 * d * kv + q * d + 3 * d * f)
  # Norm weights (two per layer and the final one) stay float32 and are replicated.
  norms = n * 2 * d + d
  assert matrices + norms == cfg.num_params() == 8_030_261_248
  assert dep.weights_per_device == int(matrices * value_bytes) // 4 + norms * 4
  if weights == "bf16":
    assert dep.weights_per_device == 4_016_062_464  # tests/test_headroom.py's figure.
  assert (dep.num_layers, dep.kv_heads, dep.head_dim, dep.vocab_size) == (32, 8, 128, 128256)
  assert (dep.data, dep.model, dep.hbm_per_device) == (2, 4, 16 * 2**30)


# ------------------------------------------------------------------ AOT (libtpu)

# Small enough to compile in seconds; head_dim 128 as the Pallas kernels tile it.
AOT_CFG = ModelConfig("aot-tiny", vocab_size=4096, hidden_size=256, intermediate_size=512,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128)
# Program code and the step's small fixed temporaries (~3 MiB for this model on v5e):
# bytes the analytic model does not count, independent of batch and max_len.
AOT_SLACK = 4 * MIB


@pytest.fixture(scope="module")
def aot():
  return mh.AotMeasure(AOT_CFG, weights="bf16", slice_=accelerators.parse_slice("v5e-4"), data=2,
                       model=2)


@pytest.mark.tpu_compile
@requires_libtpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_aot_bytes_agree_with_the_analytic_ones(aot, fmt):
  # A cache large against the fixed bytes (program, small temporaries: ~3 MiB here), so
  # "temporaries < cache / 4" says the cache is updated in place, not copied.
  dep = mh.deployment(AOT_CFG, weights="bf16", hbm_per_device=16 * 2**30, data=2, model=2)
  u = aot(KVFormat.parse(fmt), 8, 32768)
  a = hr.analytic_usage(dep, fmt, 8, 32768)
  assert not u.oom
  assert u.weights == a.weights == dep.weights_per_device
  assert u.cache == a.cache
  assert u.temp < u.cache / 4, u
  assert 0 <= u.other <= AOT_SLACK, u
  assert abs((u.total - u.other) - a.total) <= 0.02 * a.total, (u, a)
  assert abs(u.total - a.total) <= 0.02 * a.total + AOT_SLACK, (u, a)


@pytest.mark.tpu_compile
@requires_libtpu
@pytest.mark.parametrize("fmt", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_paged_aot_bytes_agree_with_the_analytic_ones(aot, fmt):
  # The step over a paged cache of 2 x 257 pages of 128 positions, 8 sequences whose
  # tables cover 32K positions: the pool is donated and written in place, as slabs are.
  dep = mh.deployment(AOT_CFG, weights="bf16", hbm_per_device=16 * 2**30, data=2, model=2)
  u = aot(KVFormat.parse(fmt), 8, 32768, 128, 2 * 257)
  a = hr.analytic_paged_usage(dep, fmt, 8, 32768, 128, 2 * 257)
  assert not u.oom
  assert u.cache == a.cache
  assert u.temp < u.cache / 4, u
  assert abs(u.total - a.total) <= 0.02 * a.total + AOT_SLACK, (u, a)


@pytest.mark.tpu_compile
@requires_libtpu
def test_bf16_scale_copies_are_counted_conservatively(aot):
  # The analytic count adds padded copies of 16-bit per-token scales, which XLA makes in
  # large steps (Llama-3.1-8B on v5e-8: 92 % of what the count missed before). This
  # small step compiles without them: its temporaries are int4's, and the count is
  # conservative by exactly the copies.
  dep = mh.deployment(AOT_CFG, weights="bf16", hbm_per_device=16 * 2**30, data=2, model=2)
  copies = memory.tpu_layout_copy_bytes("int4-sbf16", num_layers=2, batch=4, kv_heads=1,
                                        max_len=32768, head_dim=128)
  assert copies == 2 * 2 * 4 * 1 * 2 * 32768 * 2  # K, V x [L, B/D, K/M, G + 1, S] bf16.
  plain, sbf16 = (hr.analytic_usage(dep, f, 8, 32768) for f in ("int4", "int4-sbf16"))
  assert sbf16.temp - plain.temp == copies
  compiled = {f: aot(KVFormat.parse(f), 8, 32768) for f in ("int4", "int4-sbf16")}
  assert compiled["int4-sbf16"].temp - compiled["int4"].temp < copies / 4, compiled


@pytest.mark.tpu_compile
@requires_libtpu
def test_aot_out_of_hbm_is_an_oom_point(aot):
  # 64M positions: 66 GiB of int8 cache per device on a 16 GiB v5e.
  u = aot(KVFormat.parse("int8"), 4, 1 << 26)
  dep = mh.deployment(AOT_CFG, weights="bf16", hbm_per_device=16 * 2**30, data=2, model=2)
  assert u.oom
  assert u.cache == hr.analytic_usage(dep, "int8", 4, 1 << 26).cache > 16 * 2**30
  assert u.temp > 16 * 2**30  # what the compiler reported needing.


@pytest.mark.parametrize("message,hbm", [
    ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
     "required for HLO temporaries (56.00G) exceeds available HBM (15.75G).", True),
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm.", True),
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem. Used 17.0M of 16.0M vmem.",
     False),
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space smem while allocating on stack.",
     False),
    ("RESOURCE_EXHAUSTED: CompileTimeVmemOom: scoped allocation of 20M exceeds 16M; HBM is "
     "fine", False),
    ("RESOURCE_EXHAUSTED: too many semaphores", False),
])
def test_only_hbm_exhaustion_is_an_oom_point(aot, monkeypatch, message, hbm):
  # A step that overflows a kernel's scoped VMEM (or SMEM) would fit HBM with other code:
  # counting it as an out-of-memory point would understate the headroom, so it raises.
  class Failing:
    def lower(self, *args):
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError(message)

  assert mh.hbm_exhausted(message) is hbm
  monkeypatch.setattr(aot.step, "jitted", lambda cache: Failing())
  fmt = KVFormat.parse("int8")
  if hbm:
    assert aot(fmt, 2, 256).oom
  else:
    with pytest.raises(RuntimeError, match="a memory other than HBM is exhausted"):
      aot(fmt, 2, 256)


@pytest.mark.tpu_compile
@requires_libtpu
def test_aot_max_context_is_on_the_boundary(aot):
  dep = mh.deployment(AOT_CFG, weights="bf16", hbm_per_device=64 * MIB, data=2, model=2,
                      reserve=0.0)
  guess = hr.max_context(dep, "int8", 8, lambda *a: hr.analytic_usage(dep, *a)).max_len
  before, timed = aot.compiles, len(aot.compile_seconds)
  a = hr.max_context(dep, "int8", 8, aot, guess=guess)
  assert 0 < a.max_len <= guess and a.next_max_len == a.max_len + 128
  assert not a.usage.oom and a.usage.total <= dep.budget
  assert a.next_usage.oom or a.next_usage.total > dep.budget
  assert aot.compiles - before <= 5
  # Every compile that succeeded is timed (one that ran out of HBM is not).
  new = aot.compile_seconds[timed:]
  assert 1 <= len(new) <= aot.compiles - before
  assert all(f == "int8" and b == 8 and s > 0 for f, b, _, s in new), new
  assert a.max_len in [m for _, _, m, _ in new]


# ------------------------------------------------------------------ live (fake CPU devices)

LIVE_CFG = ModelConfig("live-tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)


def test_live_measure_and_max_context_on_the_cpu_mesh():
  live = mh.LiveMeasure(LIVE_CFG, weights="bf16", devices=jax.devices()[:4], data=2, model=2)
  u = live(KVFormat.parse("int8"), 4, 256)
  assert live.runs == 1 and not u.oom
  probe = mh.deployment(LIVE_CFG, weights="bf16", hbm_per_device=MIB, data=2, model=2)
  a = hr.analytic_usage(probe, "int8", 4, 256)
  assert u.weights == a.weights == probe.weights_per_device
  assert u.cache == a.cache
  assert u.other == 0  # CPU: the weights each device holds are exactly the counted ones.

  # HBM of twice the step's bytes at max_len 256: room for a few more blocks.
  dep = mh.deployment(LIVE_CFG, weights="bf16", hbm_per_device=2 * u.total, data=2, model=2,
                      reserve=0.0)
  ans = hr.max_context(dep, "int8", 4, live)
  assert 256 < ans.max_len < 256 * 8
  assert ans.usage.total <= dep.budget < ans.next_usage.total
  assert ans.next_max_len == ans.max_len + 128
  assert ans.usage.cache == hr.analytic_usage(dep, "int8", 4, ans.max_len).cache
  assert live.runs <= 1 + 6


@pytest.mark.tpu_compile
@requires_libtpu
@pytest.mark.slow
def test_smollm2_step_at_head_dim_64_compiles_without_copies():
  # SmolLM2's step (head_dim 64) with 64 sequences: int4 with bf16 scales once
  # overflowed scoped VMEM in a copy of the written chunk (reported as an out-of-HBM
  # point), and at head_dim 64 every step copied the cache around the kernels (1.43 GiB
  # of temporaries for int4's 0.79 GiB cache). Its first 4 layers, not 30: every layer
  # is the same program, and a copy of even one layer's cache (a quarter of it) breaks
  # the bound below (the 30-layer step compiles 5x longer; its temporaries are 0.09 of
  # its cache, 4 layers' 0.03).
  cfg = dataclasses.replace(presets.get("smollm2-135m"), num_layers=4)
  m = mh.AotMeasure(cfg, weights="bf16", slice_=accelerators.parse_slice("v5e-1"), data=1,
                    model=1)
  u = m(KVFormat.parse("int4-sbf16"), 64, 2048)
  assert not u.oom
  assert u.temp < u.cache / 8, u

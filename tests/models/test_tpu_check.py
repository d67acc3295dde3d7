"""The TPU self-check: refused off TPU before any work; its verdicts pass a correct kernel
and fail a wrong one (run here with the kernels in interpret mode)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.models.runs import tpu_check
from kvtpu.pallas_kernels.decode_attention import BlockSizes

from kvtpu import attention, qtensor


@pytest.fixture
def small_blocks(monkeypatch):
  """128-position kernel blocks, so the edge lengths stay small on CPU."""
  monkeypatch.setattr(tpu_check, "default_block_sizes", lambda *a: BlockSizes(128))


def _config(**kw):
  fields = dict(formats=("int8", "int4-asym-g16"), head_dims=(64,), impl="interpret",
                interpret=False, kernel_bench=False, evaluate=False)
  return tpu_check.TpuCheckConfig(**(fields | kw))


def test_pallas_off_tpu_is_refused_before_any_work(tmp_path):
  workdir = tmp_path / "check"
  with pytest.raises(tpu_check.NotOnTpu, match="no TPU here .* nothing was run"):
    tpu_check.run(_config(impl="pallas"), workdir)
  assert not workdir.exists()


@pytest.mark.slow  # Interpret-mode kernels, like the kernel grids.
def test_a_correct_kernel_passes_every_edge_length(small_blocks, tmp_path):
  result = tpu_check.run(_config(formats=("int4-asym-g16",)), tmp_path / "check")
  # 1 format x 1 head dim x 3 phases (decode T=1, T=8, prefill), against the XLA reference.
  assert len(result.verdicts) == 3 and result.passed
  lengths = [json.loads(v["check"].split("lengths=")[1].split(" vs")[0]) for v in result.verdicts]
  assert lengths[0] == [0, 1, 127, 128, 129, 384 - 1]  # Edges of the block; capacity minus T.
  saved = [json.loads(line) for line in result.paths["verdicts"].read_text().splitlines()]
  assert [v["line"] for v in saved] == [v["line"] for v in result.verdicts]
  assert "3 of 3 checks passed" in result.paths["report"].read_text()


@pytest.mark.slow  # Interpret-mode kernels, like the kernel grids.
def test_a_wrong_kernel_fails_its_checks(small_blocks, tmp_path, monkeypatch, capsys):
  real = attention._pallas_attention

  def off_by_a_little(q, cache, layer, chunk, scale, **kwargs):
    out = real(q, cache, layer, chunk, scale, **kwargs)
    return out.at[-1].add(jnp.asarray(1e-3, out.dtype) * jnp.max(jnp.abs(out)))

  monkeypatch.setattr(attention, "_pallas_attention", off_by_a_little)
  result = tpu_check.run(_config(formats=("int8",)), tmp_path / "check")
  assert not result.passed and not any(v["ok"] for v in result.verdicts)
  errors = [float(v["measured"].split("= ")[1]) for v in result.verdicts]
  np.testing.assert_allclose(errors, 1e-3, rtol=0.05)
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith("FAIL  kernel int8 H=64 T=1")
  assert printed[-1].startswith("FAIL  tpu_check: 0 of 3 checks passed")


def test_bad_config_fields_are_named():
  for field, value in (("impl", "xla"), ("rtol", 0.0), ("rtol", float("nan")), ("head_dims", ()),
                       ("formats", ("int8-channel",)), ("evaluate", "yes")):
    with pytest.raises(ValueError, match=field):
      _config(**{field: value})


def test_a_format_the_kernels_do_not_lay_out_is_checked_as_refused(small_blocks, tmp_path,
                                                                   monkeypatch):
  # int2 rows of 64 lanes: the kernels refuse them at trace time, which the check verifies
  # instead of running them. A cache stores such values transposed (whole lanes), so the
  # refusal is forced here by keeping its values [S, H].
  monkeypatch.setattr(qtensor, "lanes_transposed", lambda *a: False)
  result = tpu_check.run(_config(formats=("int2-nu-sbf16-rot+sink4+recent124",),
                                 head_dims=(64,)), tmp_path / "check")
  assert [v["check"] for v in result.verdicts] == [
      "kernel int2-nu-sbf16-rot+sink4+recent124 H=64 refused"]
  assert result.verdicts[0]["ok"] and "head_dim a multiple of 128" in result.verdicts[0]["measured"]

"""The headroom binary (`python -m kvtpu.experiments.headroom`), and multi-host start-up.

The binary runs in a subprocess (absl flags are process-global).
"""

from __future__ import annotations

import json
import pathlib

import pytest
from kvtpu.experiments import common

from kvtpu import headroom_report, memory
from tests.helpers import run_binary


def _headroom(*args: str, workdir: pathlib.Path):
  return run_binary("kvtpu.experiments.headroom", *args, workdir=workdir)


def test_defaults_answer_the_issue_table(tmp_path):
  # The embedded defaults: Llama-3.1-8B, bf16 weights, v5e-8, data:2 x model:4, analytic.
  proc = _headroom(workdir=tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  for name in ("config.json", "results.jsonl", "report.md", "context_vs_concurrency.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  rows = headroom_report.read_jsonl(tmp_path / "results.jsonl")
  maxima = {(r["kv_format"], r["kind"], r["concurrency"] if r["kind"] == "max_context"
             else r["context"]): r for r in rows if not r["oom"]}
  assert len(maxima) == 4 * 7  # 4 formats x (4 concurrencies + 3 contexts).
  # Every maximum fits, its oom neighbour does not, and the bytes add up.
  for r in rows:
    assert r["total_per_device"] == (r["weights_per_device"] + r["cache_per_device"]
                                     + r["temp_per_device"] + r["other_per_device"])
    assert (r["total_per_device"] > r["budget_per_device"]) == r["oom"]
  # The cache of a maximum is the closed form for one device's block: batch/2 sequences,
  # 8/4 kv heads.
  r = maxima[("int8", "max_context", 8)]
  assert r["cache_per_device"] == memory.cache_bytes(
      "int8", num_layers=32, batch=4, kv_heads=2, max_len=r["max_len"], head_dim=128)
  # The issue's targets: token capacity over bf16.
  for c in (8, 32, 128):
    bf16 = maxima[("bf16", "max_context", c)]["tokens"]
    assert maxima[("int8", "max_context", c)]["tokens"] >= 1.9 * bf16
    assert maxima[("fp8_e4m3", "max_context", c)]["tokens"] >= 1.9 * bf16
    assert maxima[("int4", "max_context", c)]["tokens"] >= 3.6 * bf16
  report = (tmp_path / "report.md").read_text()
  assert "weight precision: bf16" in report and "KV precisions: bf16, int8, fp8_e4m3, int4" in report
  assert json.loads((tmp_path / "config.json").read_text())["mesh"] == "data:2,model:4"


@pytest.mark.parametrize("args,message", [
    (["--mesh=data:4,model:4"], "has 16 devices, but --accelerator=v5e-8 has 8"),
    (["--accelerator=v9-8"], "unknown accelerator name='v9'"),
    (["--accelerator=v5e-6"], "no v5e slice of 6 chips"),
    (["--mesh=data:2"], "name both axes"),
    (["--model=gpt-5"], "unknown model preset"),
    (["--accelerator=v5e-8", "--mesh=data:1,model:8", "--strategy=heads",
      "--model=smollm2-135m"], "strategy='heads'"),
    (["--modes=analytic,guess"], "--modes must be among"),
    (["--mode=guess"], "--modes must be among"),  # --mode is an alias.
    (["--modes=live"], "give one with --hbm_gib"),
    (["--modes=aot,live"], "run them separately"),
    (["--modes=live", "--hbm_gib=100000"], "more than half of this host's free memory"),
])
def test_bad_configurations_are_clear_errors(tmp_path, args, message):
  proc = _headroom(*args, workdir=tmp_path)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-3000:]


def test_distributed_initialize_only_on_a_multihost_slice(monkeypatch):
  calls = []
  monkeypatch.setattr("jax.distributed.initialize", lambda: calls.append(1))
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert not common.maybe_initialize_distributed("auto")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")  # One host: nothing to join.
  assert not common.maybe_initialize_distributed("auto")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker hostnames "
                     "or IP addresses, please set env var `TPU_WORKER_HOSTNAMES` manually")
  assert not common.maybe_initialize_distributed("auto")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5")
  assert common.maybe_initialize_distributed("auto")
  assert not common.maybe_initialize_distributed("no")
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  assert common.maybe_initialize_distributed("yes")
  assert calls == [1, 1]
  with pytest.raises(ValueError, match="mode must be 'auto', 'yes' or 'no'"):
    common.maybe_initialize_distributed("maybe")

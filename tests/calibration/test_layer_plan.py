"""Per-layer precision under a byte budget: the assignment against its closed form,
layer costs on synthetic layers, the artifact's round trip and its checks."""

import json
import math

import numpy as np
import pytest

from kvtpu import KVFormat, LayerPlan, memory
from kvtpu.calibration.layer_plan import ARTIFACT_FILE, LayerPlanArtifact, assign, layer_costs
from tests.helpers import kv_with_outliers

LOW = "int2-nu-sbf16-rot+sink4+recent124"
HIGH = "k=int4-nu-sbf16-rot,v=int2-nu-sbf16-rot+sink4+recent124"
DIMS = dict(context=8192, kv_heads=3, head_dim=64)


@pytest.mark.parametrize("target", [2.4, 2.5, 2.75, 2.8, 3.0, 3.5])
def test_assignment_meets_the_budget_exactly(target, rng):
  """The layers of highest cost get `high`, as many as the budget holds: the plan is
  within it, one more layer would not be, and the count is the closed form."""
  costs = rng.uniform(0.01, 1.0, 30)
  costs[[4, 9]] = costs.max() + 1.0  # A tie: the lower index first.
  num = dict(num_layers=30, **DIMS)
  low_bits = memory.plan_effective_bits(LOW, **num)
  high_bits = memory.plan_effective_bits(HIGH, **num)
  if target < low_bits:
    with pytest.raises(ValueError, match="below the .* effective bits of"):
      assign(costs, LOW, HIGH, target_bits=target, **DIMS)
    return
  plan = assign(costs, LOW, HIGH, target_bits=target, **DIMS)
  # Per value, each layer moved to `high` adds (high - low) / L bits.
  n = min(30, math.floor((target - low_bits) / (high_bits - low_bits) * 30 + 1e-9))
  chosen = sorted(np.argsort(-costs, kind="stable")[:n].tolist())
  hi_layers = [i for i, f in enumerate(plan.formats(30)) if f == KVFormat.parse(HIGH)]
  assert hi_layers == chosen
  assert memory.plan_effective_bits(plan, **num) <= target
  if n < 30:
    more = LayerPlan(KVFormat.parse(LOW), ((KVFormat.parse(HIGH),
                                             tuple(sorted(np.argsort(-costs, kind="stable")[:n + 1].tolist()))),))
    assert memory.plan_effective_bits(more, **num) > target
  if 0 < n:
    assert 4 in hi_layers and (n == 1 or 9 in hi_layers)
  assert assign(costs, LOW, HIGH, target_bits=target, **DIMS) == plan  # Deterministic.


def test_assignment_refusals(rng):
  with pytest.raises(ValueError, match="must take more bits than low"):
    assign(np.ones(4), HIGH, LOW, target_bits=8.0, **DIMS)
  with pytest.raises(ValueError, match="costs must be finite floats"):
    assign([1.0, np.nan], LOW, HIGH, target_bits=3.0, **DIMS)
  assert assign(np.ones(3), LOW, HIGH, target_bits=16.0, **DIMS) == LayerPlan(KVFormat.parse(HIGH))
  # Layers that lose nothing in `low` (cost <= 0) keep it, whatever the budget.
  assert assign([0.5, 0.0, -0.2], LOW, HIGH, target_bits=16.0, **DIMS).name == f"{LOW}|{HIGH}@0"


def _layer(rng, outliers: bool):
  q = rng.standard_normal((2, 48, 4, 64)).astype(np.float32)
  k = (kv_with_outliers(rng, (2, 48, 2, 64)) if outliers
       else rng.standard_normal((2, 48, 2, 64)).astype(np.float32))
  v = rng.standard_normal((2, 48, 2, 64)).astype(np.float32)
  return {"q": q, "k": k, "v": v}


def test_layer_costs_rank_the_sensitive_layer_first(rng):
  plain, outlying = _layer(rng, False), _layer(rng, True)
  costs = layer_costs([plain, outlying, dict(plain)], "int4", "int8", chunk=16)
  assert costs.shape == (3,) and costs[0] == costs[2]  # The same data, the same cost.
  assert costs[1] > costs[0] > 0
  assert layer_costs([plain], "int8", "int8", chunk=16)[0] == 0.0
  with pytest.raises(ValueError, match="compare dynamic or unquantized formats"):
    layer_costs([plain], "int8-head", "int8")
  with pytest.raises(ValueError, match=r"samples\[0\] must hold q"):
    layer_costs([{"q": plain["q"][0], "k": plain["k"], "v": plain["v"]}], "int4", "int8")


def _artifact(costs) -> LayerPlanArtifact:
  plan = assign(costs, LOW, HIGH, target_bits=2.75, **DIMS)
  return LayerPlanArtifact(
      plan=plan, low=LOW, high=HIGH, target_bits=2.75, context=8192, costs=costs,
      model={"name": "m", "weight_precision": "w", "num_layers": len(costs), "kv_heads": 3,
             "head_dim": 64},
      workloads=[{"name": "prose", "num_tokens": 100, "tokens_used": 64, "token_sha256": "ab"}],
      method={"name": "attention_output_error", "chunk": 128})


def test_artifact_round_trip_and_checks(tmp_path, rng):
  costs = rng.standard_normal(30)
  art = _artifact(costs)
  assert art.effective_bits <= 2.75
  path = art.save(tmp_path)
  assert path.name == ARTIFACT_FILE
  back = LayerPlanArtifact.load(tmp_path)
  assert back.plan == art.plan and back.reassign() == art.plan
  np.testing.assert_array_equal(back.costs, costs)
  assert back.to_dict() == art.to_dict()
  data = json.loads(path.read_text())
  data["target_bits"] = 3.0  # Edited: the hash no longer matches.
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="does not match its sha256"):
    LayerPlanArtifact.load(tmp_path)
  with pytest.raises(ValueError, match="the costs give plan"):
    LayerPlanArtifact(**{**{f: getattr(art, f) for f in ("low", "high", "target_bits", "context",
                                                          "model", "workloads", "method")},
                         "plan": art.plan, "costs": -costs})
  with pytest.raises(FileNotFoundError):
    LayerPlanArtifact.load(tmp_path / "elsewhere")
  with pytest.raises(ValueError, match="workloads is empty"):
    LayerPlanArtifact(**{**{f: getattr(art, f) for f in ("plan", "low", "high", "target_bits",
                                                          "context", "costs", "model", "method")},
                         "workloads": []})

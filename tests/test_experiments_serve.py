"""The serve run in process (a tiny random model and a fake tokenizer), its flag errors
(each raised before anything is served), and the binary end to end once (subprocess, on a
tiny checkpoint)."""

import dataclasses
import json

import jax
import pytest
from absl import app
from flax import nnx
from kvtpu.experiments import serve as serve_binary
from kvtpu.experiments.common import parse_flags
from kvtpu.models.llama import Llama
from kvtpu.models.runs import serve as serve_run
from kvtpu.models.runs.common import ConfigError
from kvtpu.models.runs.serve import ServeConfig

from kvtpu import memory
from kvtpu.eval import traffic
from tests.helpers import TINY, run_binary
from tests.run_support import FakeTokenizer, fake_pretrained, forbid, save_tiny_checkpoint

# TINY: 2 layers, 2 kv heads of 16: 256 bytes per bf16 token. A budget of 12 pages of 8
# bf16 positions beyond its weights, fewer than 8 requests need at once.
WEIGHTS = sum(x.nbytes for x in jax.tree.leaves(nnx.state(Llama(TINY, rngs=nnx.Rngs(0)),
                                                          nnx.Param)))
SMALL = dict(kv_formats=("bf16", "int8"), prompts="filler", rate=1000.0, num_requests=10,
             prompt_len="uniform:low=4,high=24", output_len="fixed:6", filler="random",
             slots=8, page_len=8, chunk=8, max_len=32, impl="xla",
             hbm_gib=(WEIGHTS + 12 * 8 * 256 + 4096) / 2**30)


def test_run_serves_every_format_and_writes_the_workdir(monkeypatch, tmp_path):
  monkeypatch.setattr(serve_run, "load_pretrained", fake_pretrained())
  printed = []
  rows = serve_run.run(ServeConfig(**SMALL), tmp_path, out=printed.append)
  bf16, int8 = rows
  assert [r["kv_format"] for r in rows] == ["bf16", "int8"]
  assert bf16["weight_bytes"] == WEIGHTS
  for r in rows:  # Each pool is the largest its format fits in the same budget.
    size = lambda n, r=r: memory.cache_bytes(  # noqa: E731
        r["kv_format"], num_layers=TINY.num_layers, batch=8, kv_heads=TINY.num_kv_heads,
        max_len=32, head_dim=TINY.head_dim, page_len=8, num_pages=n)
    assert r["cache_bytes"] == size(r["num_pages"]) <= r["cache_budget_bytes"]
    assert size(r["num_pages"] + 1) > r["cache_budget_bytes"]
  # At head_dim 16, int8 with a float32 scale per token and head: 20 bytes per 16 values.
  assert int8["num_pages"] > 1.55 * bf16["num_pages"]
  assert bf16["share_identical"] == 1.0 and bf16["concurrency_vs_reference"] == 1.0
  assert bf16["preemptions"] > 0  # The budget binds bf16.
  assert int8["mean_concurrency_saturated"] > bf16["mean_concurrency_saturated"]
  assert int8["concurrency_vs_reference"] == pytest.approx(
      int8["mean_concurrency_saturated"] / bf16["mean_concurrency_saturated"])
  assert all(r["requests"] == 10 and r["compiled_shapes"] == 2 for r in rows)
  assert printed[0].startswith("serve bf16: ") and (
      "identical to bf16's: 10/10 in lockstep, 10/10 as served; to the f32 cache's: " in printed[0])
  assert bf16["identical"] == bf16["served_identical"] == 10 and bf16["exact_reference"] == "f32"
  assert printed[-1] == (
      f"serve: requests in flight while requests waited, vs bf16: int8 "
      f"{int8['concurrency_vs_reference']:.2f}x; outputs identical to bf16's in lockstep: int8 "
      f"{100 * int8['share_identical']:.0f}%; report: {tmp_path / 'report.md'}")
  saved = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert saved == json.loads(json.dumps(rows))
  per_request = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
  assert len(per_request) == 20
  # The shares follow from the per-request outputs: lockstep and served, each against bf16's.
  for key, field in (("lockstep_tokens", "identical"), ("tokens", "served_identical")):
    ref = {r["id"]: r[key] for r in per_request if r["kv_format"] == "bf16"}
    same = sum(r[key] == ref[r["id"]] for r in per_request if r["kv_format"] == "int8")
    assert same == int8[field]
  report = (tmp_path / "report.md").read_text()
  assert "| bf16 |" in report and "| int8 |" in report and "inflight.png" in report
  assert "## Outputs" in report and "identical to f32" in report
  assert (tmp_path / "inflight.png").stat().st_size > 1000
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["trace"]["sha256"] == bf16["trace_sha256"] and config["kv_formats"] == ["bf16",
                                                                                         "int8"]


def test_chat_prompts_are_the_questions_in_the_template(monkeypatch):
  long = dataclasses.replace(TINY, max_position=256)
  monkeypatch.setattr(serve_run, "load_pretrained", fake_pretrained(long))
  config = ServeConfig(**{**SMALL, "prompts": "chat", "num_requests": 6, "output_len": "fixed:8",
                          "max_len": 128, "hbm_gib": 0.01})
  tok = FakeTokenizer()
  trace = serve_run.load_trace(config, tok)
  assert trace.name.startswith("chat:") and len(trace.requests) == 6
  assert trace.sha256 == traffic.chat(tok, rate=SMALL["rate"], num_requests=6,
                                      output_len="fixed:8", max_context=128, seed=0).sha256
  rows = serve_run.run(config, out=lambda _: None)
  assert [r["trace"] for r in rows] == [trace.name] * 2
  assert all(r["requests"] == 6 for r in rows) and rows[0]["share_identical"] == 1.0
  with pytest.raises(ConfigError, match="num_requests: expected at most the 40 chat questions"):
    ServeConfig(**{**SMALL, "prompts": "chat", "num_requests": 41})
  with pytest.raises(ConfigError, match="max_len: the longest chat prompt"):
    serve_run.load_trace(dataclasses.replace(config, max_len=64), tok)


def test_run_on_a_mesh_sizes_each_device(monkeypatch):
  monkeypatch.setattr(serve_run, "load_pretrained", fake_pretrained())
  single = serve_run.run(ServeConfig(**{**SMALL, "kv_formats": ("int8",)}), out=lambda _: None)
  sharded = serve_run.run(ServeConfig(**{**SMALL, "kv_formats": ("int8",),
                                         "mesh": "data:2,model:2"}), out=lambda _: None)
  one, two = single[0], sharded[0]
  assert one["strategy"] is None and two["strategy"] == "heads" and two["mesh"] == "data:2,model:2"
  # Per device: half the slots and half the kv heads; the weights split over model too.
  assert two["weight_bytes"] < one["weight_bytes"]
  assert two["cache_bytes_per_device"] <= two["cache_budget_bytes"]
  assert two["num_pages"] > 2 * one["num_pages"] and two["num_pages"] % 2 == 0
  assert two["requests"] == 10 and two["compiled_shapes"] == 2


@pytest.mark.parametrize("args,message", [
    (["--kv_formats=int8-channel"], "--kv_formats: int8-channel has static scales"),
    (["--prompt_len=normal:mean=3"], "--prompt_len: distribution spec 'normal:mean=3'"),
    (["--rate=0"], "--rate: expected a finite number > 0"),
    (["--max_len=100", "--page_len=32"], "--max_len: expected a multiple of page_len=32"),
    (["--trace=/no/such.jsonl"], "--trace: /no/such.jsonl is not a file"),
    (["--chunk=64", "--max_len=32", "--page_len=8"], "--chunk: expected at most max_len=32"),
    (["--mesh=data:2"], "--mesh: mesh='data:2': name both axes"),
    (["--strategy=rows"], "--strategy: expected one of"),
    (["--mesh=data:2,model:1", "--slots=3"], "--slots: expected a multiple of the mesh's data"),
])
def test_flag_errors_name_the_flag(args, message):
  with pytest.raises(app.UsageError) as e:
    serve_binary.config_from_flags(parse_flags(serve_binary.define_flags, args))
  assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("overrides,message", [
    (dict(hbm_gib=WEIGHTS / 2**30), "--hbm_gib: 0.000"),
    (dict(hbm_gib=(WEIGHTS + 3000) / 2**30), "--hbm_gib: kv_format=bf16: 8 slots and two pages"),
    (dict(prompt_len="fixed:30"), "--prompt_len: prompt_len=fixed:value=30 and output_len="),
    (dict(mesh="data:4,model:4"), "--mesh: data:4,model:4 needs 16 devices, 8 are present"),
    (dict(mesh="data:1,model:4", strategy="heads"), "--strategy: "),
    (dict(mesh="data:1,model:8", strategy="sequence"), "--max_len: strategy=sequence splits "
     "each request's 4 pages over 8 model devices"),
])
def test_what_cannot_be_served_fails_before_serving(monkeypatch, tmp_path, overrides, message):
  monkeypatch.setattr(serve_run, "load_pretrained", fake_pretrained())
  forbid(monkeypatch, serve_run.serving.Engine, "run")
  fv = parse_flags(serve_binary.define_flags, [f"--{k}={v}" for k, v in {
      **SMALL, "kv_formats": "bf16,int8", **overrides}.items()])
  with pytest.raises(app.UsageError) as e:
    serve_binary.main(["serve"], dataclasses_free(fv, tmp_path))
  assert str(e.value).startswith(message), str(e.value)


def dataclasses_free(fv, tmp_path):
  fv["workdir"].value = str(tmp_path / "out")
  return fv


@pytest.mark.slow
def test_serve_binary_end_to_end(tmp_path):
  checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
  out = tmp_path / "out"
  proc = run_binary("kvtpu.experiments.serve", f"--model={checkpoint}", "--kv_formats=bf16,int8",
                    "--prompts=filler", "--num_requests=6", "--prompt_len=uniform:low=4,high=20",
                    "--output_len=fixed:4", "--filler=random", "--slots=4", "--page_len=8",
                    "--chunk=8", "--max_len=32", "--impl=xla", "--hbm_gib=0.2", workdir=out,
                    timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "serve int8: " in proc.stdout
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert [r["kv_format"] for r in rows] == ["bf16", "int8"] and rows[1]["requests"] == 6
  assert (out / "report.md").is_file() and (out / "inflight.png").is_file()


def test_a_jsonl_trace_is_served_as_written(monkeypatch, tmp_path):
  monkeypatch.setattr(serve_run, "load_pretrained", fake_pretrained())
  lines = [{"id": "chat", "arrival_s": 0.0, "messages": [{"role": "user", "content": "Hi"}],
            "max_new_tokens": 3},
           {"id": "ids", "arrival_s": 0.01, "prompt_ids": [11, 12, 13], "output_len": 4},
           {"id": "filled", "arrival_s": 0.02, "prompt_len": 9, "output_len": 2}]
  trace = tmp_path / "trace.jsonl"
  trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
  rows = serve_run.run(ServeConfig(**{**SMALL, "trace": str(trace)}), tmp_path / "out",
                       out=lambda _: None)
  per_request = [json.loads(x) for x in (tmp_path / "out" / "requests.jsonl").read_text()
                 .splitlines()]
  assert [r["id"] for r in per_request] == ["chat", "ids", "filled"] * 2
  assert [r["prompt_tokens"] for r in per_request[:3]] == [len(FakeTokenizer().encode_chat(
      lines[0]["messages"])), 3, 9]
  # Exact lengths are served exactly; a budget may end at a stop id.
  assert [len(r["tokens"]) for r in per_request[1:3]] == [4, 2]
  assert 1 <= len(per_request[0]["tokens"]) <= 3
  assert rows[0]["trace"] == f"jsonl:{trace.resolve()}" and rows[0]["requests"] == 3


def test_the_default_precisions_can_meet_the_concurrency_targets():
  # At SmolLM2's head_dim 64, bytes per token (scales included) bound what a large pool
  # holds: the defaults' 8- and 4-bit caches must hold at least 1.9x and 3.4x bf16's.
  config = ServeConfig()
  assert config.kv_formats == ("bf16", serve_run.SERVING_INT8, serve_run.SERVING_FOUR_BIT)
  per_token = {f: memory.bytes_per_token(f, kv_heads=3, head_dim=64) for f in config.kv_formats}
  assert per_token["bf16"] / per_token[serve_run.SERVING_INT8] == pytest.approx(128 / 66)
  assert per_token["bf16"] / per_token[serve_run.SERVING_FOUR_BIT] == pytest.approx(128 / 34)
  assert config.prompts == "chat" and config.output_len == "fixed:64"
  assert config.slots >= config.num_requests  # Capacity is the pool's, never the slots'.

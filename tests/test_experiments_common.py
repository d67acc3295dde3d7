"""What every binary and run shares: progress with an ETA, the workdir rule, resuming a row
log cut short, usage errors printed first (in process, and once through a subprocess)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from absl import app
from kvtpu.experiments import common as binary_common
from kvtpu.experiments import headroom as headroom_binary
from kvtpu.models.runs import common
from kvtpu.models.runs.common import ConfigError

from kvtpu import reports
from tests.helpers import run_binary


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_logs_done_of_total_elapsed_and_eta():
  clock, lines = _Clock(), []
  progress = common.Progress("calibration prose", 2048, "tokens", clock=clock,
                             log=lambda fmt, line: lines.append(fmt % line))
  clock.now += 41
  # Half done in 41 s: the other half takes as long.
  assert progress.update(1024, "25 tokens/s") == (
      "calibration prose: 1,024/2,048 tokens, 41 s, ETA 41 s; 25 tokens/s")
  clock.now += 20
  assert progress.add(512) == "calibration prose: 1,536/2,048 tokens, 61 s, ETA 20 s"
  assert lines == ["calibration prose: 1,024/2,048 tokens, 41 s, ETA 41 s; 25 tokens/s",
                   "calibration prose: 1,536/2,048 tokens, 61 s, ETA 20 s"]
  assert common.Progress("x", 3, "items", clock=clock, log=lambda *a: None).update(0) == (
      "x: 0/3 items, 0 s, ETA unknown")
  # Updates within an item log at most once per `every` seconds; the others always.
  lines.clear()
  progress.update(1600, "chunk 1/4", throttle=True)
  clock.now += 30
  progress.update(1700, "chunk 2/4", throttle=True)
  progress.update(1800, "chunk 3/4", throttle=True)
  progress.add(248)
  assert [line.split("; ")[-1] for line in lines] == [
      "chunk 2/4", "calibration prose: 2,048/2,048 tokens, 91 s, ETA 0 s"]


def test_calibration_progress_counts_tokens_per_workload(monkeypatch):
  lines = []
  monkeypatch.setattr(common.logging, "info", lambda fmt, line: lines.append(fmt % line))
  progress = common.calibration_progress("calibration", {"prose": 4096, "code": 2048})
  progress("prose", 1024, 10.0)  # calibrate's callback: tokens so far, seconds so far
  progress("prose", 4096, 40.0)
  progress("code", 2048, 5.0)
  assert lines == ["calibration prose: 1,024/4,096 tokens, 10 s, ETA 30 s; 102 tokens/s",
                   "calibration prose: 4,096/4,096 tokens, 40 s, ETA 0 s; 102 tokens/s",
                   "calibration code: 2,048/2,048 tokens, 5 s, ETA 0 s; 410 tokens/s"]


@dataclasses.dataclass(frozen=True)
class _Config:
  model: str = "m"
  chunk: int = 8
  preset: str = "quick"


def test_workdir_rule(tmp_path):
  config = _Config()
  fresh = tmp_path / "new"
  assert common.check_workdir(fresh, config) == fresh and not fresh.exists()  # writes nothing
  common.start(fresh, config)
  (fresh / "results.jsonl").write_text("")
  # An earlier run's outputs are refused at once, naming what may reuse them.
  with pytest.raises(ConfigError, match=r"^workdir: .* already holds an earlier run's outputs "
                     r"\(config.json, results.jsonl\): give a new workdir, or --overwrite"):
    common.check_workdir(fresh, config)
  with pytest.raises(ConfigError, match="or --resume to continue it or --overwrite"):
    common.check_workdir(fresh, config, resumable=True)
  assert common.check_workdir(fresh, config, overwrite=True) == fresh
  with pytest.raises(ConfigError, match="^resume: give resume .* or overwrite .*, not both"):
    common.check_workdir(fresh, config, resume=True, overwrite=True)
  # Resuming needs the same config (but the fields that change no result) ...
  assert common.check_workdir(fresh, config, resume=True) == fresh
  assert common.check_workdir(fresh, _Config(preset="full"), resume=True,
                              not_compared=("preset",)) == fresh
  with pytest.raises(ConfigError, match=r"^chunk: .*config.json records chunk=8 and this run has "
                     "16: resume with the same value, or start a new workdir") as e:
    common.check_workdir(fresh, _Config(chunk=16), resume=True)
  assert e.value.field == "chunk"
  # ... and the same software: rows of two jax versions are not mixed.
  saved = json.loads((fresh / "config.json").read_text())
  reports.write_json(fresh / "config.json", {**saved, "jax_version": "0.0.1"})
  with pytest.raises(ConfigError, match="^resume: .* records jax_version='0.0.1'"):
    common.check_workdir(fresh, config, resume=True)
  (fresh / "config.json").unlink()
  with pytest.raises(ConfigError, match="^resume: .* holds no config.json"):
    common.check_workdir(fresh, config, resume=True)
  # Resuming into an empty or missing workdir starts afresh; a file is no workdir.
  assert common.check_workdir(tmp_path / "other", config, resume=True)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match="^workdir: .*file is a file, not a folder"):
    common.check_workdir(tmp_path / "file", config, overwrite=True)


def test_resumed_row_log_drops_the_item_a_cut_write_left_incomplete(tmp_path):
  path = tmp_path / "results.jsonl"
  log = reports.RowLog(path)
  log.extend([{"item": 1, "n": 0}, {"item": 1, "n": 1}])
  log.extend([{"item": 2, "n": 0}, {"item": 2, "n": 1}])
  whole = path.read_text()
  # An interrupted write: item 2's first row whole, its second cut short.
  path.write_text(whole[:-5])
  resumed = reports.RowLog(path, resume=True)
  assert resumed.truncated and resumed.rows == [
      {"item": 1, "n": 0}, {"item": 1, "n": 1}, {"item": 2, "n": 0}]
  assert common.done_items(resumed, lambda row: row["item"]) == {1}
  assert reports.read_jsonl(path) == resumed.rows == [{"item": 1, "n": 0}, {"item": 1, "n": 1}]
  resumed.append({"item": 2, "n": 0})
  assert reports.read_jsonl(path)[-1] == {"item": 2, "n": 0}
  # Without resume the log starts afresh; a bad row in the middle is an error naming its line.
  path.write_text('{"item": 1}\n{oops\n{"item": 3}\n')
  with pytest.raises(ValueError, match=r"results\.jsonl:2: "):
    reports.RowLog(path, resume=True)
  assert reports.RowLog(path).rows == [] and path.read_text() == ""


def test_usage_errors_print_the_error_first(capsys):
  fv = binary_common.parse_flags(headroom_binary.define_flags, [])
  with pytest.raises(SystemExit) as e:
    binary_common.parse_or_exit(fv, ["headroom", "--block=abc"])
  assert e.value.code == 1
  lines = capsys.readouterr().err.splitlines()
  assert lines == ["error: flag --block=abc: invalid literal for int() with base 10: 'abc'",
                   "Run with --help to see the flags."]

  def main(argv, fv):
    raise ConfigError("mesh", "bad")

  with pytest.raises(SystemExit):
    binary_common.call_or_exit(main, ["headroom"], fv)
  assert capsys.readouterr().err.splitlines()[0] == "error: --mesh: bad"

  def stray(argv, fv):
    binary_common.check_argv(argv)

  with pytest.raises(SystemExit):
    binary_common.call_or_exit(stray, ["headroom", "x"], fv)
  assert capsys.readouterr().err.startswith("error: unexpected positional arguments: ['x']\n")
  with pytest.raises(app.UsageError):  # A library caller gets the exception.
    headroom_binary.main(["headroom", "x"], fv)


@pytest.mark.slow
def test_binary_usage_error_is_its_first_line(tmp_path):
  # The binary end to end: the one-line error first, not the module docstring.
  proc = run_binary("kvtpu.experiments.headroom", "--mesh=data:2", workdir=tmp_path / "out",
                    timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = proc.stderr.splitlines()
  assert lines[:2] == ["error: --mesh: mesh='data:2': name both axes, e.g. 'data:2,model:4'",
                       "Run with --help to see the flags."], proc.stderr[-2000:]
  assert "Memory headroom" not in proc.stderr and not (tmp_path / "out").exists()

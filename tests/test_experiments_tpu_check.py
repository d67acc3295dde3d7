"""The tpu_check binary off TPU: says so and exits 2 before any work; its flag errors name
the flag."""

import pytest
from absl import app
from kvtpu.experiments import tpu_check as tpu_check_binary
from kvtpu.experiments.common import parse_flags
from kvtpu.models.runs import tpu_check

from tests.run_support import forbid


def test_off_tpu_it_says_so_and_exits_2_before_any_work(monkeypatch, tmp_path, capsys):
  forbid(monkeypatch, tpu_check, "kernel_checks")
  fv = parse_flags(tpu_check_binary.define_flags, [f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(SystemExit) as e:
    tpu_check_binary.main(["tpu_check"], fv)
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith(
      "tpu_check: no TPU here (JAX's default backend is cpu): the compiled kernels can only be "
      "checked on a TPU VM; nothing was run")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--formats=int8-channel"], "--formats: int8-channel has static scales"),
    (["--head_dims=0"], "--head_dims: expected integers >= 1, got [0]"),
    (["--impl=xla"], "--impl: expected one of"),
    (["--rtol=2"], "--rtol: expected a number in (0, 1), got 2.0"),
])
def test_flag_errors_name_the_flag(args, message):
  with pytest.raises(app.UsageError) as e:
    tpu_check_binary.config_from_flags(parse_flags(tpu_check_binary.define_flags, args))
  assert str(e.value).startswith(message), str(e.value)

"""The README's Python examples run as written and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _expected(block: str) -> list[str | None]:
  """Per top-level `print(...)` line, the text its `# comment` promises (up to a colon)."""
  out = []
  for line in block.splitlines():
    if line.startswith("print("):
      m = re.search(r"\)\s*#\s*(.+)$", line)
      out.append(m.group(1).split(":")[0].strip() if m else None)
  return out


def test_readme_has_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})  # noqa: S102
  printed = out.getvalue().splitlines()
  expected = _expected(BLOCKS[index])
  assert len(printed) == len(expected), (printed, expected)
  for got, want in zip(printed, expected, strict=True):
    assert want is None or got.startswith(want), f"printed {got!r}, README says {want!r}"

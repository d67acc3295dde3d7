"""Orbax helpers shared by the calibration artifact and `kvtpu.models.loaders`."""

from __future__ import annotations

import contextlib
import logging

__all__ = ["quiet_orbax"]


class _DropOrbaxInfo(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


@contextlib.contextmanager
def quiet_orbax():
  """Orbax logs a dozen INFO lines per save or restore through absl; keep its warnings."""
  quiet = _DropOrbaxInfo()
  logger = logging.getLogger("absl")
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)

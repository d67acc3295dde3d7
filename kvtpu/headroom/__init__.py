"""Memory headroom: the longest context and the most concurrent sequences that fit in HBM.

  solver   `Deployment`, `Usage`, the analytic measure and the searches (`max_context`,
           `max_concurrency`, `sweep`) with their result rows (`answer_rows`)
  report   the row schema, its check, and the markdown/PNG report of a sweep
  paged    paged caches: how many requests of a length distribution fit (`max_requests`)

The solver's public names are re-exported here (`kvtpu.headroom.sweep`, ...). Chip facts
come from `kvtpu.accelerators`; the measures of a real model's decode step (aot, live)
from `kvtpu.models.headroom`.
"""

from kvtpu.headroom import paged, report, solver
from kvtpu.headroom.paged import LengthDistribution, analytic_paged_usage, max_requests
from kvtpu.headroom.solver import (
    DEFAULT_RESERVE,
    MAX_BATCH_LIMIT,
    MAX_CONTEXT_LIMIT,
    Answer,
    Deployment,
    Measure,
    Usage,
    analytic_usage,
    answer_rows,
    max_concurrency,
    max_context,
    max_fit,
    padded_batch,
    sweep,
)

__all__ = ["DEFAULT_RESERVE", "MAX_BATCH_LIMIT", "MAX_CONTEXT_LIMIT", "Answer", "Deployment",
           "Measure", "Usage", "analytic_usage", "answer_rows", "max_concurrency", "max_context",
           "max_fit", "padded_batch", "report", "solver", "sweep", "paged", "LengthDistribution",
           "analytic_paged_usage", "max_requests"]

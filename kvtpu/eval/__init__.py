"""Evaluation: named, reproducible workloads (token streams with content hashes).

  workloads.load("prose", tokenizer)      a built-in or user workload by name
  Workload.windows(seq_len, batch=...)    int32 [B, T] batches of its token stream
  Workload.disclosure()                   name, token count and hashes, for reports
"""

from kvtpu.eval import workloads
from kvtpu.eval.workloads import WORKLOADS, Workload

__all__ = ["WORKLOADS", "Workload", "workloads"]

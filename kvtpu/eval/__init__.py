"""Evaluation: workloads, teacher-forced scoring through the cache, metrics, reports.

  workloads.load("prose", tokenizer)      a built-in or user workload by name
  Workload.windows(seq_len, batch=...)    int32 [B, T] batches of its token stream
  Workload.disclosure()                   name, token count and hashes, for reports
  protocol.score(forward, params, ...)    every cache under test against a reference
                                          cache, chunk by chunk through update/attend
  metrics                                 perplexity, KL, top-1 agreement per token
  report.write_report(rows, workdir)      schema-checked results.jsonl, report.md, PNGs
  traffic.load_jsonl(path, tok, ...)      serving requests with arrival times (a trace file,
  traffic.poisson(rate=..., ...)          or Poisson arrivals with named length distributions)
"""

from kvtpu.eval import metrics, protocol, report, traffic, workloads
from kvtpu.eval.protocol import Protocol
from kvtpu.eval.workloads import WORKLOADS, Workload

__all__ = ["WORKLOADS", "Workload", "workloads", "metrics", "protocol", "report", "traffic", "Protocol"]

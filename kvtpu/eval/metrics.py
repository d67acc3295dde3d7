"""Accuracy metrics of a quantized cache against the reference cache, same weights and tokens.

Per scored token (under jit, `token_metrics`): the negative log-likelihood of the
actual next token under the reference and the quantized run, the KL divergence
`KL(p_ref || p)` of the two next-token distributions (natural log), and whether
their argmax agrees. `summarize` reduces them over every scored token of a run:

  ppl             exp(mean NLL) of the quantized run; ppl_ref likewise of the reference
  ppl_rel_change  ppl / ppl_ref - 1
  kl_mean, kl_p99 mean and 99th percentile of the per-token KL
  top1_agreement  fraction of tokens whose argmax agrees
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["token_metrics", "summarize", "perplexity", "kl_divergence"]


def _kl(lp_ref: jax.Array, lp: jax.Array) -> jax.Array:
  # Clamped at 0: the exact value is >= 0, rounding can make it -1e-9.
  return jnp.maximum(jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), axis=-1), 0.0)


def kl_divergence(logits_ref: jax.Array, logits: jax.Array) -> jax.Array:
  """`KL(softmax(logits_ref) || softmax(logits))` over the last axis, in nats, float32."""
  return _kl(jax.nn.log_softmax(logits_ref.astype(jnp.float32), axis=-1),
             jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def token_metrics(logits_ref: jax.Array, logits: jax.Array, targets: jax.Array
                  ) -> dict[str, jax.Array]:
  """Per-token metrics of `logits: [..., V]` against `logits_ref`, for next tokens `targets: [...]`.

  Returns float32 `nll_ref`, `nll`, `kl` and bool `agree`, each shaped like `targets`.
  """
  lp_ref = jax.nn.log_softmax(logits_ref.astype(jnp.float32), axis=-1)
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  pick = lambda a: -jnp.take_along_axis(a, targets[..., None], axis=-1)[..., 0]  # noqa: E731
  return {"nll_ref": pick(lp_ref), "nll": pick(lp), "kl": _kl(lp_ref, lp),
          "agree": jnp.argmax(lp_ref, axis=-1) == jnp.argmax(lp, axis=-1)}


def perplexity(nll) -> float:
  """`exp(mean(nll))` over all given tokens (float64)."""
  nll = np.asarray(nll, np.float64).ravel()
  if nll.size == 0:
    raise ValueError("perplexity of no tokens is undefined: nll is empty")
  return float(np.exp(nll.mean()))


def summarize(per_token: dict[str, np.ndarray]) -> dict[str, float]:
  """Reduces the scored tokens' `token_metrics` (already masked: 1-D arrays).

  Raises:
    ValueError: for no scored tokens, or a non-finite NLL or KL (a broken run
      must not pass as a number).
  """
  arrays = {k: np.asarray(v).ravel() for k, v in per_token.items()}
  n = arrays["nll"].size
  if n == 0:
    raise ValueError("no scored tokens: every sequence is shorter than 2 tokens")
  for name in ("nll_ref", "nll", "kl"):
    bad = ~np.isfinite(arrays[name])
    if bad.any():
      raise ValueError(f"{int(bad.sum())} of {n} per-token {name} values are NaN/inf")
  ppl, ppl_ref = perplexity(arrays["nll"]), perplexity(arrays["nll_ref"])
  kl = arrays["kl"].astype(np.float64)
  return {"ppl": ppl, "ppl_ref": ppl_ref, "ppl_rel_change": ppl / ppl_ref - 1.0,
          "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
          "top1_agreement": float(np.mean(arrays["agree"])), "scored_tokens": int(n)}

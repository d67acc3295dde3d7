"""Metrics against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvtpu.eval import metrics


def test_kl_of_known_distributions():
  p = np.array([0.5, 0.25, 0.25])
  q = np.array([0.25, 0.5, 0.25])
  # KL(p || q) = 0.5 ln 2 + 0.25 ln(1/2) = 0.25 ln 2.
  got = metrics.kl_divergence(jnp.log(jnp.asarray(p)) + 3.0, jnp.log(jnp.asarray(q)) - 1.0)
  assert float(got) == pytest.approx(0.25 * np.log(2), rel=1e-6)
  assert float(metrics.kl_divergence(jnp.zeros(5), jnp.zeros(5))) == 0.0
  # Two Bernoulli-like logits: KL(Bern(a) || Bern(b)) in closed form.
  a, b = 0.9, 0.6
  want = a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
  got = metrics.kl_divergence(jnp.log(jnp.array([a, 1 - a])), jnp.log(jnp.array([b, 1 - b])))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_token_metrics_and_perplexity_of_a_known_sequence():
  v = 8
  # Reference: uniform over 8 tokens; quantized: token 3 twice as likely as the others.
  ref = jnp.zeros((2, 3, v))
  q_logits = jnp.zeros((2, 3, v)).at[..., 3].set(np.log(2.0))
  targets = jnp.array([[3, 0, 1], [3, 3, 7]])
  m = metrics.token_metrics(ref, q_logits, targets)
  np.testing.assert_allclose(m["nll_ref"], np.full((2, 3), np.log(8)), rtol=1e-6)
  want = np.where(np.asarray(targets) == 3, -np.log(2 / 9), -np.log(1 / 9))
  np.testing.assert_allclose(m["nll"], want, rtol=1e-6)
  # KL(uniform || q) = sum 1/8 ln((1/8) / q_i) = ln(9/8) - (1/8) ln 2.
  np.testing.assert_allclose(m["kl"], np.full((2, 3), np.log(9 / 8) - np.log(2) / 8), rtol=1e-5)
  # Uniform reference: argmax is token 0; the quantized argmax is 3.
  assert not np.asarray(m["agree"]).any()
  s = metrics.summarize({k: np.asarray(x) for k, x in m.items()})
  assert s["ppl_ref"] == pytest.approx(8.0, rel=1e-6)  # uniform over 8: perplexity 8.
  assert s["ppl"] == pytest.approx(np.exp(want.mean()), rel=1e-6)
  assert s["ppl_rel_change"] == pytest.approx(np.exp(want.mean()) / 8 - 1, rel=1e-5)
  assert s["top1_agreement"] == 0.0 and s["scored_tokens"] == 6
  assert metrics.perplexity([np.log(4.0)] * 3) == pytest.approx(4.0)
  kl = np.concatenate([np.zeros(99), [1.0]])
  s = metrics.summarize({"nll_ref": np.ones(100), "nll": np.ones(100), "kl": kl,
                         "agree": np.ones(100, bool)})
  assert s["kl_mean"] == pytest.approx(0.01) and s["kl_p99"] == pytest.approx(0.01, abs=1e-12)
  assert s["top1_agreement"] == 1.0 and s["ppl_rel_change"] == 0.0


def test_summaries_refuse_broken_runs():
  with pytest.raises(ValueError, match="no scored tokens"):
    metrics.summarize({"nll_ref": [], "nll": [], "kl": [], "agree": []})
  with pytest.raises(ValueError, match="1 of 2 per-token nll values are NaN/inf"):
    metrics.summarize({"nll_ref": [1.0, 1.0], "nll": [1.0, np.nan], "kl": [0, 0],
                       "agree": [True, True]})
  with pytest.raises(ValueError, match="nll is empty"):
    metrics.perplexity([])

"""How many votes any valid sequential test needs: the information bound adaptive sampling is measured against.

Why: adaptive runs are judged by how many forward passes they save against fixed n. Whether a shortfall is
the stopping rule's fault or the images' needs a floor that no valid procedure can go below, however it
stops, which bound it uses or how it rounds. This module gives it for the one-sided question every
certificate asks: "is ĉ's vote rate p above m?" (a radius R at sigma needs p > Φ(R / sigma + Φ⁻¹(p0))).

The bound (Wald 1945; Lai 1988, "Nearly optimal sequential tests of composite hypotheses"; in general
form Agrawal & Ramdas 2025, arXiv 2504.19952, whose first bound is log(1/α) / KL_inf, here KL(p ‖ m)): let a
test stop at τ and claim "p > m" with probability at most `level` when the true rate is m (a valid
certificate must, at every rate below m, where claiming R is wrong; the limit gives m itself) and with
probability 1 − β at rate p > m. The log-likelihood ratio of the votes up to τ has mean E_p[τ]·KL(p ‖ m) under p (Wald's
identity), and by the data-processing inequality it is at least the binary divergence of the claim's
probabilities under the two rates:
    E_p[τ] · KL(p ‖ m) ≥ d(1 − β ‖ level) ≥ (1 − β) log(1 / level) − log 2.
With β = 0 (the image must be certified) this is `fewest_expected_votes`. A run that may lose one image
spends β = 1 on the image whose bound is largest and nothing elsewhere: Σ β_i ≤ 1 makes the sum of the
bounds smallest that way (each term is linear in β_i), which is what pipeline/perf/benchmark.py's
`fewest_forward_passes` charges.
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr

from pipeline.errors import UserError


def bernoulli_divergence(rate: np.ndarray | float, threshold: np.ndarray | float) -> np.ndarray:
    """KL(rate ‖ threshold) of two Bernoulli laws in nats (rel_entr makes 0·log 0 = 0, so rate = 1 works)."""
    p, m = np.asarray(rate, np.float64), np.asarray(threshold, np.float64)
    return rel_entr(p, m) + rel_entr(1.0 - p, 1.0 - m)


def fewest_expected_votes(rate: np.ndarray | float, threshold: np.ndarray | float,
                          level: float) -> np.ndarray:
    """Least expected number of votes any sequential test that claims "rate > threshold" with probability
    ≤ `level` at rate = threshold needs to make that claim surely at `rate` (module docstring); inf where
    rate ≤ threshold (the claim is then wrong and must not be made)."""
    if not 0.0 < level < 0.5:
        raise UserError(f"level must lie strictly between 0 and 1/2, got {level}")
    p, m = np.broadcast_arrays(np.asarray(rate, np.float64), np.asarray(threshold, np.float64))
    if np.any((m <= 0.0) | (m >= 1.0)) or np.any((p < 0.0) | (p > 1.0)):
        raise UserError("rates must lie in [0, 1] and thresholds strictly inside (0, 1)")
    evidence = np.log(1.0 / level) - np.log(2.0)
    with np.errstate(divide="ignore"):
        return np.where(p > m, evidence / bernoulli_divergence(p, m), np.inf)

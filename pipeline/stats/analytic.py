"""Base classifiers whose class probabilities under Gaussian noise are known in closed form.

They let tests and benchmarks draw vote counts straight from binomial/multinomial laws (no network)
and compare certified radii with the *true* robustness radius of the smoothed classifier or of the
population cascade, which is what a coverage ("violation rate") measurement needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri

#: The cascade threshold these models assume; with p0 = 1/2 at most one class can exceed it, so the
#: population cascade changes its output only where some class probability crosses it.
P0 = 0.5


def sample_votes(probabilities: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Vote counts (..., C) of n noisy base-classifier calls for each row of ``probabilities``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return rng.multinomial(n, probabilities, size=probabilities.shape[:-1]).astype(np.int64)


@dataclass(frozen=True)
class LinearBinary:
    """f(x) = 1[w·x + b > 0] on R^d.

    Under noise N(0, sigma² I), w·δ ~ N(0, sigma²‖w‖²), so P[f(x+δ) = 1] = Φ(m(x)/sigma) with
    m(x) = (w·x + b)/‖w‖ the signed distance to the hyperplane. The smoothed classifier therefore
    predicts 1 exactly where m(x) > 0: its decision boundary is the same hyperplane, and its true L2
    robustness radius at x is |m(x)|. Cohen's bound with the exact probability,
    sigma·Φ⁻¹(Φ(|m|/sigma)) = |m|, attains it, so this case measures the bound's tightness and the
    Clopper-Pearson miss rate without slack.
    """

    weights: np.ndarray
    bias: float

    def signed_distance(self, x: np.ndarray) -> np.ndarray:
        """m(x) for inputs x of shape (M, d)."""
        weights = np.asarray(self.weights, dtype=np.float64)
        return (np.asarray(x, dtype=np.float64) @ weights + self.bias) / np.linalg.norm(weights)

    def probabilities(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """(M, 2): P[f(x+δ) = 0], P[f(x+δ) = 1]."""
        one = ndtr(self.signed_distance(x) / sigma)
        return np.stack([1.0 - one, one], axis=-1)

    def smoothed_class(self, x: np.ndarray) -> np.ndarray:
        return (self.signed_distance(x) > 0).astype(np.int64)

    def true_radius(self, x: np.ndarray) -> np.ndarray:
        return np.abs(self.signed_distance(x))


@dataclass(frozen=True)
class IntervalCascade:
    """A multi-class, multi-scale model on the real line.

    At stage k (scale ``sigmas[k]``, decreasing), the base classifier returns the class c whose interval
    [t_c, t_{c+1}) of ``boundaries[k]`` (increasing, t_0 = -inf, t_C = +inf) contains the input u.
    Then P[f_k(u+δ) = c] = Φ((t_{c+1} - u)/σ_k) - Φ((t_c - u)/σ_k) exactly. A d-dimensional model
    whose classifiers all depend on x only through u = w·x with ‖w‖ = 1 behaves identically (an L2
    ball of radius r maps onto (u-r, u+r)), so the line loses no generality for radii.

    Different boundaries per stage make a lower scale classify an input that a higher one is unsure
    about, so certificates at later stages, and the caps of the cascade, occur. ``orders`` (optional)
    names the class of each interval per stage (a permutation of 0..C-1; default 0..C-1 left to
    right), so that e.g. stage 1 reads B | A | C while the lower stages read A | B | C.

    The population cascade G(u): the first stage k with some class probability > 1/2 outputs that
    class; if none does, G abstains (-1). ``true_radius`` is the radius of the largest open interval
    around u on which G keeps a given class.
    """

    sigmas: tuple[float, ...]
    boundaries: tuple[tuple[float, ...], ...]
    orders: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        sizes = {len(b) for b in self.boundaries}
        if len(self.sigmas) != len(self.boundaries) or len(sizes) != 1:
            raise ValueError("need one boundary tuple per sigma, all of the same length")
        if any(np.any(np.diff(b) <= 0) for b in self.boundaries) or np.any(np.diff(self.sigmas) >= 0):
            raise ValueError("boundaries must increase and sigmas must decrease")
        if self.orders is not None and (len(self.orders) != len(self.sigmas) or any(
                sorted(order) != list(range(self.num_classes)) for order in self.orders)):
            raise ValueError("orders must give one permutation of the classes per sigma")

    @property
    def num_classes(self) -> int:
        return len(self.boundaries[0]) + 1

    def probabilities(self, u: np.ndarray) -> np.ndarray:
        """(M, K, C) class probabilities of every stage at inputs u (M,)."""
        u = np.asarray(u, dtype=np.float64)[:, None, None]
        edges = np.array([[-np.inf, *b, np.inf] for b in self.boundaries])  # (K, C+1)
        cdf = ndtr((edges[None] - u) / np.asarray(self.sigmas)[None, :, None])
        intervals = np.diff(cdf, axis=-1)  # (M, K, C): probability of each interval, left to right
        if self.orders is None:
            return intervals
        probabilities = np.empty_like(intervals)
        for k, order in enumerate(self.orders):
            probabilities[:, k, list(order)] = intervals[:, k]
        return probabilities

    def population_prediction(self, u: np.ndarray) -> np.ndarray:
        """G(u), int64 (M,), -1 = abstain."""
        probabilities = self.probabilities(u)
        decided = probabilities.max(axis=-1) > P0  # (M, K)
        first = np.argmax(decided, axis=1)
        rows = np.arange(len(first))
        prediction = np.argmax(probabilities[rows, first], axis=-1)
        return np.where(decided.any(axis=1), prediction, -1)

    def population_certificate(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The capped certificate computed from the exact probabilities (the n → ∞ limit of the
        cascade): class (-1 = abstain) and radius sigma_k(Φ⁻¹ p_k(ĉ) - Φ⁻¹ p0) capped by
        sigma_j(Φ⁻¹ p0 - Φ⁻¹ max_{c≠ĉ} p_j(c)) for the earlier stages j."""
        probabilities = self.probabilities(u)
        prediction = self.population_prediction(u)
        decided = probabilities.max(axis=-1) > P0
        first = np.argmax(decided, axis=1)
        rows = np.arange(len(u))
        sigmas = np.asarray(self.sigmas)
        radius = sigmas[first] * (ndtri(probabilities[rows, first].max(axis=-1)) - ndtri(P0))
        for j in range(len(sigmas)):
            others = probabilities[:, j].copy()
            others[rows, np.maximum(prediction, 0)] = 0.0
            cap = sigmas[j] * (ndtri(P0) - ndtri(others.max(axis=-1)))
            radius = np.where(j < first, np.minimum(radius, cap), radius)
        certified = (prediction >= 0) & (radius > 0)
        return np.where(certified, prediction, -1), np.where(certified, radius, 0.0)

    def _breakpoints(self) -> np.ndarray:
        """Sorted points where some stage's class probability crosses 1/2: G is constant between them."""
        points = []
        for sigma, bounds in zip(self.sigmas, self.boundaries):
            # The outer classes are half-lines: their probability is monotone in u.
            points += [bounds[0] - sigma * ndtri(P0), bounds[-1] + sigma * ndtri(P0)]
            for left, right in zip(bounds[:-1], bounds[1:]):
                centre, half = (left + right) / 2, (right - left) / 2

                def excess(offset: float) -> float:
                    return ndtr((half - offset) / sigma) - ndtr((-half - offset) / sigma) - P0

                # Symmetric and unimodal around the centre: two crossings at centre ± offset, or none.
                if excess(0.0) > 0:
                    offset = brentq(excess, 0.0, half + 10 * sigma, xtol=1e-14)
                    points += [centre - offset, centre + offset]
        return np.unique(points)

    def true_radius(self, u: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """sup{r : G = cls on (u - r, u + r)} per input, 0 where G(u) != cls."""
        u = np.asarray(u, dtype=np.float64)
        cls = np.asarray(cls, dtype=np.int64)
        breaks = self._breakpoints()
        edges = np.concatenate([[-np.inf], breaks, [np.inf]])
        probes = np.concatenate([[breaks[0] - 1.0], (breaks[:-1] + breaks[1:]) / 2, [breaks[-1] + 1.0]])
        segment_class = self.population_prediction(probes)
        # Merge neighbouring segments of the same class into runs.
        run_start = np.concatenate([[True], segment_class[1:] != segment_class[:-1]])
        run_id = np.cumsum(run_start) - 1
        starts = np.flatnonzero(run_start)
        run_left = edges[starts]
        run_right = edges[np.concatenate([starts[1:], [len(segment_class)]])]
        segment = np.searchsorted(breaks, u, side="right")
        run = run_id[segment]
        radius = np.minimum(u - run_left[run], run_right[run] - u)
        return np.where(segment_class[segment] == cls, radius, 0.0)


def example_cascade() -> IntervalCascade:
    """Three scales (1.0, 0.5, 0.25), four classes, laid out so that every branch of the cascade occurs at
    the inputs of ``EXAMPLE_CASCADE_INPUTS``; at most of them the n → ∞ certificate equals the true
    radius, so any over-claim by the finite-sample cascade shows up as a violation."""
    return IntervalCascade(
        sigmas=(1.0, 0.5, 0.25),
        boundaries=((-0.5, 0.5, 1.5), (-1.0, 0.9, 1.1), (-1.0, 0.7, 1.3)),
    )


#: Inputs u of ``example_cascade`` and what the population cascade does there (see its tests).
EXAMPLE_CASCADE_INPUTS: dict[str, float] = {
    "sigma 1.0 certifies (tight)": -1.5,
    "sigma 1.0 certifies (loose)": 2.0,
    "sigma 0.5 certifies, own bound binds (tight)": 0.6,
    "sigma 0.5 certifies, cap from 1.0 binds (tight)": 0.0,
    "sigma 0.25 certifies, cap from 0.5 binds (tight)": 1.0,
    "sigma 0.25 certifies, cap nearly 0 (tight)": 0.95,
    "on the sigma 1.0 boundary (true radius 0)": -0.5,
}


#: Classes of ``line_cascade`` and ``boundary_cascade``: the class A around 0, its neighbours B and C.
A, B, C = 0, 1, 2


def line_cascade(half_width: float) -> IntervalCascade:
    """Three scales (1.0, 0.5, 0.25), three classes: stage 1 reads B | A | C with A on
    [-half_width, half_width), too narrow for A to reach 1/2 at sigma 1.0 when half_width < 0.674;
    the lower stages read A | B | C with A up to 0.8 (sigma 0.5) and 0.7 (sigma 0.25). Near 0,
    sigma 1.0 never certifies: it is undecided about A or falls through, and a lower stage
    certifies A with a cap from sigma 1.0 (B or C reaching 1/2 there) that is the true radius."""
    return IntervalCascade(
        sigmas=(1.0, 0.5, 0.25),
        boundaries=((-half_width, half_width), (0.8, 6.0), (0.7, 6.0)),
        orders=((B, A, C), (A, B, C), (A, B, C)),
    )


def boundary_cascade() -> IntervalCascade:
    """Three scales, three classes B | A | C, A's interval around 0 just narrow enough that A's
    probability at u = 0 is 1/2 (minus 1e-9) at every scale: the population cascade abstains near 0,
    so every certificate there is wrong, and each scale can issue one with probability near its
    lower bound's level. A rule that does not split alpha over the stages it may consult adds those
    chances up."""
    half_widths = [sigma * float(ndtri(0.75)) * (1 - 1e-9) for sigma in (1.0, 0.5, 0.25)]
    return IntervalCascade(
        sigmas=(1.0, 0.5, 0.25),
        boundaries=tuple((-h, h) for h in half_widths),
        orders=((B, A, C),) * 3,
    )


def routing_cases() -> list[tuple[str, IntervalCascade, float]]:
    """(name, model, input u) where routing and the ingredients of the union split matter (exact caps,
    alpha split; docs/statistics.md, "The α split"):

    - ``line_cascade(0.66)`` at 0: sigma 1.0 undecided (A at 0.491), so the published rule abstains,
      while continue/best certify A at sigma 0.5 with the cap from sigma 1.0 binding (true radius 0.66);
    - ``line_cascade(0.66)`` at 0.5: sigma 1.0 falls through (C at 0.436), its cap binds (0.16);
    - ``line_cascade(0.4)`` at -0.4: on B's sigma 1.0 boundary (true radius 0), A at 0.29 there;
    - ``boundary_cascade()`` at 0: A on its boundary at every scale (true radius 0).
    """
    wide, narrow = line_cascade(0.66), line_cascade(0.4)
    return [
        ("sigma 1.0 undecided, sigma 0.5 certifies A, cap from 1.0 binds", wide, 0.0),
        ("sigma 1.0 falls through, cap from 1.0 binds", wide, 0.5),
        ("on B's sigma 1.0 boundary (true radius 0)", narrow, -0.4),
        ("A on its boundary at every scale (true radius 0)", boundary_cascade(), 0.0),
    ]

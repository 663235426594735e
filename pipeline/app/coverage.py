"""The coverage experiment (jobs/coverage.py): how often certificates over-claim, on base classifiers
with known class probabilities.

Vote counts are drawn straight from multinomial laws (pipeline.stats.analytic), certified, and compared
with the true robustness radius. A violation is a certificate whose class is wrong or whose radius
exceeds the true radius; Cohen et al. and the union-mode cascade (under every routing) promise a rate
of at most alpha per input. Also reports tightness: the certified radius at n = 100,000 against the
true radius. Needs no model and no GPU.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import binom

from pipeline.config import CascadeRule
from pipeline.data.filesystems import open_location
from pipeline.errors import UserError
from pipeline.stats.analytic import (
    EXAMPLE_CASCADE_INPUTS,
    LinearBinary,
    example_cascade,
    routing_cases,
    sample_votes,
)
from pipeline.stats.bounds import clopper_pearson_lower
from pipeline.stats.cascade import certify_cascade, certify_single_scale
from pipeline.store.atomic import write_bytes

LINEAR = LinearBinary(weights=np.array([3.0, 4.0]), bias=0.0)
LINEAR_SIGMA = 0.5
LINEAR_DISTANCES = np.array([0.1, 0.25, 0.5, 1.0])
LINEAR_POINTS = LINEAR_DISTANCES[:, None] * (LINEAR.weights / np.linalg.norm(LINEAR.weights))[None, :]
CASCADE = example_cascade()
CASCADE_POINTS = np.array(list(EXAMPLE_CASCADE_INPUTS.values()))
TIGHTNESS_N = 100_000
TIGHTNESS_TRIALS = 200


def exact_single_scale_violation(p_one: float, n_select: int, n: int, alpha: float) -> float:
    """Exact violation probability of Cohen's certificate in the linear case (true class 1).

    Selection picks class 1 when it has more than half the n_select votes (argmax takes class 0 on a
    tie); the certificate then over-claims iff p̲ > p (the radius grows with p̲). If selection picks
    class 0, any certificate is wrong, and one is issued when p̲ of class 0 exceeds 1/2.
    """
    votes = np.arange(n + 1)
    lower = clopper_pearson_lower(votes, n, alpha)
    selected_one = binom.sf(n_select // 2, n_select, p_one)
    over_claim = binom.pmf(votes, n, p_one)[lower > p_one].sum()
    wrong_class = binom.pmf(votes, n, 1.0 - p_one)[lower > 0.5].sum()
    return float(selected_one * over_claim + (1.0 - selected_one) * wrong_class)


def over_claims(
    prediction: np.ndarray, radius: np.ndarray, true_class: np.ndarray, true_radius: np.ndarray
) -> np.ndarray:
    """Certified with a wrong class, or with a radius beyond the true one (float slack 1e-12)."""
    return (prediction >= 0) & ((prediction != true_class) | (radius > true_radius + 1e-12))


def draw_votes(
    probabilities: np.ndarray, trials: int, n_select: int, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Selection and estimation votes for ``trials`` repetitions of every row of ``probabilities``
    (inputs, ..., C), flattened trial-major to (trials · inputs, ..., C)."""
    repeated = np.broadcast_to(probabilities, (trials, *probabilities.shape))
    shape = (-1, *probabilities.shape[1:])
    return sample_votes(repeated, n_select, rng).reshape(shape), sample_votes(repeated, n, rng).reshape(shape)


def violation_rows(trials: int, alpha: float, n_select: int, n: int, rng: np.random.Generator) -> list[dict]:
    """Violation rates of Cohen's certificate on the linear classifier, of the cascade in both alpha modes on
    the example cascade, and of each routing (routing_rows)."""
    rows = []
    probabilities = LINEAR.probabilities(LINEAR_POINTS, LINEAR_SIGMA)
    single = certify_single_scale(*draw_votes(probabilities, trials, n_select, n, rng), LINEAR_SIGMA,
                                  CascadeRule(alpha))
    truth = np.tile(LINEAR_DISTANCES, trials)
    bad = over_claims(single.prediction, single.radius, 1, truth).reshape(trials, -1)
    certified = (single.prediction >= 0).reshape(trials, -1)
    for i, distance in enumerate(LINEAR_DISTANCES):
        rows.append({
            "method": "single scale (Cohen)",
            "case": f"linear, distance {distance:g}, sigma {LINEAR_SIGMA:g}",
            "true_radius": float(distance),
            "certified": float(certified[:, i].mean()),
            "violation_rate": float(bad[:, i].mean()),
            "exact_rate": exact_single_scale_violation(float(probabilities[i, 1]), n_select, n, alpha),
        })

    select, estimate = draw_votes(CASCADE.probabilities(CASCADE_POINTS), trials, n_select, n, rng)
    true_radius = CASCADE.true_radius(CASCADE_POINTS, CASCADE.population_prediction(CASCADE_POINTS))
    points = np.tile(CASCADE_POINTS, trials)
    for mode in ("union", "reference"):
        result = certify_cascade(select, estimate, CASCADE.sigmas, CascadeRule(alpha, mode))
        truth = CASCADE.true_radius(points, result.prediction)
        bad = over_claims(result.prediction, result.radius, result.prediction, truth).reshape(trials, -1)
        certified = (result.prediction >= 0).reshape(trials, -1)
        for i, name in enumerate(EXAMPLE_CASCADE_INPUTS):
            rows.append({
                "method": f"cascade, {mode}",
                "case": name,
                "true_radius": float(true_radius[i]),
                "certified": float(certified[:, i].mean()),
                "violation_rate": float(bad[:, i].mean()),
                "exact_rate": None,
            })
    return rows + routing_rows(trials, alpha, n_select, n, rng)


def routing_rows(trials: int, alpha: float, n_select: int, n: int, rng: np.random.Generator) -> list[dict]:
    """Union mode under each routing, and reference mode, on the inputs where routing matters."""
    rows = []
    for name, model, u in routing_cases():
        point = np.array([u])
        select, estimate = draw_votes(model.probabilities(point), trials, n_select, n, rng)
        points = np.full(trials, u)
        population = model.population_prediction(point)
        true_radius = float(model.true_radius(point, population)[0]) if population[0] >= 0 else 0.0
        for mode, routing in (("union", "cascade"), ("union", "continue"), ("union", "best"),
                              ("reference", "cascade")):
            result = certify_cascade(select, estimate, model.sigmas, CascadeRule(alpha, mode, routing=routing))
            truth = model.true_radius(points, result.prediction)
            rows.append({
                "method": f"cascade, {mode}, {routing}",
                "case": name,
                "true_radius": true_radius,
                "certified": float((result.prediction >= 0).mean()),
                "violation_rate": float(over_claims(result.prediction, result.radius, result.prediction,
                                                    truth).mean()),
                "exact_rate": None,
            })
    return rows


def tightness_rows(alpha: float, n_select: int, rng: np.random.Generator) -> list[dict]:
    """Mean certified radius at n = 100,000 against the true radius and the n → ∞ certificate
    (the gap between those two is the method's own slack, not the sample's)."""
    rows = []
    probabilities = LINEAR.probabilities(LINEAR_POINTS, LINEAR_SIGMA)
    votes = draw_votes(probabilities, TIGHTNESS_TRIALS, n_select, TIGHTNESS_N, rng)
    single = certify_single_scale(*votes, LINEAR_SIGMA, CascadeRule(alpha))
    mean_radius = single.radius.reshape(TIGHTNESS_TRIALS, -1).mean(axis=0)
    for i, distance in enumerate(LINEAR_DISTANCES):
        rows.append({
            "method": "single scale (Cohen)",
            "case": f"linear, distance {distance:g}, sigma {LINEAR_SIGMA:g}",
            "true_radius": float(distance),
            "limit_radius": float(distance),
            "mean_radius": float(mean_radius[i]),
        })

    limit_class, limit_radius = CASCADE.population_certificate(CASCADE_POINTS)
    true_radius = CASCADE.true_radius(CASCADE_POINTS, CASCADE.population_prediction(CASCADE_POINTS))
    votes = draw_votes(CASCADE.probabilities(CASCADE_POINTS), TIGHTNESS_TRIALS, n_select, TIGHTNESS_N, rng)
    result = certify_cascade(*votes, CASCADE.sigmas, CascadeRule(alpha))
    mean_radius = result.radius.reshape(TIGHTNESS_TRIALS, -1).mean(axis=0)
    for i, name in enumerate(EXAMPLE_CASCADE_INPUTS):
        rows.append({
            "method": "cascade, union",
            "case": name,
            "true_radius": float(true_radius[i]),
            "limit_radius": float(limit_radius[i]),
            "mean_radius": float(mean_radius[i]),
        })
    return rows


def markdown(violations: list[dict], tightness: list[dict], trials: int, alpha: float, n: int) -> str:
    """The two tables the job prints: violation rates per input, then tightness."""
    lines = [
        f"Violation rates per input ({trials} trials, alpha = {alpha:g}, n = {n}):",
        "",
        "| method | input | true radius | certified | violation rate | exact rate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in violations:
        exact = "" if row["exact_rate"] is None else f"{row['exact_rate']:.4f}"
        lines.append(
            f"| {row['method']} | {row['case']} | {row['true_radius']:.3f} | {row['certified']:.1%} "
            f"| {row['violation_rate']:.4f} | {exact} |"
        )
    lines += [
        "",
        f"Tightness at n = {TIGHTNESS_N:,} (mean over {TIGHTNESS_TRIALS} trials, alpha = {alpha:g}):",
        "",
        "| method | input | true radius | n → ∞ certificate | mean certified radius | mean / true |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in tightness:
        ratio = f"{row['mean_radius'] / row['true_radius']:.3f}" if row["true_radius"] > 0 else ""
        lines.append(
            f"| {row['method']} | {row['case']} | {row['true_radius']:.3f} | {row['limit_radius']:.3f} "
            f"| {row['mean_radius']:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure certificate violation rates and tightness on analytic base classifiers "
        "(single scale, union-mode cascade under each routing, reference-mode cascade). Needs no model "
        "and no GPU.",
        epilog="example:\n    python jobs/coverage.py --trials 10000 --alpha 0.05 --seed 0 --out coverage.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--trials", type=int, default=10_000, help="repetitions per input (default 10000)")
    parser.add_argument(
        "--alpha", type=float, default=0.05,
        help="failure probability, larger than the usual 0.001 so that violations are measurable "
        "(default 0.05)",
    )
    parser.add_argument(
        "--n", type=int, default=1000, help="estimation votes per input and scale (default 1000)"
    )
    parser.add_argument(
        "--n-select", type=int, default=100, help="selection votes per input and scale (default 100)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", help="also write the measurements as JSON to this file (a local path or an "
                        "fsspec URL)")
    return parser


def coverage(args: argparse.Namespace) -> str:
    """Run the experiment, write --out (JSON) when given; returns the markdown tables."""
    if args.trials < 1 or args.n < 1 or args.n_select < 1:
        raise UserError("--trials, --n and --n-select must be positive")
    if not 0.0 < args.alpha < 0.5:
        raise UserError(f"--alpha must lie strictly between 0 and 0.5, got {args.alpha}")
    if args.out is not None:
        open_location(args.out)  # a bad URL fails now, not after the trials
    rng = np.random.default_rng(args.seed)
    violations = violation_rows(args.trials, args.alpha, args.n_select, args.n, rng)
    tightness = tightness_rows(args.alpha, args.n_select, rng)
    report = {
        "trials": args.trials, "alpha": args.alpha, "n": args.n, "n_select": args.n_select, "seed": args.seed,
        "violations": violations, "tightness": tightness,
    }
    if args.out is not None:
        write_bytes(args.out, json.dumps(report, indent=2).encode())
    return markdown(violations, tightness, args.trials, args.alpha, args.n)



"""Statistics of randomized smoothing, numpy/scipy only (never torch or Ray): Clopper-Pearson and Goodman
bounds, confidence sequences, the multi-scale cascade (fixed n and sequential) with its routing, the
prediction test, analytic classifiers for exact coverage tests, and the information bound adaptive sampling
is measured against. Read it against docs/statistics.md. The
functions take the run's `pipeline.config.CascadeRule` (or `CertifyConfig`) and trust it; they validate the
counts only."""

"""Statistics of randomized smoothing, numpy/scipy only (never torch or Ray): Clopper-Pearson and Goodman
bounds, confidence sequences, the multi-scale cascade (fixed n and sequential) with its routing, the
prediction test, and analytic classifiers for exact coverage tests. Read it against ../shared/method.md."""

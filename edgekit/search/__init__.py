"""`edgekit search`: the most accurate model that fits a target's budget, over a space of recipes (space), each
one a full build (trial), driven by Optuna's sampler on Ray Tune (run), compared on a Pareto front (pareto)."""

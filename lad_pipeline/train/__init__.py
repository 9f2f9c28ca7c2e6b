"""Stage two: the one training loop, its label sources and the optimisation recipe."""

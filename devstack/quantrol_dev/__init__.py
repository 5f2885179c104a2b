"""Quantrol's development package: the local stack that stands in for a cluster, `quantrol demo`, and the rigs the
tests and benchmarks share. Development environments only; the operator and worker images never contain it."""

"""Experiments made of many runs: the tasks abstraction, the teacher x student grid, the
darts_fisher pipeline and their figures."""

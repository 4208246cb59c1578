"""Probes: closed-form solvers, the layer × step grid, probe runs and emergence."""

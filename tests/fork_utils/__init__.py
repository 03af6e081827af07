"""Helpers shared by the fork's tests, demo and benchmarks: tiny MoE checkpoints, launchers, rank-side plumbing."""

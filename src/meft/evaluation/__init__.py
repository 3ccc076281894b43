"""Scoring: greedy generation and metrics, the retention probe, and the cache of base-model
results."""

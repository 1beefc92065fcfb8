"""Metrics, profiling, dashboard and logs: how a run is watched and understood."""

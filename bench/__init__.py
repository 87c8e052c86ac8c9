"""ckptd's benchmarks: scripts run as `python -m bench.NAME` from the repository root."""

"""neonnb's benchmark suite: `python -m benchmarks` runs every workload on every system."""

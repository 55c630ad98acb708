"""Speed benchmarks (run on the accelerator; see benchmarks/README.md)."""

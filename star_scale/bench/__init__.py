"""`star-scale bench step|data|memory`: benchmarks that print ratios measured side by side in one run."""

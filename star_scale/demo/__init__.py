"""`star-scale demo` (the pipeline end to end on generated images) and `star-scale repro` (the loss ablation)."""

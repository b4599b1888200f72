"""`star-scale repro`: the paper's loss ablation at CPU scale (plan, run, judge, table)."""

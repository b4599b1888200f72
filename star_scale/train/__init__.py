"""The training loop and what it runs on one process: local engine, checkpoints, preemption, tracking, throughput."""

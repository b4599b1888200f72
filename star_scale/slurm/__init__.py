"""Slurm: `star-scale submit` (training jobs), `submit-tokenize` (tokenization arrays) and `plan` (per-GPU memory)."""

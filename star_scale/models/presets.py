"""Model sizes: the only place they live.  Paper presets follow LlamaGen's GPT-B..3B."""

# name: (layers, heads, width)
PRESETS = {
    "tiny": (2, 4, 64),  # CPU tests and the demo
    "small": (4, 4, 128),  # CPU experiments (repro, sweeps)
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "3B": (24, 32, 3200),
}

# Parameter counts the paper reports (ImageNet: 16384 codes, 1000 classes, 16x16 grid).
PAPER_PARAMS = {"B": 111e6, "L": 343e6, "XL": 775e6, "XXL": 1.4e9, "3B": 3.1e9}
PAPER_DATA = dict(vocab_size=16384, num_classes=1000, grid_size=16)

"""`star-scale bench data` runs end to end and ends with the two lines the docs promise."""
from __future__ import annotations

import re

from star_scale.bench.data import main


def test_bench_data_last_two_lines(capsys):
    assert main(["--rows", "4096", "--tokens", "16", "--chunk-size", "256", "--batch-size", "64", "--repeats", "1",
                 "--no-tokenizer"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"samples/s = \d+", lines[-2]), lines[-2]
    assert re.fullmatch(r"ratio loader/raw = \d+\.\d+", lines[-1]), lines[-1]
    assert any(line.startswith("raw sequential chunk reads") for line in lines)


def test_bench_data_tokenizer_line(capsys, tmp_path):
    from star_scale.bench.data import tokenizer_rate

    name, crops_s, images_s = tokenizer_rate(None, 64, seconds=0.2)
    assert name.startswith("patch-kmeans-512") and crops_s > 0 and abs(images_s * 10 - crops_s) < 1e-6 * crops_s

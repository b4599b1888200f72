"""File names that are not UTF-8, or hold tabs, spaces or line breaks, never stop tokenization; the report and
sources.tsv keep them byte for byte."""
import json
import os

import numpy as np
from PIL import Image

from star_scale.data import schema
from tokenize_data import job

ODD = [b"not-utf8-\xff\xfe.png", "tab\tin name.png".encode(), " leading space.png".encode(),
       "caf\u00e9.png".encode(), b"corrupt-\xe9.png"]
LINE_BREAK = b"line\nbreak.png"


def test_odd_file_names_are_tokenized_or_listed_losslessly(tmp_path):
    folder = os.fsencode(tmp_path / "images" / "cls")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in ODD[:-1] + [LINE_BREAK, b"plain.png"]:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(os.path.join(folder, name))
    with open(os.path.join(folder, ODD[-1]), "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out.zarr"
    assert job.main([str(tmp_path / "images"), str(out), "--tokenizer", "patch-kmeans:16", "--image-size", "16",
                     "--no-progress", "--verify"]) == 0

    rows = (out / schema.SOURCES_FILE).read_bytes().splitlines()
    assert sorted(r.rsplit(b"\t", 1)[0] for r in rows) == sorted(b"cls/" + n for n in ODD + [b"plain.png"])
    report = json.loads((out / schema.REPORT_JSON).read_text())
    assert report["written"] == len(ODD)  # all but the corrupt one
    [skipped] = report["skipped"]
    assert os.fsencode(skipped["path"]) == b"cls/" + ODD[-1] and "not an image" in skipped["reason"]
    [ignored] = report["ignored"]
    assert os.fsencode(ignored["path"]) == b"cls/" + LINE_BREAK and "line break" in ignored["reason"]
    assert b"cls/corrupt-\xe9.png" in (out / schema.REPORT_TXT).read_bytes()

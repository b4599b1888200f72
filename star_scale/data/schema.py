"""The on-disk format of a token store: one Zarr v3 group per tokenized dataset.

Layout (everything lives inside the group's folder)::

    out.zarr/
      zarr.json              group metadata; attributes describe the dataset (see below)
      codes/                 (N, crops, T) uint16, sharded (sharding codec, zstd)
      labels/                (N,) int32, same sharding along N
      sources.tsv            row -> source image (path relative to the source root, label)
      tokenizer.pt           only when the job fitted the tokenizer itself
      report.json/.txt       written once every unit is done: skipped and converted files
      _tokenize/             the job's bookkeeping: plan, per-unit done markers, locks

Rows: row i holds the image ``sources.tsv`` line i.  The sorted source list is
permuted once with a fixed seed before rows are assigned (recorded in the
attributes), so every chunk mixes classes and the loader's chunk shuffle needs
no global per-sample shuffle.  An image the job had to skip keeps its row with
label ``LABEL_SKIPPED`` (-1) and zero codes; readers drop rows with label < 0.
``LABEL_UNWRITTEN`` (-2) is the labels fill value: a row still carrying it was
never written (an unfinished job), which ``--verify`` reports and the store
refuses to train on.

Chunking: a shard (the unit of work of the tokenize job, one writer each) holds
``shard_size`` rows; inside it, chunks of ``chunk_size`` whole rows (all crops,
all tokens) are the unit the loader reads and shuffles.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FORMAT = "star_scale.tokens"
FORMAT_VERSION = 1
CODES = "codes"
LABELS = "labels"
SOURCES_FILE = "sources.tsv"
TOKENIZER_FILE = "tokenizer.pt"
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"
JOB_DIR = "_tokenize"

LABEL_SKIPPED = -1
LABEL_UNWRITTEN = -2

DEFAULT_SHARD_SIZE = 4096
TARGET_CHUNK_BYTES = 4 << 20  # ~4 MiB per read: large enough that zarr's per-call overhead is small


def default_chunking(n_rows: int, crops: int, tokens: int, shard_size: int | None = None,
                     chunk_size: int | None = None) -> tuple[int, int]:
    """(shard_size, chunk_size) for a store of ``n_rows`` rows of (crops, tokens) uint16.

    Chunks aim at ~4 MiB (1024 rows at T=256 with ten crops gives 5 MiB... we take the
    power of two nearest below the target), never more than 1/8 of the data so that
    small stores still have several chunks to shuffle, and always divide the shard.
    """
    row_bytes = max(1, crops * tokens * 2)
    if chunk_size is None:
        chunk_size = 1 << max(0, int(np.floor(np.log2(max(1, TARGET_CHUNK_BYTES // row_bytes)))))
        small = 1 << max(0, int(np.floor(np.log2(max(1, n_rows // 8)))))
        chunk_size = max(1, min(chunk_size, small))
    if shard_size is None:
        shard_size = max(DEFAULT_SHARD_SIZE, chunk_size)
        shard_size = -(-shard_size // chunk_size) * chunk_size
    if chunk_size <= 0 or shard_size <= 0 or shard_size % chunk_size:
        raise ValueError(f"shard size {shard_size} must be a positive multiple of the chunk size {chunk_size}")
    return shard_size, chunk_size


def create_token_group(path: str | os.PathLike, n_rows: int, crops: int, tokens: int, *, shard_size: int,
                       chunk_size: int, attrs: dict, zstd_level: int = 3):
    """Create the group with fixed-size ``codes`` and ``labels`` arrays (metadata only, no data)."""
    import zarr
    from zarr.codecs import ZstdCodec

    if n_rows <= 0:
        raise ValueError("cannot create a token store with no rows")
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, **attrs})
    group.create_array(CODES, shape=(n_rows, crops, tokens), dtype="uint16", shards=(shard_size, crops, tokens),
                       chunks=(chunk_size, crops, tokens), compressors=[ZstdCodec(level=zstd_level)], fill_value=0,
                       dimension_names=("row", "crop", "token"))
    group.create_array(LABELS, shape=(n_rows,), dtype="int32", shards=(shard_size,), chunks=(chunk_size,),
                       compressors=[ZstdCodec(level=zstd_level)], fill_value=LABEL_UNWRITTEN,
                       dimension_names=("row",))
    return group


def shard_files(group_path: str | os.PathLike, shard: int) -> list[Path]:
    """The files holding shard ``shard`` of codes and labels (default v3 chunk keys, local store)."""
    root = Path(group_path)
    return [root / CODES / "c" / str(shard) / "0" / "0", root / LABELS / "c" / str(shard)]


def is_token_store(path: str | os.PathLike) -> bool:
    p = Path(path) / "zarr.json"
    if not p.is_file():
        return False
    import json

    try:
        return json.loads(p.read_text()).get("attributes", {}).get("format") == FORMAT
    except (OSError, ValueError):
        return False

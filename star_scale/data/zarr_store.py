"""Read side of the Zarr token store (see ``schema.py`` for the layout).

``ZarrStore`` keeps every label in memory (4 bytes a row) and reads codes one
inner chunk at a time.  Zarr's own API costs ~0.5 ms per call, which makes
chunk-sized reads ~30% slower than whole-shard reads; for the layout this
project writes (sharding_indexed, index at the end, bytes+zstd inside,
bytes+crc32c index, default "/" chunk keys, local files) chunks are read
directly: one ``pread`` of the shard index (cached, crc-checked), one
``pread`` of the chunk, zstd into a preallocated array.  Any other layout
falls back to zarr, and tests check both paths return identical arrays.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from star_scale.data import schema
from star_scale.data.chunks import ChunkReads

_EMPTY = 2**64 - 1


class StoreError(RuntimeError):
    pass


class _DirectChunkReader:
    """Reads inner chunks of a sharded (N, ...) uint16 array straight from its shard files."""

    def __init__(self, array_dir: Path, meta: dict):
        self.dir = array_dir
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype("<u2") if meta["data_type"] == "uint16" else np.dtype(meta["data_type"]).newbyteorder("<")
        shard_cfg = meta["codecs"][0]["configuration"]
        self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.chunk_shape = tuple(shard_cfg["chunk_shape"])
        self.chunks_per_shard = self.shard_shape[0] // self.chunk_shape[0]
        self.fill = meta.get("fill_value", 0)
        self._index: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()
        from numcodecs import Zstd

        self._zstd = Zstd()
        try:
            import google_crc32c

            self._crc = google_crc32c.value
        except ImportError:  # pragma: no cover - zarr depends on it
            self._crc = None

    @staticmethod
    def supports(meta: dict) -> bool:
        try:
            codecs = meta["codecs"]
            if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
                return False
            cfg = codecs[0]["configuration"]
            inner = [c["name"] for c in cfg["codecs"]]
            index = [c["name"] for c in cfg["index_codecs"]]
            enc = meta["chunk_key_encoding"]
            shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
            return (inner == ["bytes", "zstd"] and cfg["codecs"][0]["configuration"].get("endian", "little") == "little"
                    and index == ["bytes", "crc32c"] and cfg["index_codecs"][0]["configuration"].get("endian", "little") == "little"
                    and cfg.get("index_location", "end") == "end" and enc["name"] == "default"
                    and enc.get("configuration", {}).get("separator", "/") == "/"
                    and list(cfg["chunk_shape"][1:]) == list(meta["shape"][1:]) == list(shard[1:])
                    and shard[0] % cfg["chunk_shape"][0] == 0 and meta["data_type"] in ("uint16", "int32"))
        except (KeyError, IndexError, TypeError):
            return False

    def _shard_path(self, shard: int) -> Path:
        return self.dir.joinpath("c", str(shard), *(["0"] * (len(self.shape) - 1)))

    def _shard_index(self, shard: int):
        with self._lock:
            if shard in self._index:
                return self._index[shard]
        path = self._shard_path(shard)
        try:
            with open(path, "rb") as f:
                n = self.chunks_per_shard
                f.seek(-(16 * n + 4), os.SEEK_END)
                raw = f.read(16 * n + 4)
        except FileNotFoundError:
            index = None  # never written (or every chunk equal to the fill value)
        else:
            if self._crc is not None and self._crc(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise StoreError(f"{path}: shard index checksum mismatch (corrupt or half-written shard)")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.chunks_per_shard, 2).copy()
        with self._lock:
            self._index[shard] = index
        return index

    def read_chunk(self, chunk: int, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [chunk*cs, chunk*cs + rows) (rows < cs only for the array's last, partial chunk),
        decoded straight into ``out`` (shape (rows, ...), C-contiguous) when given."""
        cs = self.chunk_shape[0]
        shard, inner = divmod(chunk, self.chunks_per_shard)
        index = self._shard_index(shard)
        if index is None or int(index[inner, 0]) == _EMPTY:
            if out is None:
                return np.full((rows, *self.chunk_shape[1:]), self.fill, dtype=self.dtype)
            out[...] = self.fill
            return out
        offset, nbytes = (int(v) for v in index[inner])
        fd = os.open(self._shard_path(shard), os.O_RDONLY)
        try:
            buf = os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
        if len(buf) != nbytes:
            raise StoreError(f"{self._shard_path(shard)}: chunk {inner} truncated ({len(buf)} of {nbytes} bytes)")
        if out is not None and rows == cs and out.flags.c_contiguous and out.dtype == self.dtype:
            self._zstd.decode(buf, out=out.reshape(-1))  # no intermediate copy
            return out
        full = np.empty((cs, *self.chunk_shape[1:]), dtype=self.dtype)  # inner chunks are always full-size
        self._zstd.decode(buf, out=full.reshape(-1))
        if out is not None:
            out[...] = full[:rows]
            return out
        return full[:rows] if rows < cs else full


class ZarrStore(ChunkReads):
    """A token store written by ``star-scale tokenize``: same interface as ``ArrayStore``."""

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False, direct: bool = True):
        import zarr

        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except Exception as e:  # zarr raises several types for "not a group"
            raise StoreError(f"{str(self.path)!r} is not a Zarr token store ({type(e).__name__}: {e})") from e
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format") != schema.FORMAT:
            raise StoreError(f"{str(self.path)!r} is a Zarr group but not a star-scale token store "
                             f"(attribute format={self.attrs.get('format')!r}, expected {schema.FORMAT!r})")
        for name in (schema.CODES, schema.LABELS):
            if name not in self.group:
                raise StoreError(f"token store {str(self.path)!r} has no {name!r} array")
        self.codes = self.group[schema.CODES]
        if self.codes.ndim != 3 or self.codes.dtype != np.uint16:
            raise StoreError(f"{self.path / schema.CODES}: expected (N, crops, T) uint16, got {self.codes.shape} {self.codes.dtype}")
        self.labels = np.asarray(self.group[schema.LABELS][:], dtype=np.int32)
        if self.labels.shape != (self.codes.shape[0],):
            raise StoreError(f"{self.path}: labels {self.labels.shape} do not match codes {self.codes.shape}")
        unwritten = int((self.labels == schema.LABEL_UNWRITTEN).sum())
        if unwritten and not allow_incomplete:
            raise StoreError(f"token store {str(self.path)!r} is incomplete: {unwritten} of {len(self.labels)} rows were never "
                             f"written; re-run the same `star-scale tokenize` command to finish it")
        self.chunk_size = int(self.codes.chunks[0])
        self.shard_size = int((self.codes.shards or self.codes.chunks)[0])
        meta = json.loads((self.path / schema.CODES / "zarr.json").read_text())
        self._direct = _DirectChunkReader(self.path / schema.CODES, meta) if direct and _DirectChunkReader.supports(meta) else None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def crops(self) -> int:
        return int(self.codes.shape[1])

    @property
    def tokens_per_image(self) -> int:
        return int(self.codes.shape[2])

    @property
    def num_classes(self) -> int | None:
        n = self.attrs.get("num_classes")
        return int(n) if n is not None else None

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer file the store was made with, when the job saved one inside the store."""
        p = self.path / schema.TOKENIZER_FILE
        return p if p.is_file() else None

    def all_labels(self) -> np.ndarray:
        return self.labels

    def read(self, start: int, stop: int, out: np.ndarray | None = None):
        """(codes (n, crops, T) uint16, labels (n,) int32) for rows [start, stop); codes go into ``out`` if given."""
        start, stop = max(0, start), min(len(self), stop)
        cs = self.chunk_size
        if self._direct is not None and start % cs == 0 and (stop - start <= cs):
            codes = self._direct.read_chunk(start // cs, stop - start, out)
        else:
            codes = self.codes[start:stop]
            if out is not None:
                out[...] = codes
                codes = out
        return codes, self.labels[start:stop]

    def __repr__(self) -> str:
        return f"ZarrStore({str(self.path)!r}, rows={len(self)}, crops={self.crops}, T={self.tokens_per_image}, chunk={self.chunk_size})"

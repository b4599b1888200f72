"""The OpenAI ADM evaluator's .npz files: sample batches, reference batches, statistics.

Sample batch: ``arr_0`` = (N, H, W, 3) uint8 images (guided-diffusion's samplers
also store ``arr_1`` = (N,) labels).  Reference batch: ``arr_0`` images and
optionally precomputed FID statistics ``mu``, ``sigma`` (pool_3) and ``mu_s``,
``sigma_s`` (spatial), which the evaluator uses instead of recomputing them.

Arrays are written and read in streaming fashion (one batch at a time), so a
50,000-image file never has to sit in memory whole.
"""
from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_npz_streaming(path: str | os.PathLike, arrays: dict) -> None:
    """Write an uncompressed .npz atomically (temp file + os.replace).

    arrays: name -> np.ndarray, or name -> (shape, dtype, iterable of chunks along axis 0).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in arrays.items():
                if isinstance(value, np.ndarray):
                    shape, dtype, chunks = value.shape, value.dtype, [value]
                else:
                    shape, dtype, chunks = value
                _write_member(zf, name, tuple(shape), np.dtype(dtype), chunks)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype, chunks: Iterable) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    written = 0
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        if len(repr(header)) > 65000:  # version 1.0 headers hold at most 64 KiB
            np.lib.format.write_array_header_2_0(f, header)
        else:
            np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            if chunk.shape[1:] != shape[1:]:
                raise ValueError(f"{name}: chunk of shape {chunk.shape} does not fit array shape {shape}")
            f.write(chunk.tobytes())
            written += chunk.size
    expected = shape[0] * row if shape else 1
    if written != expected:
        raise ValueError(f"{name}: wrote {written} values, the header promises {expected} (shape {shape})")


@contextmanager
def open_npz_member(path: str | os.PathLike, key: str):
    """Yield (file object positioned at the data, shape, dtype) for one array of an .npz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not an .npz file ({e})") from None
    with zf:
        names = zf.namelist()
        if f"{key}.npy" not in names:
            have = sorted(n[:-4] for n in names if n.endswith(".npy"))
            raise KeyError(f"{path}: no array {key!r} (it holds {have})")
        with zf.open(f"{key}.npy", "r") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}: {key} uses .npy format version {version}; expected 1.0 or 2.0")
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}: {key} is Fortran-ordered or holds objects; expected a plain C array")
            yield f, shape, dtype


def npz_keys(path: str | os.PathLike) -> list[str]:
    with zipfile.ZipFile(path, "r") as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def npz_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple:
    with open_npz_member(path, key) as (_, shape, _dtype):
        return shape


def iter_npz_batches(path: str | os.PathLike, key: str = "arr_0", batch_size: int = 64,
                     limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yield consecutive (<= batch_size, ...) slices of one array without loading it whole."""
    with open_npz_member(path, key) as (f, shape, dtype):
        n = shape[0] if limit is None else min(limit, shape[0])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            data = f.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ValueError(f"{path}: {key} ends early (rows {start}..{start + count} of {shape[0]})")
            yield np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))


def check_images(path: str | os.PathLike, key: str = "arr_0") -> tuple:
    """Shape of an ADM image array; ValueError unless it is (N, H, W, 3) uint8."""
    with open_npz_member(path, key) as (_, shape, dtype):
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise ValueError(f"{path}: {key} is {dtype} {shape}; the ADM evaluator expects (N, H, W, 3) uint8")
        return shape


def read_statistics(path: str | os.PathLike) -> Optional[dict]:
    """{'mu', 'sigma', 'mu_s', 'sigma_s'} when the file has precomputed statistics, else None."""
    keys = set(npz_keys(path))
    present = [k for k in STAT_KEYS if k in keys]
    if not present:
        return None
    if len(present) != len(STAT_KEYS):
        missing = [k for k in STAT_KEYS if k not in keys]
        raise ValueError(f"{path}: has FID statistics {present} but lacks {missing}")
    with np.load(path) as f:
        return {k: f[k] for k in STAT_KEYS}

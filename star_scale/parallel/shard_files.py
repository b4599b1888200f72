"""Per-rank checkpoint shards: raw fp32 pieces and their index, readable into any layout (torch only).

Each rank R of a distributed checkpoint writes two files and no others for the model state:

    shards/rank_R.bin    the raw bytes of every piece it owns, back to back (data only: no pickle)
    shards/rank_R.json   {"pieces": {KEY: {"offset", "numel", "dtype", "start", "stop",
                                           "shape", "dim", "stride", "tp_rank", "tp"}}}

KEY is ``<kind>/<name>``: ``student`` (the fp32 master of a training-module parameter), ``exp_avg``
and ``exp_avg_sq`` (its AdamW moments), ``teacher`` (the fp32 EMA of a teacher GPT parameter).  A
piece is elements [start, stop) of the flattened TP-local tensor that TP rank ``tp_rank`` of ``tp``
holds; ``shape`` is the whole (TP = 1) tensor's, ``dim``/``stride`` how tensor parallelism splits
it (``tensor_parallel.shard``; dim null: replicated, read from TP rank 0).  A rank writes what it
holds: its ZeRO partition, or an equal 1/dp slice of a tensor that every data-parallel rank holds
whole (ZeRO stage 0, the stage 0-2 teacher), so the bytes per rank fall as 1/world.

Resharding: ``ShardReader.local`` gives any range of any rank's TP-local tensor, one tensor at a
time, reading only the bytes it needs: at the same TP split, just the overlapping ranges; at
another, the tensor is rebuilt whole (one parameter, never the model) and split again.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from star_scale.atomic import write_text

KINDS = ("student", "exp_avg", "exp_avg_sq", "teacher")
DTYPE = torch.float32
SHARDS = "shards"


def shard(full: torch.Tensor, dim: Optional[int], stride: int, rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of a full tensor: chunks rank, rank + tp, ... of tp * stride equal chunks."""
    if dim is None or tp == 1:
        return full
    chunks = full.chunk(tp * stride, dim)
    return torch.cat(chunks[rank::tp], dim)


def unshard(shards: list[torch.Tensor], dim: Optional[int], stride: int) -> torch.Tensor:
    """Inverse of ``shard`` over all ranks' pieces (in TP-rank order)."""
    if dim is None or len(shards) == 1:
        return shards[0]
    pieces = [s.chunk(stride, dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(shards))], dim)


def local_shape(shape: list[int], dim: Optional[int], tp: int) -> list[int]:
    out = list(shape)
    if dim is not None and tp > 1:
        out[dim] //= tp
    return out


def even_slice(numel: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's equal share of ``numel`` elements."""
    n = math.ceil(numel / world)
    return min(rank * n, numel), min((rank + 1) * n, numel)


def bin_name(rank: int) -> str:
    return f"{SHARDS}/rank_{rank:05d}.bin"


def index_name(rank: int) -> str:
    return f"{SHARDS}/rank_{rank:05d}.json"


class ShardWriter:
    """Collects one rank's pieces (views or snapshots), then writes its two files."""

    def __init__(self):
        self.pieces: list[tuple[str, dict, torch.Tensor]] = []

    def add(self, key: str, values: torch.Tensor, start: int, shape, dim: Optional[int], stride: int,
            tp_rank: int, tp: int) -> None:
        values = values.detach().reshape(-1)
        info = {"start": int(start), "stop": int(start) + values.numel(), "shape": [int(s) for s in shape],
                "dim": dim, "stride": int(stride), "tp_rank": int(tp_rank), "tp": int(tp)}
        self.pieces.append((key, info, values))

    def snapshot(self) -> "ShardWriter":
        """A copy on the host, so that training may go on changing the originals (asynchronous save)."""
        out = ShardWriter()
        out.pieces = [(k, i, v.to("cpu", DTYPE, copy=True)) for k, i, v in self.pieces]
        return out

    def write(self, folder: Path, rank: int) -> list[str]:
        """Write and fsync ``rank``'s files under ``folder``; returns their names relative to it."""
        (folder / SHARDS).mkdir(parents=True, exist_ok=True)
        index, offset = {}, 0
        with open(folder / bin_name(rank), "wb") as f:
            for key, info, values in self.pieces:
                data = values.to("cpu", DTYPE).contiguous()
                f.write(memoryview(data.view(torch.uint8).numpy()))
                index[key] = {"offset": offset, "numel": data.numel(), "dtype": "float32", **info}
                offset += data.numel() * DTYPE.itemsize
            f.flush()
            os.fsync(f.fileno())
        write_text(folder / index_name(rank), json.dumps({"pieces": index}))
        return [bin_name(rank), index_name(rank)]


class ShardReader:
    """Every rank's index of one checkpoint folder; reads ranges of tensors from the binary files."""

    def __init__(self, folder: Path, world: int):
        self.folder = Path(folder)
        self.by_key: dict[str, list[tuple[int, dict]]] = {}
        for rank in range(world):
            path = self.folder / index_name(rank)
            try:
                pieces = json.loads(path.read_text())["pieces"]
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"{path}: unreadable shard index ({e})") from None
            for key, info in pieces.items():
                self.by_key.setdefault(key, []).append((rank, info))
        self._files: dict[int, object] = {}

    def names(self, kind: str) -> list[str]:
        return sorted(k[len(kind) + 1:] for k in self.by_key if k.startswith(kind + "/"))

    def geometry(self, key: str) -> dict:
        if key not in self.by_key:
            raise KeyError(f"{self.folder}: no shard holds {key!r}")
        return self.by_key[key][0][1]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _read(self, rank: int, info: dict, lo: int, hi: int) -> torch.Tensor:
        f = self._files.get(rank)
        if f is None:
            f = self._files[rank] = open(self.folder / bin_name(rank), "rb")
        f.seek(info["offset"] + (lo - info["start"]) * DTYPE.itemsize)
        data = bytearray(f.read((hi - lo) * DTYPE.itemsize))
        if len(data) != (hi - lo) * DTYPE.itemsize:
            raise ValueError(f"{self.folder / bin_name(rank)}: ends inside {info} (truncated?)")
        return torch.frombuffer(data, dtype=DTYPE) if data else torch.empty(0, dtype=DTYPE)

    def _saved_range(self, key: str, tp_rank: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the saved TP-local tensor of ``tp_rank``, from the pieces that overlap them."""
        out = torch.empty(hi - lo, dtype=DTYPE)
        covered = 0
        for rank, info in self.by_key[key]:
            if info["tp_rank"] != tp_rank:
                continue
            a, b = max(lo, info["start"]), min(hi, info["stop"])
            if a < b:
                out[a - lo : b - lo] = self._read(rank, info, a, b)
                covered += b - a
        if covered != hi - lo:  # ranges of one TP rank never overlap: a shortfall is a missing piece
            raise ValueError(f"{self.folder}: the shards hold {covered} of elements [{lo}, {hi}) of {key!r} "
                             f"(TP rank {tp_rank})")
        return out

    def full(self, key: str) -> torch.Tensor:
        """The whole TP = 1 tensor (one parameter)."""
        g = self.geometry(key)
        dim, tp = g["dim"], g["tp"] if g["dim"] is not None else 1
        shape = local_shape(g["shape"], dim, tp)
        numel = math.prod(shape)
        parts = [self._saved_range(key, r, 0, numel).view(shape) for r in range(tp)]
        return unshard(parts, dim, g["stride"])

    def local(self, key: str, dim: Optional[int], stride: int, tp_rank: int, tp: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened TP-local tensor of ``tp_rank`` of ``tp`` (the loading layout's)."""
        g = self.geometry(key)
        old = (g["dim"], g["stride"], g["tp"]) if g["dim"] is not None and g["tp"] > 1 else (None, 1, 1)
        new = (dim, stride, tp) if dim is not None and tp > 1 else (None, 1, 1)
        if old == new:  # the same split: read the overlapping ranges only
            return self._saved_range(key, tp_rank if new[0] is not None else 0, lo, hi)
        return shard(self.full(key), dim, stride, tp_rank, tp).reshape(-1)[lo:hi].clone()

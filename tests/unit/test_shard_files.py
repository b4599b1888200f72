"""Per-rank shard files: saved in one layout, read back exactly in any other (no processes, torch only)."""
import itertools
import math

import pytest
import torch

from star_scale.parallel.shard_files import ShardReader, ShardWriter, even_slice, local_shape, shard

# name: (whole TP = 1 shape, TP split dim or None, stride); wqkv-like stride 3, an odd size that pads
TENSORS = {"wqkv": ([24, 8], 0, 3), "w2": ([8, 12], 1, 1), "norm": ([8], None, 1), "odd": ([6, 5], 0, 1)}


def save_layout(folder, whole: dict, tp: int, dp: int, zero3: bool) -> int:
    """Write ``whole`` as tp x dp ranks would: ZeRO-3 padded partitions, or equal slices of whole tensors."""
    for tp_rank, dp_rank in itertools.product(range(tp), range(dp)):
        rank = dp_rank * tp + tp_rank
        w = ShardWriter()
        for name, (shape, dim, stride) in TENSORS.items():
            local = shard(whole[name], dim, stride, tp_rank, tp).reshape(-1)
            if zero3:
                n = math.ceil(local.numel() / dp)
                start, stop = min(dp_rank * n, local.numel()), min((dp_rank + 1) * n, local.numel())
            else:
                start, stop = even_slice(local.numel(), dp_rank, dp)
            if start < stop:
                w.add(f"student/{name}", local[start:stop], start, shape, dim, stride, tp_rank, tp)
        w.write(folder, rank)
    return tp * dp


@pytest.fixture
def whole():
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(shape, generator=g) for n, (shape, _, _) in TENSORS.items()}


@pytest.mark.parametrize("saved", [(1, 1, True), (2, 2, True), (2, 3, False), (1, 4, True)])
@pytest.mark.parametrize("loaded", [(1, 1), (2, 1), (2, 2), (4, 3)])
def test_any_layout_reads_back_exactly(tmp_path, whole, saved, loaded):
    world = save_layout(tmp_path, whole, *saved)
    reader = ShardReader(tmp_path, world)
    tp, dp = loaded
    for name, (shape, dim, stride) in TENSORS.items():
        assert torch.equal(reader.full(f"student/{name}"), whole[name])
        if dim is not None and shape[dim] % (tp * stride):
            continue  # this TP size cannot split the tensor (the model would replicate it)
        for tp_rank, dp_rank in itertools.product(range(tp), range(dp)):
            local = shard(whole[name], dim, stride, tp_rank, tp).reshape(-1)
            lo, hi = even_slice(local.numel(), dp_rank, dp)
            assert torch.equal(reader.local(f"student/{name}", dim, stride, tp_rank, tp, lo, hi), local[lo:hi])
    reader.close()


def test_same_split_reads_only_the_overlapping_bytes(tmp_path, whole):
    save_layout(tmp_path, whole, 2, 2, True)
    reader = ShardReader(tmp_path, 4)
    reads = []
    original = reader._read
    reader._read = lambda rank, info, lo, hi: reads.append(hi - lo) or original(rank, info, lo, hi)
    shape, dim, stride = TENSORS["wqkv"]
    got = reader.local("student/wqkv", dim, stride, 1, 2, 10, 70)
    assert torch.equal(got, shard(whole["wqkv"], dim, stride, 1, 2).reshape(-1)[10:70])
    assert sum(reads) == 60  # nothing beyond the asked range


def test_a_missing_rank_is_named(tmp_path, whole):
    save_layout(tmp_path, whole, 1, 2, True)
    (tmp_path / "shards" / "rank_00001.json").unlink()
    with pytest.raises(ValueError, match="rank_00001.json"):
        ShardReader(tmp_path, 2)


def test_a_short_file_is_named(tmp_path, whole):
    save_layout(tmp_path, whole, 1, 2, True)
    path = tmp_path / "shards" / "rank_00001.bin"
    path.write_bytes(path.read_bytes()[:-8])
    reader = ShardReader(tmp_path, 2)
    with pytest.raises(ValueError, match="rank_00001.bin.*truncated"):
        reader.full("student/odd")


def test_local_shape_divides_the_split_dimension():
    assert local_shape([24, 8], 0, 2) == [12, 8] and local_shape([8], None, 4) == [8]

"""The token stores (npz in memory, Zarr shards) and the chunk-shuffling, resumable loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from star_scale.data import ArrayStore, TokenLoader, open_store, save_npz_store
from star_scale.data import schema
from star_scale.data.zarr_store import StoreError, ZarrStore


def _codes(n: int, crops: int = 10, t: int = 6) -> np.ndarray:
    """codes[i, c] = (i, c, i+c, ...): the row and crop can be read back from any view."""
    c = np.zeros((n, crops, t), dtype=np.uint16)
    c[:, :, 0] = np.arange(n)[:, None]
    c[:, :, 1] = np.arange(crops)[None, :]
    c[:, :, 2:] = (np.arange(n)[:, None, None] + np.arange(crops)[None, :, None] + np.arange(t - 2)) % 997
    return c


def _zarr_store(path, codes, labels, shard, chunk) -> ZarrStore:
    n, crops, t = codes.shape
    g = schema.create_token_group(path, n, crops, t, shard_size=shard, chunk_size=chunk, attrs={"num_classes": 10})
    g[schema.CODES][:] = codes
    g[schema.LABELS][:] = labels
    return ZarrStore(path)


@pytest.fixture(params=["array", "zarr"])
def store_factory(request, tmp_path):
    def make(codes, labels, chunk, shard=None):
        if request.param == "array":
            return ArrayStore(codes, labels, chunk_size=chunk)
        return _zarr_store(tmp_path / f"s{np.random.randint(1 << 30)}.zarr", codes, labels, shard or chunk * 2, chunk)
    return make


def _rows(batch) -> np.ndarray:
    return batch.tokens[:, 0, 0].numpy()


def test_every_sample_once_per_epoch_across_two_ranks(store_factory):
    n, chunk, bs = 128, 8, 8  # 16 chunks, 8 per rank, 64 samples per rank, 8 batches
    codes, labels = _codes(n), (np.arange(n) % 7).astype(np.int32)
    store = store_factory(codes, labels, chunk)
    loaders = [TokenLoader(store, bs, views=2, rank=r, world_size=2, seed=3, buffer_chunks=3) for r in range(2)]
    assert all(ld.batches_per_epoch(e) == 8 for ld in loaders for e in range(3))
    per_epoch = {0: [], 1: []}
    for ld in loaders:
        it = iter(ld)
        for e in range(2):
            for _ in range(8):
                b = next(it)
                rows = _rows(b)
                assert torch.equal(b.labels, torch.from_numpy(labels[rows].astype(np.int64)))
                # every view is a real crop of that row, and the two views differ
                crop = b.tokens[:, :, 1].numpy()
                assert (crop[:, 0] != crop[:, 1]).all()
                assert np.array_equal(b.tokens.numpy(), codes[rows[:, None], crop].astype(np.int64))
                per_epoch[e].append(rows)
        ld.close()
    for e in range(2):
        seen = np.concatenate(per_epoch[e])
        assert sorted(seen.tolist()) == list(range(n)), f"epoch {e}: not every sample exactly once"
    assert not np.array_equal(np.concatenate(per_epoch[0]), np.concatenate(per_epoch[1])), "epochs should reshuffle"
    # ranks are disjoint within an epoch (checked above through exactly-once); and the plan is deterministic
    again = TokenLoader(store, bs, views=2, rank=0, world_size=2, seed=3, buffer_chunks=3)
    first = next(iter(again))
    assert np.array_equal(_rows(first), per_epoch[0][0])
    assert torch.equal(first.tokens, next(iter(TokenLoader(store, bs, views=2, rank=0, world_size=2, seed=3, buffer_chunks=3))).tokens)
    other_seed = next(iter(TokenLoader(store, bs, views=2, rank=0, world_size=2, seed=4, buffer_chunks=3)))
    assert not np.array_equal(_rows(other_seed), per_epoch[0][0])


def test_resume_gives_the_uninterrupted_batches(store_factory):
    n, chunk, bs = 100, 8, 6  # partial last chunk, batches straddle windows and the epoch end
    codes, labels = _codes(n), (np.arange(n) % 5).astype(np.int32)
    store = store_factory(codes, labels, chunk)
    kw = dict(views=2, rank=1, world_size=2, seed=11, buffer_chunks=2)
    ref_loader = TokenLoader(store, bs, **kw)
    per_epoch = ref_loader.batches_per_epoch(0)
    total = per_epoch * 2 + 3
    it = iter(ref_loader)
    ref = [next(it) for _ in range(total)]
    ref_loader.close()
    for k in (0, 1, 5, per_epoch - 1, per_epoch, per_epoch + 2):
        ld = TokenLoader(store, bs, **kw)
        it = iter(ld)
        for _ in range(k):
            next(it)
        state = ld.state_dict()
        ld.close()
        for prefetch in (0, 2):
            resumed = TokenLoader(store, bs, prefetch=prefetch, **kw)
            resumed.load_state_dict(state)
            it2 = iter(resumed)
            for j in range(k, min(k + 4, total)):
                b = next(it2)
                assert torch.equal(b.tokens, ref[j].tokens) and torch.equal(b.labels, ref[j].labels), (k, j, prefetch)
            resumed.close()


def test_resume_reads_only_the_window_at_the_cursor():
    n, chunk = 256, 8
    codes, labels = _codes(n), np.zeros(n, np.int32)

    class Counting(ArrayStore):
        reads = 0

        def read_chunk(self, c, out=None):
            Counting.reads += 1
            return super().read_chunk(c, out)

    store = Counting(codes, labels, chunk_size=chunk)
    ld = TokenLoader(store, 8, buffer_chunks=4, prefetch=0)
    ld.load_state_dict({"epoch": 0, "batch_in_epoch": 20})  # position 160 = window 5 (chunks 20..23)
    next(iter(ld))
    assert Counting.reads <= 8  # the cursor's window and the one read ahead, nothing before them


def test_skipped_rows_are_never_served(store_factory):
    n, chunk = 64, 8
    codes = _codes(n)
    labels = (np.arange(n) % 3).astype(np.int32)
    labels[[1, 5, 17, 40]] = schema.LABEL_SKIPPED
    labels[48:56] = schema.LABEL_SKIPPED  # a whole chunk of bad images
    store = store_factory(codes, labels, chunk)
    ld = TokenLoader(store, 4, views=1, seed=0, prefetch=0)
    valid = int((labels >= 0).sum())
    assert ld.batches_per_epoch() == valid // 4
    it = iter(ld)
    rows = np.concatenate([_rows(next(it)) for _ in range(ld.batches_per_epoch())])
    assert (labels[rows] >= 0).all() and len(set(rows.tolist())) == len(rows)


def test_views_single_and_many():
    codes, labels = _codes(40, crops=10), np.zeros(40, np.int32)
    store = ArrayStore(codes, labels, chunk_size=4)
    b1 = next(iter(TokenLoader(store, 5, views=1)))
    assert b1.tokens.shape == (5, 1, 6) and b1.tokens.dtype == torch.int64 and b1.labels.dtype == torch.int64
    b4 = next(iter(TokenLoader(store, 5, views=4)))
    crops = b4.tokens[:, :, 1].numpy()
    assert all(len(set(r)) == 4 for r in crops.tolist())
    with pytest.raises(ValueError, match="views"):
        TokenLoader(store, 5, views=11)
    with pytest.raises(ValueError, match="ranks"):
        TokenLoader(store, 5, world_size=11)


def test_npz_store_roundtrip(tmp_path):
    codes, labels = _codes(20), np.arange(20, dtype=np.int32) % 4
    save_npz_store(tmp_path / "t.npz", codes, labels, num_classes=4)
    s = open_store(tmp_path / "t.npz")
    assert isinstance(s, ArrayStore) and len(s) == 20 and s.crops == 10 and s.tokens_per_image == 6
    assert s.attrs["num_classes"] == 4 and s.num_classes == 4
    c, lab = s.read(4, 9)
    assert np.array_equal(c, codes[4:9]) and np.array_equal(lab, labels[4:9])


def test_zarr_direct_reads_equal_zarr_reads(tmp_path):
    n, chunk, shard = 75, 8, 16  # partial last chunk and shard
    codes, labels = _codes(n), np.arange(n, dtype=np.int32) % 10
    codes[16:24] = 0  # an all-fill chunk: zarr leaves it out of the shard
    s = _zarr_store(tmp_path / "d.zarr", codes, labels, shard, chunk)
    assert s._direct is not None and s.chunk_size == chunk and s.shard_size == shard
    for c in range(-(-n // chunk)):
        got, lab = s.read_chunk(c)
        assert np.array_equal(got, codes[c * chunk:(c + 1) * chunk]) and np.array_equal(lab, labels[c * chunk:(c + 1) * chunk])
    assert np.array_equal(s.read(3, 30)[0], codes[3:30])  # unaligned: through zarr
    slow = ZarrStore(tmp_path / "d.zarr", direct=False)
    assert slow._direct is None and np.array_equal(slow.read_chunk(9)[0], codes[72:75])
    assert isinstance(open_store(tmp_path / "d.zarr"), ZarrStore)


def test_zarr_store_refuses_incomplete_and_foreign(tmp_path):
    g = schema.create_token_group(tmp_path / "i.zarr", 32, 10, 4, shard_size=16, chunk_size=8, attrs={})
    g[schema.LABELS][:16] = 1
    with pytest.raises(StoreError, match="incomplete: 16 of 32"):
        ZarrStore(tmp_path / "i.zarr")
    assert len(ZarrStore(tmp_path / "i.zarr", allow_incomplete=True)) == 32
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a star-scale token store"):
        ZarrStore(tmp_path / "other.zarr")
    with pytest.raises(FileNotFoundError, match="star-scale tokenize"):
        open_store(tmp_path / "missing.zarr")


def test_default_chunking():
    assert schema.default_chunking(1_281_167, 10, 256) == (4096, 512)
    shard, chunk = schema.default_chunking(512, 10, 64)
    assert chunk == 64 and shard % chunk == 0
    with pytest.raises(ValueError):
        schema.default_chunking(100, 10, 64, shard_size=10, chunk_size=4)


def test_threads_do_not_change_the_batches(store_factory):
    codes, labels = _codes(96), (np.arange(96) % 4).astype(np.int32)
    store = store_factory(codes, labels, 8)
    outs = []
    for prefetch, threads in ((0, 0), (1, 0), (3, 2)):
        ld = TokenLoader(store, 7, views=2, seed=5, buffer_chunks=2, prefetch=prefetch, read_threads=threads)
        it = iter(ld)
        outs.append([next(it) for _ in range(2 * ld.batches_per_epoch() + 1)])
        ld.close()
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)


def test_reader_errors_reach_the_trainer():
    class Broken(ArrayStore):
        def read_chunk(self, c, out=None):
            raise OSError(f"disk gone while reading chunk {c}")

    ld = TokenLoader(Broken(_codes(32), np.zeros(32, np.int32), chunk_size=8), 4)
    with pytest.raises(OSError, match="disk gone"):
        next(iter(ld))

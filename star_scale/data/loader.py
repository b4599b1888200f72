"""Chunk-shuffled, rank-disjoint, resumable batches of token views.

The plan of an epoch is a pure function of (seed, epoch, rank, world size):

1. Chunks (``store.chunk_size`` consecutive rows, the store's read unit) that
   hold at least one valid row (label >= 0) are permuted from (seed, epoch).
2. Rank r takes every world-th chunk of that order: ranks never share a chunk.
3. The rank's chunks are cut into windows of ``buffer_chunks`` chunks; a window
   is read whole (contiguous chunk reads, never per-sample reads) and its valid
   rows are permuted from (seed, epoch, rank, window).  The concatenated
   windows are the rank's sample stream; batch b is stream[b*B : (b+1)*B].
4. Each sample's ``views`` distinct crops are drawn from (seed, epoch, rank, window).

Every rank runs ``batches_per_epoch(epoch)`` batches (the smallest rank's
sample count // batch size), so the few samples beyond that on the larger
ranks are left out of that epoch only (a different few each epoch); within an
epoch no sample is served twice.  When the per-rank counts divide evenly,
every sample is served exactly once per epoch across the ranks.  (The tokenize
job stores rows in a fixed random order, so every chunk already mixes classes.)

The cursor is (epoch, batch_in_epoch).  Resuming recomputes the plan, reads
only the windows from the one holding the cursor's position on (nothing before
it) and continues: the batches equal those of an uninterrupted run.

Threads: one background thread reads and decodes each window (zstd, which
runs without the GIL), and gathers its samples' views, in stream order, into
one int64 array, ``prefetch`` windows ahead; a batch is then a slice of it
(zero-copy), so the iterating thread does almost nothing and hands over cost
one queue operation per window, not per batch.  ``prefetch=0`` reads inline.
``read_threads > 0`` decodes a window's chunks in parallel (for high-latency
file systems or many idle cores).
"""
from __future__ import annotations

import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

_TAG_CHUNKS, _TAG_WINDOW, _TAG_VIEWS = 1, 2, 3


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, views, T) int64
    labels: torch.Tensor  # (B,) int64


@dataclass
class _Window:
    epoch: int
    k: int
    tokens: np.ndarray  # (M, views, T) int64: the window's valid samples in stream order, views picked
    labels: np.ndarray  # (M,) int64, same order


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class TokenLoader:
    def __init__(self, store, batch_size: int, *, views: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0, buffer_chunks: int = 4, prefetch: int = 2, read_threads: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 1 <= views <= store.crops:
            raise ValueError(f"{views} views requested but the store holds {store.crops} crops per image")
        self.store, self.batch_size, self.views = store, int(batch_size), int(views)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.prefetch = max(0, int(prefetch))
        self.read_threads = max(0, int(read_threads))
        labels = np.asarray(store.all_labels() if hasattr(store, "all_labels") else store.read(0, len(store))[1])
        cs = int(store.chunk_size)
        self._cs = cs
        n_chunks = -(-len(store) // cs)
        starts = np.arange(n_chunks) * cs
        self._chunk_valid = np.add.reduceat((labels >= 0).astype(np.int64), starts) if n_chunks else np.zeros(0, np.int64)
        self._chunk_full = self._chunk_valid == np.minimum(cs, len(store) - starts)
        self._chunks = np.flatnonzero(self._chunk_valid > 0)
        if len(self._chunks) < world_size:
            raise ValueError(f"store has {len(self._chunks)} chunks with valid rows, fewer than the {world_size} "
                             f"data-parallel ranks (rebuild it with a smaller --chunk-size)")
        self.epoch, self.batch_in_epoch = 0, 0
        self._cache: dict = {}
        self._stop_event: threading.Event | None = None

    # ---- the epoch plan ----------------------------------------------------
    def _cached(self, key, make):
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def _rank_chunks(self, rank: int, epoch: int) -> np.ndarray:
        def make():
            order = np.random.default_rng([self.seed, _TAG_CHUNKS, epoch]).permutation(self._chunks)
            return order[rank:: self.world_size]
        return self._cached(("chunks", rank, epoch), make)

    def samples_of_rank(self, rank: int, epoch: int = 0) -> int:
        return int(self._chunk_valid[self._rank_chunks(rank, epoch)].sum())

    def batches_per_epoch(self, epoch: int = 0) -> int:
        # Every rank must take the same number of steps; the smallest rank decides.
        return self._cached(("bpe", epoch), lambda: min(self.samples_of_rank(r, epoch) for r in range(self.world_size))
                            // self.batch_size)

    def _windows(self, epoch: int):
        def make():
            chunks = self._rank_chunks(self.rank, epoch)
            windows = [chunks[i: i + self.buffer_chunks] for i in range(0, len(chunks), self.buffer_chunks)]
            starts = np.concatenate([[0], np.cumsum([self._chunk_valid[w].sum() for w in windows])]).astype(np.int64)
            return windows, starts
        return self._cached(("windows", epoch), make)

    def _check_epoch(self, epoch: int) -> int:
        n = self.batches_per_epoch(epoch)
        if n == 0:
            raise ValueError(f"store of {len(self.store)} rows ({int(self._chunk_valid.sum())} valid) cannot fill one "
                             f"batch of {self.batch_size} per rank on {self.world_size} ranks")
        return n

    def _schedule(self, epoch: int, start_batch: int):
        """(epoch, window index) of every window the batches from the cursor on need, in order, forever."""
        while True:
            n = self._check_epoch(epoch)
            if start_batch < n:
                _, starts = self._windows(epoch)
                first = int(np.searchsorted(starts, start_batch * self.batch_size, side="right")) - 1
                last = int(np.searchsorted(starts, n * self.batch_size - 1, side="right")) - 1
                for k in range(first, last + 1):
                    yield epoch, k
            epoch, start_batch = epoch + 1, 0

    def _chunk_rows(self, c: int) -> int:
        return min(self._cs, len(self.store) - c * self._cs)

    def _read_window(self, epoch: int, k: int, pool=None) -> _Window:
        """The window's chunks decoded straight into one buffer; rows with label < 0 dropped."""
        chunks = self._windows(epoch)[0][k]
        sizes = [self._chunk_rows(int(c)) for c in chunks]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        codes = np.empty((offsets[-1], self.store.crops, self.store.tokens_per_image), dtype=np.uint16)

        def read(i):
            c, lo, hi = int(chunks[i]), offsets[i], offsets[i + 1]
            if hasattr(self.store, "read_chunk"):
                return np.asarray(self.store.read_chunk(c, out=codes[lo:hi])[1])
            got, labels = self.store.read(c * self._cs, c * self._cs + sizes[i])  # a minimal store
            codes[lo:hi] = got
            return np.asarray(labels)

        parts = list(pool.map(read, range(len(chunks)))) if pool is not None else [read(i) for i in range(len(chunks))]
        labels = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not self._chunk_full[chunks].all():
            keep = labels >= 0
            codes, labels = codes[keep], labels[keep]
        m, crops = len(labels), self.store.crops
        perm = np.random.default_rng([self.seed, _TAG_WINDOW, epoch, self.rank, k]).permutation(m)
        crop_idx = self._pick_views(epoch, k, m)
        # one flat take over (row, crop) pairs (much cheaper than 2-D fancy indexing), then numpy's
        # uint16 -> int64 cast (~50x faster than torch's)
        flat = (perm[:, None] * crops + crop_idx).ravel()
        tokens = np.take(codes.reshape(-1, codes.shape[-1]), flat, axis=0).reshape(m, self.views, -1).astype(np.int64)
        return _Window(epoch, k, tokens, labels[perm].astype(np.int64))

    def _pick_views(self, epoch: int, k: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _TAG_VIEWS, epoch, self.rank, k])
        crops = self.store.crops
        if self.views == 1:
            return rng.integers(0, crops, size=(n, 1))
        if self.views == 2:  # uniform over ordered pairs of distinct crops
            first = rng.integers(0, crops, size=n)
            return np.stack([first, (first + rng.integers(1, crops, size=n)) % crops], axis=1)
        return np.argsort(rng.random((n, crops)), axis=1)[:, : self.views]

    def _batches(self, epoch: int, start_batch: int, windows):
        """(epoch, b, Batch) from the cursor on, forever; ``windows`` yields the scheduled windows in order."""
        B = self.batch_size
        while True:
            n = self._check_epoch(epoch)
            if start_batch < n:
                _, starts = self._windows(epoch)
                pos = start_batch * B
                w = next(windows)
                assert (w.epoch, w.k) == (epoch, int(np.searchsorted(starts, pos, side="right")) - 1), "window schedule"
                off = pos - int(starts[w.k])
                for b in range(start_batch, n):
                    toks, labs, got = [], [], 0
                    while got < B:
                        if off >= len(w.labels):
                            w, off = next(windows), 0
                            continue
                        take = min(B - got, len(w.labels) - off)
                        toks.append(w.tokens[off: off + take])
                        labs.append(w.labels[off: off + take])
                        got += take
                        off += take
                    tok = toks[0] if len(toks) == 1 else np.concatenate(toks)
                    lab = labs[0] if len(labs) == 1 else np.concatenate(labs)
                    yield epoch, b, Batch(torch.from_numpy(tok), torch.from_numpy(lab))
            epoch, start_batch = epoch + 1, 0

    # ---- iteration ----------------------------------------------------------
    def _reader(self, epoch: int, start_batch: int, q: queue.Queue, stop: threading.Event):
        pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="token-read") if self.read_threads else None
        try:
            for e, k in self._schedule(epoch, start_batch):
                item = self._read_window(e, k, pool)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # hand the error to the consumer
            while not stop.is_set():
                try:
                    q.put(_Failure(e), timeout=0.1)
                    return
                except queue.Full:
                    continue
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _stop(self):
        if self._stop_event is not None:
            self._stop_event.set()
            self._stop_event = None

    def __iter__(self):
        self._stop()  # a new iteration (e.g. after load_state_dict) replaces any running one
        epoch, b = self.epoch, self.batch_in_epoch
        if b >= self.batches_per_epoch(epoch) > 0:
            epoch, b = epoch + 1, 0
        if self.prefetch == 0:
            windows = (self._read_window(e, k) for e, k in self._schedule(epoch, b))
            return self._consume(self._batches(epoch, b, windows), None)
        stop = threading.Event()
        self._stop_event = stop
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        threading.Thread(target=self._reader, args=(epoch, b, q, stop), daemon=True, name="token-loader").start()

        def from_queue():
            while True:
                item = q.get()
                if isinstance(item, _Failure):
                    raise item.error
                yield item

        return self._consume(self._batches(epoch, b, from_queue()), stop)

    def _consume(self, source, stop):
        try:
            for epoch, b, batch in source:
                self.epoch, self.batch_in_epoch = epoch, b + 1
                yield batch
        finally:
            if stop is not None:
                stop.set()
                if self._stop_event is stop:
                    self._stop_event = None

    def close(self) -> None:
        """Stop the background reader (it also stops when the iterator is closed or collected)."""
        self._stop()

    def state_dict(self) -> dict:
        """The cursor after the last batch handed out: all a checkpoint needs."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                warnings.warn(f"loader cursor was saved with {key}={state[key]}, this loader has {key}={getattr(self, key)}: "
                              f"resuming at the same (epoch, batch) but the samples will differ from the original run")
        self._stop()
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

"""The one reading method every token store shares, kept apart so stores import it without importing each other."""
from __future__ import annotations

import numpy as np


class ChunkReads:
    """``read_chunk(i)``: the loader's unit of reading, from a store's ``read`` and ``chunk_size``."""

    def read_chunk(self, chunk: int, out: np.ndarray | None = None):
        cs = self.chunk_size
        return self.read(chunk * cs, min(len(self), (chunk + 1) * cs), out)

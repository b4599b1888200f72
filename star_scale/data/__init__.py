"""Token data: the Zarr store format (schema), stores (store, zarr_store) and the training loader."""
from star_scale.data.loader import Batch, TokenLoader
from star_scale.data.store import ArrayStore, open_store, save_npz_store

__all__ = ["ArrayStore", "Batch", "TokenLoader", "open_store", "save_npz_store"]

"""Stage 1 of lst: run a frozen backbone once and cache its per-layer activations in a Zarr store.

Public API: `extract(ExtractConfig(...))` writes a store; `open_store(path)` reads one back.
Each kind of store is a folder under kinds/, registered once with both of its halves (kinds/registry.py);
what several kinds share lives in text/ and images/, what every kind tells the writer in plan.py
(docs/kinds.md).
"""

from .config import ExtractConfig
from .errors import LstError
from .reader import Batch, SplitReader, StoreReader, open_store
from .writer import extract

__all__ = ["Batch", "ExtractConfig", "LstError", "SplitReader", "StoreReader", "extract", "open_store"]

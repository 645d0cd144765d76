"""Semantic image search: index a photo collection, query it by text, by image or both.

In pipeline order: :mod:`.sources` lists what to index (folders, CSV/TSV, shards) without
decoding; :mod:`.store` keeps items and float16 embeddings in SQLite, committed atomically;
:mod:`.vectors` searches them with faiss (exact, or IVF-PQ / HNSW re-ranked exactly);
:mod:`.build` embeds what is new or changed, resumably, under torchrun too (videos as
segments of a few seconds, :mod:`.video`); :mod:`.index` answers queries; :mod:`.server` serves
them over HTTP with a web page.
"""

from .build import BuildReport, IndexMismatchError, build_index, read_report
from .index import Hit, SearchIndex
from .store import IndexFormatError
from .vectors import ANN_KINDS, VectorIndex

__all__ = ["ANN_KINDS", "BuildReport", "Hit", "IndexFormatError", "IndexMismatchError",
           "SearchIndex", "VectorIndex", "build_index", "read_report"]

"""Milvus as the vector store of an index, for search past one machine (``index build
--vector-store``).

Layering: the index folder stays the source of truth.  Its SQLite database keeps the items,
their metadata and float16 embeddings, the generation and the incremental build exactly as
before; a Milvus collection is a mirror of the committed rows that searches query instead of an
in-process faiss index.  So there is one embedding path (the build's), thumbnails and paths are
served from the folder as before, and switching a folder between the embedded store and Milvus,
or from one collection to another, needs no re-embedding: the next build fills the collection.

The collection holds ``id`` (INT64 primary key: the item id, never reused by SQLite's
AUTOINCREMENT, so an id's vector never changes), ``vector`` (FLOAT_VECTOR: the float16 row made
float32, exactly) and ``generation`` (the build that inserted it), indexed with the inner-product
metric: FLAT (exact, the default) or HNSW (``--ann hnsw``).  A build mirrors its commit
(:func:`sync_collection`, inside the commit's transaction): rows a killed build left (generation
above the committed one, whose ids SQLite may hand out again) are deleted, then the committed
state's rows that the collection lacks are inserted in batches with the new generation.  Searches
of generation G filter ``generation <= G``, so they never see rows of a build that has not
committed.  Once the commit is done, :func:`prune_collection` deletes the ids the new state no
longer holds (removed or changed files); until then a search may meet them, and the index drops
hits that its database no longer holds, as it does for a generation committed during a search.

Milvus Lite (``milvus-lite:PATH.db/COLLECTION``) runs inside the process that opens it and locks
its folder: one process at a time, so a build and a server cannot share it at once (use a Milvus
server or cluster for that).  A token for a server (``user:password`` or an API key) is read from
the environment variable :data:`TOKEN_ENV`, never from the URI, so the index records no secret.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TOKEN_ENV = "MILVUS_TOKEN"
EMBEDDED = "embedded"  # the default backend: rows in the index folder, searched by faiss
INSTALL_HINT = "pip install 'clipforge[milvus]'"
LITE_PREFIX = "milvus-lite:"
SCHEMES = {"milvus": "http", "milvus+https": "https"}
DEFAULT_PORT = 19530
MAX_TOPK = 16384  # Milvus refuses a larger limit
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW"}
_INSERT_ROWS = 4096  # rows per insert: 8 MiB of float32 at 512 dims, far below gRPC's 64 MiB
_ID_BATCH = 16384
_FIELDS = ("id", "vector", "generation")
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_HELP = ("milvus://HOST[:PORT]/COLLECTION (a Milvus server or cluster; milvus+https:// for TLS; "
         f"token from ${TOKEN_ENV}), {LITE_PREFIX}PATH.db/COLLECTION (Milvus Lite) or "
         f"{EMBEDDED}")


class MilvusError(OSError):
    """Milvus cannot be reached, or refuses what the index needs of it."""


@dataclass(frozen=True)
class MilvusBackend:
    """Where an index's vectors live: ``uri`` as :class:`pymilvus.MilvusClient` takes it (an
    http(s) address, or a Milvus Lite ``.db`` path) and a ``collection``.  ``text`` is what the
    index records and messages show: the URI without user or password."""

    uri: str
    collection: str

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://"))

    @property
    def text(self) -> str:
        if self.lite:
            return f"{LITE_PREFIX}{self.uri}/{self.collection}"
        scheme, rest = self.uri.split("://", 1)
        return f"milvus{'+https' if scheme == 'https' else ''}://{rest}/{self.collection}"


def parse_backend(value: str) -> MilvusBackend | None:
    """The backend a ``--vector-store`` value names; None for :data:`EMBEDDED`.  ValueError naming
    the value and the forms allowed; a user or password in it is refused (use the token
    variable).  A Milvus Lite path is made absolute (the index records where it is)."""
    value = value.strip()
    if value == EMBEDDED:
        return None
    if value.startswith(LITE_PREFIX):
        path, _, collection = value[len(LITE_PREFIX):].rpartition("/")
        if not path.endswith(".db"):
            raise ValueError(f"backend {value!r}: Milvus Lite needs a file name ending in .db "
                             f"and a collection, as {LITE_PREFIX}PATH.db/COLLECTION")
        return MilvusBackend(str(Path(path).absolute()), _collection(value, collection))
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"backend {value!r} is not one of {_HELP}")
    address, _, collection = rest.partition("/")
    if "@" in address:
        raise ValueError(f"backend {_without_user(value)!r}: put no user or password in the "
                         f"URI (the index records it); set {TOKEN_ENV}=user:password instead")
    host, _, port = address.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"backend {value!r}: expected {scheme}://HOST[:PORT]/COLLECTION")
    uri = f"{SCHEMES[scheme]}://{host}:{port or DEFAULT_PORT}"
    return MilvusBackend(uri, _collection(value, collection))


def _collection(value: str, name: str) -> str:
    if not _COLLECTION_NAME.fullmatch(name):
        raise ValueError(f"backend {value!r}: the collection name {name!r} must start with a "
                         "letter or '_' and hold only letters, digits and '_' (as Milvus asks)")
    return name


def _without_user(value: str) -> str:
    return re.sub(r"://[^/@]*@", "://", value)


# ---------------------------------------------------------------------- connecting
_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()


def connect(backend: MilvusBackend) -> Any:
    """A :class:`pymilvus.MilvusClient` for ``backend``, shared by the threads of this process.

    ImportError naming the extra to install; :class:`MilvusError` naming the backend (never
    the token) and what to check when it cannot be reached."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ImportError(f"the Milvus backend {backend.text} needs pymilvus (and milvus-lite "
                          f"for a .db file): {INSTALL_HINT}") from None
    token = os.environ.get(TOKEN_ENV, "")
    key = (backend.uri, token)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            try:
                client = MilvusClient(uri=backend.uri, token=token, timeout=30)
            except Exception as exc:
                raise MilvusError(_unreachable(backend, exc)) from None
            _clients[key] = client
    return client


def _unreachable(backend: MilvusBackend, exc: Exception) -> str:
    reason = _reason(exc)
    if backend.lite:
        return (f"Milvus Lite at {backend.uri} cannot be opened ({reason}): is another process "
                "using it? Milvus Lite serves one process at a time (stop the other, or use a "
                "Milvus server)")
    return (f"Milvus at {backend.text} cannot be reached ({reason}): check that the server is "
            f"running and reachable from here, and {TOKEN_ENV} if it needs a token")


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).strip().rstrip(".")


def _call(backend: MilvusBackend, what: str, action: Callable[[], Any]) -> Any:
    """``action()``, its Milvus errors become :class:`MilvusError` naming the backend."""
    try:
        return action()
    except MilvusError:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("pymilvus", "grpc", "milvus_lite"):
            raise
        raise MilvusError(f"Milvus at {backend.text}: {what} failed: {_reason(exc)}") from None


# ---------------------------------------------------------------------- the build's side
def index_type(kind: str) -> str:
    """The Milvus index type of an ``--ann`` kind; ValueError for one it has no peer for."""
    if kind not in INDEX_TYPES:
        raise ValueError(f"--ann {kind} has no Milvus peer here: with a Milvus backend use "
                         f"{' or '.join(INDEX_TYPES)}")
    return INDEX_TYPES[kind]


def sync_collection(backend: MilvusBackend, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                    dim: int, kind: str, params: dict[str, Any], committed: int,
                    generation: int) -> dict[str, int]:
    """Make the collection hold every row of ``chunks`` (the state about to be committed as
    ``generation``; ``committed``: the generation readers see now), creating it if missing.

    Rows of uncommitted generations are deleted first; rows already there are kept (an id's
    vector never changes); the rest are inserted with ``generation``.  Rows the new state drops
    are left for :func:`prune_collection`, after the commit, so readers of ``committed`` keep
    them.  Returns counts: inserted, dropped (left by a killed build)."""
    client = connect(backend)
    _ensure_collection(client, backend, dim, kind, params)
    name = backend.collection
    dropped = _call(backend, "deleting rows of an unfinished build", lambda: client.delete(
        name, filter=f"generation > {int(committed)}"))
    present = set(_ids(client, backend))
    inserted = 0
    for ids, rows in chunks:
        new = ~np.isin(ids, np.fromiter(present, np.int64, len(present)))
        for start in range(0, int(new.sum()), _INSERT_ROWS):
            batch = slice(start, start + _INSERT_ROWS)
            data = [{"id": int(i), "vector": row, "generation": generation}
                    for i, row in zip(ids[new][batch], rows[new][batch].astype(np.float32))]
            _call(backend, "inserting rows", lambda data=data: client.insert(name, data))
            inserted += len(data)
    _call(backend, "flushing", lambda: client.flush(name))
    return {"inserted": inserted, "dropped": _count(dropped)}


def prune_collection(backend: MilvusBackend, keep: np.ndarray) -> int:
    """Delete the rows whose ids are not in ``keep`` (the committed state's ids); returns how
    many.  Run after the commit, so that a reader of the previous generation kept them."""
    client = connect(backend)
    gone = np.setdiff1d(np.fromiter(_ids(client, backend), np.int64), keep)
    for start in range(0, len(gone), _ID_BATCH):
        batch = [int(i) for i in gone[start:start + _ID_BATCH]]
        _call(backend, "deleting removed rows",
              lambda batch=batch: client.delete(backend.collection, ids=batch))
    if len(gone):
        _call(backend, "flushing", lambda: client.flush(backend.collection))
    return len(gone)


def _count(result: Any) -> int:
    if isinstance(result, dict):
        return int(result.get("delete_count", 0))
    return len(result) if isinstance(result, list) else 0


def _ids(client: Any, backend: MilvusBackend) -> Iterator[int]:
    """Every id in the collection, a batch at a time."""
    it = _call(backend, "listing ids", lambda: client.query_iterator(
        backend.collection, batch_size=_ID_BATCH, filter="", output_fields=["id"]))
    try:
        while batch := _call(backend, "listing ids", it.next):
            yield from (row["id"] for row in batch)
    finally:
        it.close()


def _ensure_collection(client: Any, backend: MilvusBackend, dim: int, kind: str,
                       params: dict[str, Any]) -> None:
    """Create the collection if missing; else check it is one of ours with ``dim``, and give
    it the index type of ``kind`` if it has another."""
    name, wanted = backend.collection, index_type(kind)
    if not _call(backend, "looking up the collection", lambda: client.has_collection(name)):
        log.info("creating Milvus collection %s (%d dims, %s, inner product)", backend.text,
                 dim, wanted)
        _call(backend, "creating the collection", lambda: client.create_collection(
            name, schema=_schema(client, dim), index_params=_index_params(client, kind, params),
            consistency_level="Strong"))
        return
    check_collection(client, backend, dim)
    have = _call(backend, "reading the index", lambda: client.describe_index(name, "vector"))
    if (have or {}).get("index_type") != wanted:
        log.info("%s: replacing its %s index with %s", backend.text,
                 (have or {}).get("index_type"), wanted)
        _call(backend, "replacing the index", lambda: (
            client.release_collection(name), client.drop_index(name, "vector"),
            client.create_index(name, _index_params(client, kind, params))))
    load(client, backend)


def _schema(client: Any, dim: int) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("generation", DataType.INT64)
    return schema


def _index_params(client: Any, kind: str, params: dict[str, Any]) -> Any:
    from .vectors import DEFAULTS

    p = {**DEFAULTS, **params}
    build = {"M": p["hnsw_m"], "efConstruction": p["ef_construction"]} if kind == "hnsw" else {}
    index_params = client.prepare_index_params()
    index_params.add_index("vector", index_type=index_type(kind), metric_type="IP",
                           params=build)
    return index_params


def load(client: Any, backend: MilvusBackend) -> None:
    """Load the collection for search unless it is loaded: loading it again would ask for one
    replica, and Milvus refuses to change the replicas an operator loaded it with."""
    name = backend.collection
    state = _call(backend, "reading the load state", lambda: client.get_load_state(name))
    if getattr(state.get("state"), "name", None) != "Loaded":  # pymilvus's LoadState
        _call(backend, "loading the collection", lambda: client.load_collection(name))


def check_collection(client: Any, backend: MilvusBackend, dim: int) -> None:
    """MilvusError unless the collection exists with our fields and ``dim``-d vectors."""
    name = backend.collection
    if not _call(backend, "looking up the collection", lambda: client.has_collection(name)):
        raise MilvusError(f"Milvus at {backend.text} has no collection {name!r}: run "
                          "`clipforge index build SOURCE --out INDEX --vector-store "
                          f"{backend.text}` to fill it")
    fields = {f["name"]: f for f in _call(backend, "describing the collection",
                                          lambda: client.describe_collection(name))["fields"]}
    found = int((fields.get("vector") or {}).get("params", {}).get("dim", 0) or 0)
    if set(fields) != set(_FIELDS):
        raise MilvusError(f"the collection {name!r} at {backend.text} has fields "
                          f"{sorted(fields)}, not those of a clipforge index {list(_FIELDS)}: "
                          "name another collection")
    if found != dim:
        raise MilvusError(f"the collection {name!r} at {backend.text} holds {found}-d vectors "
                          f"but the index's model makes {dim}-d ones: name another collection, "
                          "or drop this one")


# ---------------------------------------------------------------------- the reader's side
class MilvusVectors:
    """The vectors of one committed generation, searched in Milvus; the interface of
    :class:`~clipforge.search.vectors.VectorIndex` that :class:`SearchIndex` uses."""

    kind = "milvus"

    def __init__(self, backend: MilvusBackend, dim: int, count: int, generation: int,
                 ann: str = "flat", params: dict[str, Any] | None = None) -> None:
        """Use :meth:`open`."""
        self.backend, self._dim, self._count = backend, dim, count
        self.generation, self.ann, self.params = generation, ann, dict(params or {})

    @classmethod
    def open(cls, backend: MilvusBackend, dim: int, count: int, generation: int,
             ann: str = "flat", params: dict[str, Any] | None = None) -> MilvusVectors:
        """Connect, check the collection (exists, ours, ``dim``) and load it for search."""
        client = connect(backend)
        check_collection(client, backend, dim)
        load(client, backend)
        return cls(backend, dim, count, generation, ann, params)

    def __len__(self) -> int:
        return self._count

    @property
    def dim(self) -> int:
        return self._dim

    def search(self, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product, as :meth:`VectorIndex.search` gives them: (Q, k) float32
        scores and int64 ids, best first, ties by ascending id, missing results -inf and -1.
        At most :data:`MAX_TOPK` are fetched (Milvus's limit)."""
        q = np.atleast_2d(np.asarray(queries, np.float32))
        if q.ndim != 2 or q.shape[1] != self._dim:
            raise ValueError(f"queries must be (Q, {self._dim}) or ({self._dim},), got "
                             f"{np.shape(queries)}")
        k = int(k)
        limit = min(k, MAX_TOPK)
        found = _call(self.backend, "searching", lambda: connect(self.backend).search(
            self.backend.collection, data=list(q), limit=limit, filter=self._filter(exclude),
            output_fields=[], search_params=self._search_params(limit),
            consistency_level="Strong"))
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for row, hits in enumerate(found):
            ranked = sorted((-float(h["distance"]), int(h["id"])) for h in hits)[:k]
            scores[row, :len(ranked)] = [-s for s, _ in ranked]
            ids[row, :len(ranked)] = [i for _, i in ranked]
        return scores, ids

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Stored rows of ``ids`` as float32, shape ``ids.shape + (d,)``; KeyError if absent."""
        ids = np.asarray(ids, np.int64)
        wanted = [int(i) for i in np.unique(ids)]
        got = _call(self.backend, "reading rows", lambda: connect(self.backend).get(
            self.backend.collection, ids=wanted, output_fields=["vector", "generation"]))
        found = {int(r["id"]): r["vector"] for r in got
                 if int(r["generation"]) <= self.generation}
        missing = [i for i in ids.ravel() if int(i) not in found]
        if missing:
            raise KeyError(f"id {int(missing[0])} is not in the index")
        out = np.array([found[int(i)] for i in ids.ravel()], np.float32)
        return out.reshape(*ids.shape, self._dim)

    def _filter(self, exclude: np.ndarray | None) -> str:
        where = f"generation <= {int(self.generation)}"
        if exclude is not None and len(exclude):
            where += f" and id not in [{', '.join(str(int(i)) for i in np.ravel(exclude))}]"
        return where

    def _search_params(self, limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.ann == "hnsw":
            from .vectors import DEFAULTS

            ef = {**DEFAULTS, **self.params}["ef_search"]
            params["params"] = {"ef": max(int(ef), limit)}
        return params


"""The on-disk index: one SQLite database of items and their float16 embeddings.

Layout of an index directory::

    index.sqlite          info (model, weights fingerprint, generation...), items, failures
    staging/rank-N.sqlite embeddings a build has finished but not yet committed (one per rank)
    ann-G.faiss           the approximate-search structure of generation G (IVF-PQ or HNSW)
    ondisk-G.*            generation G's rows, ids and IVF lists as memory-mapped files, when
                          they do not fit the memory budget (vectors.py, build.py)

With a Milvus backend (milvus.py) the database stays as it is, and a Milvus collection mirrors
its committed rows for searches; ``info`` records the backend URI (never a token).

Why SQLite: a commit is one transaction, so a reader sees the old state or the new one, never
half of it, even while a build runs beside a server (write-ahead logging lets readers go on
during the write).  A build stages each finished batch in its own rank's staging file, committed
batch by batch, so a killed build resumes without redoing them; only the final merge into
``items`` changes what searches see, and it bumps ``generation`` so readers know to reload.
Files a generation needs beside the database (``ondisk-G.*``) are written inside that
transaction, before it commits, so no reader ever sees a generation without them.

A video's segments are items of their own (``video.mp4#t=0,5``, see :mod:`.sources`), but the
scan knows the video file only: wherever items are matched with scanned entries (their stamps,
the commit), a segment answers for its video (:func:`~.sources.entry_key`), so a changed or
deleted video takes all its segments with it.  A video's segments are staged in one
transaction, so a build killed in the middle of a video leaves none of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import Entry, entry_key

FORMAT_VERSION = "1"
DB_NAME = "index.sqlite"
STAGING_DIR = "staging"

_ITEM_COLUMNS = ("key", "path", "member", "offset", "length", "size", "mtime_ns", "caption",
                 "extra", "width", "height", "embedding")
# Text columns that may hold a file name, hence text that is not valid UTF-8 (see to_db).
_NAME_COLUMNS = ("key", "path", "member", "reason")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE, path TEXT NOT NULL, member TEXT, offset INTEGER, length INTEGER,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, caption TEXT, extra TEXT,
    width INTEGER, height INTEGER, embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, reason TEXT NOT NULL);
"""
# The scanned entry's key of an item row of table {t}: a video segment's (member "t=...", no
# byte span) is its video's path (the SQL form of sources.entry_key).
_ENTRY_KEY_SQL = ("CASE WHEN {t}.offset IS NULL AND substr({t}.member, 1, 2) = 't=' "
                  "THEN {t}.path ELSE {t}.key END")
_STAGING_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS done (
    key TEXT PRIMARY KEY, path TEXT NOT NULL, member TEXT, offset INTEGER, length INTEGER,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, caption TEXT, extra TEXT,
    width INTEGER, height INTEGER, embedding BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS failed (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, reason TEXT NOT NULL);
"""


class IndexFormatError(ValueError):
    """A directory is not a clipforge index, or one this version cannot read."""


def to_db(value: object) -> object:
    """A value as SQLite stores it: text that is valid UTF-8 as TEXT, anything else unchanged,
    except a ``str`` that cannot be UTF-8, which is stored as the BLOB of its exact bytes.

    File names on POSIX are bytes: ``os.fsdecode`` turns ``b"caf\\xe9.jpg"`` (Latin-1) into
    ``"caf\\udce9.jpg"``, which SQLite (UTF-8 only) refuses.  Stored as ``os.fsencode``'s bytes,
    such a name keeps its exact bytes, and since every valid name is stored as TEXT and every
    other one as a BLOB, two names never collide: equality and UNIQUE work on either.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value)
    return value


def from_db(value: object) -> object:
    """The inverse of :func:`to_db` for a text column: a BLOB becomes ``os.fsdecode``'s str."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _entry_key(row: Sequence[object]) -> str:
    """:func:`~.sources.entry_key` of a row that starts key, path, member, offset."""
    return entry_key(from_db(row[0]), from_db(row[1]), from_db(row[2]), row[3])


def _row_to_db(row: Sequence[object], columns: Sequence[str]) -> tuple:
    return tuple(to_db(v) if c in _NAME_COLUMNS else v for v, c in zip(row, columns))


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with write-ahead logging."""
    con = sqlite3.connect(path, isolation_level=None, timeout=60.0)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


@contextlib.contextmanager
def transaction(con: sqlite3.Connection, mode: str = "") -> Iterator[sqlite3.Connection]:
    """BEGIN [IMMEDIATE] ... COMMIT, rolled back on any error."""
    con.execute(f"BEGIN {mode}")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@dataclass(frozen=True)
class Snapshot:
    """Everything a search needs from one committed generation, read in one transaction."""

    generation: int
    ids: np.ndarray  # (N,) int64, ascending
    vectors: np.ndarray  # (N, d) float16, unit norm
    info: dict[str, str]


@dataclass(frozen=True)
class Head:
    """The generation, info and item count of the committed state, without the rows."""

    generation: int
    info: dict[str, str]
    count: int


class Store:
    """The items database of one index directory."""

    def __init__(self, directory: str | Path, *, create: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if not self.path.is_file():
            if not create:
                raise FileNotFoundError(
                    f"no clipforge index at {self.directory} (no {DB_NAME}); build one with "
                    f"`clipforge index build SOURCE --out {self.directory}`")
            self.directory.mkdir(parents=True, exist_ok=True)
        self.con = connect(self.path)
        if create:
            self.con.executescript(_SCHEMA)
        try:
            version = self.info().get("format_version")
        except sqlite3.DatabaseError as exc:
            raise IndexFormatError(f"{self.path} is not a clipforge index database: {exc}"
                                   ) from None
        if version not in (None, FORMAT_VERSION):
            raise IndexFormatError(f"{self.path} has index format {version}; this clipforge "
                                   f"reads format {FORMAT_VERSION}: rebuild the index")

    def close(self) -> None:
        self.con.close()

    # ----------------------------------------------------------------- info

    def info(self) -> dict[str, str]:
        return {k: from_db(v) for k, v in self.con.execute("SELECT key, value FROM info")}

    def set_info(self, values: dict[str, object]) -> None:
        with transaction(self.con, "IMMEDIATE"):
            self.con.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                                 [(k, to_db(str(v))) for k, v in values.items()])

    def generation(self) -> int:
        row = self.con.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------- reading

    def stamps(self) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        """(key -> (size, mtime) of indexed entries, the same for entries that failed); a
        video's segments answer under the video's key."""
        items = {_entry_key(row): (row[4], row[5]) for row in self.con.execute(
            "SELECT key, path, member, offset, size, mtime_ns FROM items")}
        failed = {from_db(k): (s, m) for k, s, m in
                  self.con.execute("SELECT key, size, mtime_ns FROM failures")}
        return items, failed

    def snapshot(self) -> Snapshot:
        """The ids and vectors of the committed state, consistent with its generation."""
        with transaction(self.con):
            info = self.info()
            rows = self.con.execute("SELECT id, embedding FROM items ORDER BY id").fetchall()
        dim = int(info.get("embed_dim", 0))
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vectors = (np.frombuffer(b"".join(r[1] for r in rows), np.float16).reshape(-1, dim)
                   if rows else np.zeros((0, dim), np.float16))
        return Snapshot(int(info.get("generation", 0)), ids, vectors, info)

    def head(self) -> Head:
        """The committed state's generation, info and count, read in one transaction."""
        with transaction(self.con):
            info = self.info()
            count = self.count()
        return Head(int(info.get("generation", 0)), info, count)

    def row_chunks(self, dim: int, size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float16 rows) of the items in ascending id order, ``size`` at a time, as this
        connection sees them (inside :meth:`commit`: the state about to be committed)."""
        cursor = self.con.execute("SELECT id, embedding FROM items ORDER BY id")
        while rows := cursor.fetchmany(size):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            yield ids, np.frombuffer(b"".join(r[1] for r in rows), np.float16).reshape(-1, dim)

    def items(self, ids: Sequence[int]) -> dict[int, dict[str, object]]:
        """Metadata rows (no embedding) by id, as dicts by column; ids that no longer exist are
        absent.  Names are str as ``os.fsdecode`` gives them (see :func:`to_db`)."""
        if not ids:
            return {}
        cursor = self.con.cursor()
        cursor.row_factory = sqlite3.Row
        marks = ",".join("?" * len(ids))
        rows = cursor.execute(
            "SELECT id, key, path, member, offset, length, size, mtime_ns, caption, extra, "
            f"width, height FROM items WHERE id IN ({marks})", [int(i) for i in ids])
        return {row["id"]: {k: from_db(row[k]) if k in _NAME_COLUMNS else row[k]
                            for k in row.keys()} for row in rows}

    def paths(self) -> list[str]:
        """The distinct files of the items (a shard once, however many members it holds)."""
        return [from_db(p) for (p,) in self.con.execute("SELECT DISTINCT path FROM items")]

    def failures(self) -> list[tuple[str, str]]:
        rows = self.con.execute("SELECT key, reason FROM failures ORDER BY key")
        return sorted((from_db(k), from_db(r)) for k, r in rows)

    def ids(self) -> np.ndarray:
        """The item ids (int64, ascending), without their rows."""
        return np.array([i for (i,) in self.con.execute("SELECT id FROM items ORDER BY id")],
                        np.int64)

    def count(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    # ----------------------------------------------------------------- the commit

    def commit(self, scan: Sequence[Entry], staging: Iterable[Path], info: dict[str, object],
               prepare: Callable[[int], dict[str, object]] | None = None) -> dict[str, int]:
        """Make the scanned set the index's state, in one transaction.

        Items whose file is gone or changed are dropped; staged embeddings of scanned items
        (with the scanned size and time) are added, replacing whatever the index held for the
        same entry (a video embedded again with other options loses its old segments);
        failures are those of the current files.  Only ``staging`` files are merged: the
        caller picks those made with its model (:func:`staging_files`).
        ``prepare(generation)``, if given, runs inside the transaction once the items are
        merged (:meth:`row_chunks` reads them) and before the commit: it writes the files the
        new generation needs and returns more info to record with it.  Returns counts: added,
        removed, failed, total, generation.
        """
        stamps = {e.key: e.stamp for e in scan}
        con = self.con
        with transaction(con, "IMMEDIATE"):
            con.execute("CREATE TEMP TABLE IF NOT EXISTS scan "
                        "(key TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER)")
            con.execute("DELETE FROM temp.scan")
            con.executemany("INSERT INTO temp.scan VALUES (?, ?, ?)",
                            [(to_db(k), s, m) for k, (s, m) in stamps.items()])
            current = ("EXISTS (SELECT 1 FROM temp.scan s WHERE s.key = {key} "
                       "AND s.size = {t}.size AND s.mtime_ns = {t}.mtime_ns)")
            entry = _ENTRY_KEY_SQL.format(t="items")
            removed = con.execute("DELETE FROM items WHERE NOT "
                                  + current.format(t="items", key=entry)).rowcount
            con.execute("DELETE FROM failures WHERE NOT "
                        + current.format(t="failures", key="failures.key"))
            staging = list(staging)
            con.execute("CREATE TEMP TABLE IF NOT EXISTS restaged (key TEXT PRIMARY KEY)")
            con.execute("DELETE FROM temp.restaged")
            con.executemany("INSERT OR IGNORE INTO temp.restaged VALUES (?)",
                            [(to_db(k),) for k in _staged_entries(staging, stamps)])
            removed += con.execute(f"DELETE FROM items WHERE {entry} IN "
                                   "(SELECT key FROM temp.restaged)").rowcount
            before = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            columns = ", ".join(_ITEM_COLUMNS)
            marks = ", ".join("?" * len(_ITEM_COLUMNS))
            for path in staging:
                stage = sqlite3.connect(path)
                try:
                    for row in stage.execute(f"SELECT {columns} FROM done"):
                        if stamps.get(_entry_key(row)) == (row[5], row[6]):
                            con.execute(f"INSERT OR IGNORE INTO items ({columns}) VALUES "
                                        f"({marks})", row)
                    for key, size, mtime, reason in stage.execute("SELECT * FROM failed"):
                        if stamps.get(from_db(key)) == (size, mtime):
                            con.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)",
                                        (key, size, mtime, reason))
                finally:
                    stage.close()
            con.execute("DELETE FROM failures WHERE key IN "
                        f"(SELECT {_ENTRY_KEY_SQL.format(t='items')} FROM items)")
            total = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            generation = self.generation() + 1
            if prepare is not None:
                info = {**info, **prepare(generation)}
            values = {**info, "generation": generation, "updated": time.time()}
            con.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                            [(k, to_db(str(v))) for k, v in values.items()])
            failed = con.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
            con.execute("DROP TABLE temp.scan")
            con.execute("DROP TABLE temp.restaged")
        return {"added": total - before, "removed": removed, "failed": failed, "total": total,
                "generation": generation}


class Staging:
    """One rank's finished-but-uncommitted embeddings: a batch is durable once :meth:`add`
    returns, so a killed build loses at most the batch in flight."""

    def __init__(self, path: Path, fingerprint: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.con = connect(path)
        self.con.executescript(_STAGING_SCHEMA)
        row = self.con.execute("SELECT value FROM info WHERE key = 'fingerprint'").fetchone()
        if row and row[0] != fingerprint:  # left by a build with another model: useless here
            with transaction(self.con, "IMMEDIATE"):
                self.con.execute("DELETE FROM done")
                self.con.execute("DELETE FROM failed")
        self.con.execute("INSERT OR REPLACE INTO info VALUES ('fingerprint', ?)", (fingerprint,))

    def add(self, done: Sequence[tuple], failed: Sequence[tuple[str, int, int, str]]) -> None:
        """``done`` rows in :data:`_ITEM_COLUMNS` order; ``failed`` as (key, size, mtime, why).
        Names that are not valid UTF-8 are stored as their bytes (:func:`to_db`)."""
        marks = ", ".join("?" * len(_ITEM_COLUMNS))
        done = [_row_to_db(row, _ITEM_COLUMNS) for row in done]
        failed = [_row_to_db(row, ("key", "size", "mtime_ns", "reason")) for row in failed]
        with transaction(self.con, "IMMEDIATE"):
            self.con.executemany(f"INSERT OR REPLACE INTO done ({', '.join(_ITEM_COLUMNS)}) "
                                 f"VALUES ({marks})", done)
            self.con.executemany("INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?)", failed)

    def close(self) -> None:
        self.con.close()


def staging_files(directory: Path, fingerprint: str | None = None) -> list[Path]:
    """The ranks' staging files; with ``fingerprint``, only those made with it (a file left
    by an earlier build with another model or other video options is not merged)."""
    paths = sorted((directory / STAGING_DIR).glob("rank-*.sqlite"))
    return paths if fingerprint is None else [p for p in paths
                                              if _staged_with(p) == fingerprint]


def _staged_with(path: Path) -> str | None:
    """The fingerprint a staging file records (None if it cannot be read)."""
    con = sqlite3.connect(path)
    try:
        row = con.execute("SELECT value FROM info WHERE key = 'fingerprint'").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        con.close()
    return row[0] if row else None


def _staged_entries(staging: Iterable[Path], stamps: dict[str, tuple[int, int]]) -> set[str]:
    """The entry keys with a staged result (embedded or failed) for their scanned file."""
    found: set[str] = set()
    for path in staging:
        con = sqlite3.connect(path)
        try:
            for row in con.execute("SELECT key, path, member, offset, size, mtime_ns FROM done"):
                key = _entry_key(row)
                if stamps.get(key) == (row[4], row[5]):
                    found.add(key)
            for key, size, mtime in con.execute("SELECT key, size, mtime_ns FROM failed"):
                if stamps.get(from_db(key)) == (size, mtime):
                    found.add(from_db(key))
        finally:
            con.close()
    return found


def staged_stamps(directory: Path, fingerprint: str) -> dict[str, tuple[int, int]]:
    """key -> (size, mtime) of everything staged (done or failed) by any rank of an earlier,
    unfinished build with the same model, so a resumed build skips it."""
    stamps: dict[str, tuple[int, int]] = {}
    for path in staging_files(directory):
        con = sqlite3.connect(path)
        try:
            row = con.execute("SELECT value FROM info WHERE key = 'fingerprint'").fetchone()
            if not row or row[0] != fingerprint:
                continue
            stamps.update({_entry_key(r): (r[4], r[5]) for r in con.execute(
                "SELECT key, path, member, offset, size, mtime_ns FROM done")})
            stamps.update({from_db(k): (s, m) for k, s, m in
                           con.execute("SELECT key, size, mtime_ns FROM failed")})
        except sqlite3.DatabaseError:  # a staging file cut short: its batches are redone
            continue
        finally:
            con.close()
    return stamps


def clear_staging(directory: Path) -> None:
    for path in staging_files(directory):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(path) + suffix).unlink()


def item_json(row: dict[str, object]) -> dict[str, object]:
    """The metadata of one item as plain values (CSV columns decoded)."""
    out = {k: row[k] for k in row.keys() if k not in ("extra", "offset", "length")}
    out["extra"] = json.loads(row["extra"]) if row["extra"] else None
    return out

"""Writing files so that a crash never leaves half a result (write beside, then rename), and
reading users' text files strictly as UTF-8."""

from __future__ import annotations

import codecs
import contextlib
import errno
import fnmatch
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

# The list of what a directory write put in its folder: the only files a later write may
# replace there (see :func:`atomic_directory`).
DIRECTORY_MANIFEST = ".clipforge-manifest.json"
MANIFEST_FORMAT = "clipforge-directory"
# How many foreign names a refusal lists before "and N more".
FOREIGN_SHOWN = 8
# Tries at a free random name for a temporary file or folder before giving up.
TEMP_NAME_TRIES = 100
# What full-disk and over-quota errors say when a library reports them without an errno
# (safetensors: "No space left on device (os error 28)", SQLite: "database or disk is full").
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "database or disk is full",
                    "os error 28", "os error 122")


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full.  The message names the
    destination and says that what was there before is unchanged."""

    def __init__(self, destination: str | Path, cause: BaseException, kept: str | None = None):
        root = _disk_full_cause(cause) or cause
        if isinstance(root, DiskFullError):  # re-raised for a wider destination
            detail = root.detail
        elif isinstance(root, OSError) and root.strerror:
            detail = root.strerror
        else:
            detail = str(root)
        self.destination, self.detail = destination, " ".join(detail.split())
        super().__init__(errno.ENOSPC,
                         disk_full_message(destination, self.detail, kept or DISK_FULL_KEPT))

    def __str__(self) -> str:
        return str(self.strerror)


DISK_FULL_KEPT = ("nothing was changed there: free some space, or choose a destination on "
                  "another disk, and run again")


def disk_full_message(destination: str | Path, detail: str, kept: str = DISK_FULL_KEPT) -> str:
    """The one line a user reads when writing ``destination`` filled the disk; ``kept`` says
    what state was left and what to do."""
    detail = " ".join(str(detail).split())
    return f"cannot write {destination}: the disk is full ({detail}); {kept}"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or quota is full:
    an ``OSError`` with ENOSPC/EDQUOT, or a library's error that says so only in its text
    (torch.save's "unexpected pos" error hides the OSError in its context)."""
    return _disk_full_cause(exc) is not None


def _disk_full_cause(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says the disk is full, or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return current
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return current
        if any(text in str(current).lower() for text in _DISK_FULL_TEXTS):
            return current
        current = current.__cause__ or current.__context__
    return None


def _beside(path: Path, create: Callable[[Path], None]) -> Path:
    """Create a new temporary entry named ``.<name>.<random>.tmp`` beside ``path``.

    Unlike ``tempfile.mkstemp``/``mkdtemp`` (0600 and 0700), ``create`` makes it with the mode
    a plain ``open()``/``mkdir()`` would: 0666 or 0777 less the umask (and the folder's default
    ACL), so the renamed result looks like its siblings.  No need to read the umask, which is
    process-wide and cannot be read without changing it."""
    for _ in range(TEMP_NAME_TRIES):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name beside {path} after {TEMP_NAME_TRIES} tries")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_folder(path: Path) -> None:
    os.mkdir(path, 0o777)


def _plain_modes(root: Path, folder_mode: int) -> None:
    """Give every file under ``root`` the mode a plain ``open()`` would, ``folder_mode``
    (0777 less the umask) without execute bits, and every folder ``folder_mode``: libraries
    that write through their own temporary file (safetensors) leave 0600 behind."""
    file_mode = folder_mode & 0o666
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(current, name)
            if not os.path.islink(path):  # a link's target is not ours to change
                os.chmod(path, folder_mode if name in dirs else file_mode)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces ``path`` atomically.
    A full disk raises :class:`DiskFullError` naming ``path``, which keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _beside(path, _new_file)
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        os.chmod(tmp, mode)  # a writer may have put its own (0600) file in its place
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path, exc) from exc
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | Path, marker: str,
                     writes: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it takes the place of ``path`` (old one removed).

    Readers see either the complete old folder or the complete new one, never a mix.  The new
    folder gets a :data:`DIRECTORY_MANIFEST` listing every file and folder written into it.  An
    existing non-empty folder is replaced only if all it holds is clipforge's (see
    :func:`check_replaceable`), so no destination can swallow a user's own files.  ``marker``
    is a file this writer always writes and ``writes`` the names (glob patterns) of all it may
    write: they recognise a folder written before manifests existed, or files clipforge's own
    tools add to an existing folder later.  A full disk raises :class:`DiskFullError`.
    """
    path = Path(path).resolve()
    check_replaceable(path, marker, writes)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _beside(path, _new_folder)
        yield tmp
        _write_manifest(tmp)
        _plain_modes(tmp, stat.S_IMODE(tmp.stat().st_mode))
        if path.exists():
            check_replaceable(path, marker, writes)  # still ours after the (long) write
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):  # also one naming a file in the temporary folder: name ``path``
            raise DiskFullError(path, exc) from exc
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(path: str | Path, marker: str, writes: Collection[str] = ()) -> None:
    """Raise ``FileExistsError`` unless a directory write may replace ``path``: it does not
    exist, is an empty folder, or holds only what clipforge wrote there.

    That is each entry its :data:`DIRECTORY_MANIFEST` lists, or a top-level file named like one
    of ``writes`` (or ``marker``).  A folder without a manifest (written before they existed)
    must also hold ``marker``.  The message names the folder and the foreign entries."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose a new or empty "
                              "directory")
    listed = _read_manifest(path)
    patterns = (marker, *writes)
    foreign = _foreign_entries(path, listed or set(), patterns)
    if listed is None and not foreign and any(path.iterdir()) and not (path / marker).is_file():
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if foreign:
        shown = ", ".join(foreign[:FOREIGN_SHOWN])
        more = f" and {len(foreign) - FOREIGN_SHOWN} more" if len(foreign) > FOREIGN_SHOWN else ""
        raise FileExistsError(
            f"{path} is not empty and holds files not written by clipforge ({shown}{more}); "
            "nothing was changed there: choose a new or empty directory")


def _read_manifest(path: Path) -> set[str] | None:
    """The entries ``path``'s manifest lists; None if it has no (readable) manifest."""
    try:
        data = json.loads((path / DIRECTORY_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT \
            or not isinstance(data.get("files"), list):
        return None
    return {name for name in data["files"] if isinstance(name, str)}


def _foreign_entries(root: Path, listed: set[str], patterns: Collection[str]) -> list[str]:
    """Entries under ``root`` that neither the manifest lists nor ``patterns`` name (folders
    with a trailing ``/``).  Only folders the manifest lists are entered, so a user's big
    folder costs one listing of its top level."""
    foreign: list[str] = []
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                name = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if name + "/" in listed:
                        pending.append((Path(entry.path), name + "/"))
                    else:
                        foreign.append(name + "/")
                elif not (name in listed or (not prefix and (
                        name == DIRECTORY_MANIFEST
                        or any(fnmatch.fnmatchcase(name, p) for p in patterns)))):
                    foreign.append(name)
    return sorted(foreign)


def _write_manifest(folder: Path) -> None:
    """List every entry written into ``folder`` (folders with a trailing ``/``)."""
    entries = []
    for current, dirs, files in os.walk(folder):  # links to folders are listed, not entered
        prefix = Path(current).relative_to(folder).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        entries += [prefix + name + ("/" if name in dirs and not os.path.islink(
            os.path.join(current, name)) else "") for name in dirs + files]
    entries = sorted(e for e in entries if e != DIRECTORY_MANIFEST)
    document = {"format": MANIFEST_FORMAT, "format_version": 1, "files": entries}
    (folder / DIRECTORY_MANIFEST).write_text(json.dumps(document, indent=1) + "\n",
                                             encoding="utf-8")


class NotUTF8Error(ValueError):
    """Bytes that are not UTF-8; the message says where: the byte, its offset and line."""


def decode_utf8(data: bytes) -> str:
    """``data`` as text, strictly UTF-8, a leading byte-order mark dropped.  Decoded leniently,
    a Latin-1 'café' would silently become another class name or caption, so any other
    encoding raises :class:`NotUTF8Error` naming the first undecodable byte."""
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise NotUTF8Error(f"byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) "
                           f"cannot be decoded ({exc.reason})") from None

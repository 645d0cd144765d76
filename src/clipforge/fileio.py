"""Writing files so that a crash never leaves half a result (write beside, then rename), and
reading users' text files strictly as UTF-8."""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | Path, marker: str) -> Iterator[Path]:
    """Yield a temporary folder; on success it takes the place of ``path`` (old one removed).

    Readers see either the complete old folder or the complete new one, never a mix.  An existing
    non-empty folder is replaced only if it holds ``marker`` (a file clipforge writes there), so
    a mistyped destination can never swallow a user's own folder.
    """
    path = Path(path).resolve()
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if any(path.iterdir()) and not (path / marker).exists():
            raise FileExistsError(
                f"{path} exists, is not empty and was not written by clipforge (no {marker}); "
                "choose a new or empty directory"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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

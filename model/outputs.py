"""Checks every command line runs on the places it will write and the files it will read, before any work.

A run that fails at its first (or final) save has lost everything it computed; a file given where a
directory belongs ends in a traceback. These helpers make both one-line user errors up front: each
raises the caller's error class (``ConfigError``, ``DataError``, ``ConvertError``: all ``ValueError``)
with a message naming the path and what is wrong with it.
"""

from __future__ import annotations

import errno
import os
import tempfile
import zipfile
from pathlib import Path


def ensure_writable_dir(path: str | Path, what: str, error: type[ValueError]) -> Path:
    """Create directory ``path`` (and its parents) if needed and prove a file can be written in it.

    ``what`` names the path in the message (``"out_dir"``, ``"--out"``). Raises ``error`` when the path
    (or a parent) is a file, or the directory cannot be created or written (read-only, permissions).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{what} {str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"{what} {str(path)!r} cannot be created: a part of the path is a file") from None
    except NotADirectoryError:
        raise error(f"{what} {str(path)!r} cannot be created: a part of the path is a file") from None
    except OSError as e:
        raise error(f"{what} {str(path)!r} cannot be created: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = "read-only" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else (e.strerror or str(e))
        raise error(f"{what} {str(path)!r} is not writable ({reason})") from None
    return path


def ensure_not_a_directory(path: str | Path, what: str, error: type[ValueError]) -> Path:
    """``path`` will be written as a file: refuse a directory there, and check its folder is writable."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a directory, not a file")
    ensure_writable_dir(path.parent, f"the folder of {what}", error)
    return path


def describe_unreadable(path: str | Path) -> str:
    """Why ``path`` is not a torch checkpoint, in a few words a user can act on (it names no exception class)."""
    path = Path(path)
    if path.is_dir():
        return "it is a directory"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError):
            return f"the file is truncated or damaged ({size} bytes; a torch zip archive that does not open)"
        if bad is not None:
            return f"the file is damaged (member {bad!r} of its zip archive fails its CRC check)"
        return f"its zip archive ({size} bytes) is not a torch checkpoint"
    if head[:1] == b"\x80":  # a legacy (pre-1.6) pickle-based torch.save
        return f"the file ({size} bytes) is a damaged or truncated legacy torch pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # binary, or text whose last character the 64 bytes cut in two
        text = head[: e.start].decode("utf-8") if e.start >= max(1, len(head) - 3) else None
    if text is None or "\x00" in text:
        return f"it is not a torch checkpoint ({size} bytes starting {head[:8].hex(' ')})"
    return f"it is a text file ({size} bytes, starts with {text[:24]!r}), not a torch checkpoint"

"""Writing output files so that only complete files ever exist, with one-line errors.

Every file is written to a temporary name in its folder (``.name.tmp<pid>``) and renamed over the final
name (``os.replace``, atomic on POSIX and Windows), so a kill or a full disk never leaves a truncated PNG,
JSON or shard. :func:`prepare_output_dir` checks the folder up front (it is a folder, it can be created,
a file can be written there). :func:`output_errors` turns the ``OSError`` of a full disk, a read-only
folder or a missing permission into a :class:`OutputError` with one line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import MarcacheError
from .strict_json import json_safe


class OutputError(MarcacheError):
    """The output folder cannot take the files (not a folder, read-only, disk full)."""


def _describe(exc: OSError, path: os.PathLike | str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: no space left on the device (disk full or quota reached); free space or choose another --out"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{path}: cannot write there ({exc.strerror or 'permission denied'}); choose a writable --out"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path}: a file is in the way of the output folder; choose another --out or move the file"
    return f"{path}: cannot write ({exc.strerror or type(exc).__name__}); choose another --out"


@contextlib.contextmanager
def output_errors(folder: os.PathLike | str) -> Iterator[None]:
    """Turn OSErrors raised while writing under ``folder`` into one-line :class:`OutputError`."""
    try:
        yield
    except OSError as exc:
        raise OutputError(_describe(exc, folder)) from None


def tmp_name(path: Path) -> Path:
    """The temporary sibling a file is written to before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes_atomic(path: os.PathLike | str, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename; on failure nothing is left.
    ``fsync`` also survives a power cut (costly per file: used for eval shards, not for every PNG)."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_json_atomic(path: os.PathLike | str, obj: Any, **kwargs) -> Path:
    """Standard JSON (NaN/inf become null, never ``Infinity``), written atomically."""
    text = json.dumps(json_safe(obj), allow_nan=False, **{"indent": 2, "default": str, **kwargs})
    return write_bytes_atomic(path, text.encode())


def write_image_atomic(path: os.PathLike | str, image) -> Path:
    """A PIL image as PNG, encoded in memory then written atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


def check_output_dir(path: os.PathLike | str, flag: str = "--out") -> Path:
    """Check an output folder before any work, without creating it: not a file, and its nearest existing
    folder takes a (deleted at once) probe file, so the folder can be created and written later."""
    if str(path) == "":
        raise OutputError(f"{flag} is empty: give a folder name")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder}: exists and is not a folder; choose another {flag} or move the file")
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {folder}: {existing} is a file, not a folder; choose another {flag}")
    probe = existing / f".marcache-write-test{os.getpid()}"
    with output_errors(folder):
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    return folder


def free_bytes(folder: os.PathLike | str) -> int:
    """Free space of the file system holding ``folder`` (its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def remove_stale_tmp(folder: Path, pattern: str) -> list[Path]:
    """Delete leftover temporary files matching ``pattern`` (from killed runs); returns what was removed."""
    removed = []
    for p in folder.glob(pattern):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed

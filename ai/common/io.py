"""Atomic file output and content hashing, shared by every stage (no torch import).

An interrupted run never leaves a half-written file: data goes to a temporary file in the same folder,
is flushed, and is renamed over the target (rename is atomic on POSIX within one file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: target file; its folder must exist.
        data: the bytes to write.
        fsync: also fsync before the rename (durable against power loss; slower, off for bulk small files).
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(
    path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False
) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8 by default)."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only when the block succeeds.

    Used for checkpoints: a run killed mid-save leaves only a ``.tmp-`` folder that resume ignores.
    An existing folder at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, so equal weights give equal bytes (and equal sha256).

    The Rust writer keeps the header in a hash map whose order changes from process to process; inference records
    the LoRA's sha256 and refuses to mix images from different LoRAs, so a rerun that re-exports the same weights
    must produce the same file. Only the JSON header moves; the data section and its offsets are unchanged.
    """
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment with spaces
    atomic_write_bytes(path, struct.pack("<Q", len(header)) + header + data[8 + n :])

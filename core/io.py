"""Atomic file output, content hashing and canonical safetensors files, shared by every stage (torch is imported
only by the functions that write tensors).

An interrupted run never leaves a half-written file: data goes to a temporary file in the same folder,
is flushed, and is renamed over the target (rename is atomic on POSIX within one file system).

Safetensors files are written with sorted keys (header and data), so equal weights give equal bytes, and tensor by
tensor (:func:`save_safetensors`): a model's export holds one tensor in host memory, not a copy of the model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def read_jsonl(
    path: str | os.PathLike, *, tolerant: bool = False, what: str = "one JSON record"
) -> Iterator[tuple[int, Any]]:
    """(line number, record) of each non-blank line of a JSONL file.

    ``tolerant`` skips lines that are not JSON (a torn last line of a writer killed mid-line, a damaged record the
    stage that owns the file reports); otherwise the first one is a UserError naming the file, the line and ``what``
    each line must hold.
    """
    from core.cli import UserError

    path = Path(path)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if tolerant:
                continue
            raise UserError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be {what}"
            ) from None
        yield lineno, record


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", *, fsync: bool = True
) -> Iterator:
    """Open a new temporary sibling of ``path`` for writing; rename it over ``path`` only if the block succeeds.

    Args:
        path: target file; its folder must exist.
        mode: ``w`` (text) or ``wb``.
        encoding: of a text file.
        fsync: flush to disk before the rename (durable against power loss; off for bulk small files).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`; no fsync unless asked)."""
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_write_text(
    path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False
) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8 by default)."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


#: errors of os.link that mean "no hard link here" (another file system, or one without links): copy instead
LINK_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})


def link_or_copy(src: str | os.PathLike, dest: str | os.PathLike, hardlink: bool = True) -> str | None:
    """Place ``src`` at ``dest`` atomically: a hard link (no extra disk), else a copy. Returns None when linked,
    else why it copied (``hardlink=False``: "asked to copy"); other errors are raised."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        reason = "asked to copy"
        if hardlink:
            try:
                os.link(src, tmp)
                os.replace(tmp, dest)
                return None
            except OSError as exc:
                if exc.errno not in LINK_FALLBACK_ERRNOS:
                    raise
                reason = (
                    f"hard links from {Path(src).parent} into {dest.parent} are impossible ({exc.strerror})"
                )
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return reason
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def _padded_header(header: dict) -> bytes:
    """The canonical JSON header: sorted keys, no spaces, padded with spaces to 8-byte alignment as the format does."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def canonicalize_safetensors(path: str | os.PathLike, chunk: int = 16 << 20) -> None:
    """Rewrite a safetensors header with sorted keys, so equal weights give equal bytes (and equal sha256).

    The Rust writer keeps the header in a hash map whose order changes from process to process; inference records
    the LoRA's sha256 and refuses to mix images from different LoRAs, so a rerun that re-exports the same weights
    must produce the same file. Only the JSON header moves; the data section and its offsets are unchanged and are
    copied in chunks (a 5 GB ControlNet is never read into memory whole).
    """
    with open(path, "rb") as src:
        n = struct.unpack("<Q", src.read(8))[0]
        old = src.read(n)
        header = _padded_header(json.loads(old))
        if header == old:
            return
        with atomic_open(path, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(src, dst, chunk)


#: torch dtype name -> safetensors dtype code
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL",
}  # fmt: skip


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    dtype: Any = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` (e.g. a model's ``state_dict()``) as a canonical safetensors file, one tensor at a time.

    The header comes from names, dtypes and shapes alone (keys sorted, as :func:`canonicalize_safetensors`
    writes it; the data in key order); then each tensor is moved to the CPU, cast to ``dtype`` (floating-point
    tensors only, as ``Module.to(dtype)`` does) and written. So the export adds about one tensor to host memory,
    where ``safetensors.torch.save_file`` keeps a host copy of every GPU tensor alive until the file is written.
    """
    import torch

    names = sorted(tensors)

    def out_dtype(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        code = SAFETENSORS_DTYPES.get(str(out_dtype(t)).replace("torch.", ""))
        if code is None:
            raise ValueError(f"{name}: safetensors has no dtype for {out_dtype(t)}")
        size = t.numel() * out_dtype(t).itemsize
        entries[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = _padded_header(entries)
    with atomic_open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        for name in names:
            t = tensors[name].detach().to("cpu", out_dtype(tensors[name])).contiguous()
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy())
            del t  # the next tensor's cast may reuse this memory


def save_model(model, folder: str | os.PathLike, dtype: Any = None) -> Path:
    """A diffusers model folder as ``save_pretrained`` writes it (``config.json`` and one
    ``diffusion_pytorch_model.safetensors``), streamed by :func:`save_safetensors` and canonical."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_safetensors(
        folder / "diffusion_pytorch_model.safetensors", model.state_dict(), dtype, metadata={"format": "pt"}
    )
    return folder


def load_safetensors_into(model, path: str | os.PathLike, what: str = "the model") -> None:
    """Copy a safetensors file's tensors into ``model``'s parameters and buffers (or into a mapping of name ->
    tensor, e.g. the trained parameters alone) in place, one tensor at a time (``load_state_dict(load_file(path))``
    would hold the whole file in host memory first). The names and shapes must match exactly; ``what`` names the
    target in the error."""
    import torch
    from safetensors import safe_open

    from core.cli import UserError

    targets = model if isinstance(model, Mapping) else model.state_dict()
    with safe_open(os.fspath(path), framework="pt") as f, torch.no_grad():
        names = set(f.keys())
        if names != set(targets):
            missing, unexpected = sorted(set(targets) - names), sorted(names - set(targets))
            raise UserError(
                f"{path} does not fit {what}: missing {missing[:3]}, unexpected {unexpected[:3]} "
                f"({len(missing)} and {len(unexpected)} in all)"
            )
        for name in sorted(names):
            saved = f.get_tensor(name)
            if saved.shape != targets[name].shape:
                raise UserError(
                    f"{path}: {name} has shape {tuple(saved.shape)}, that of {what} is {tuple(targets[name].shape)}"
                )
            targets[name].copy_(saved)

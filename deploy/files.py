"""The file and message helpers both sides share (numpy-free, TensorFlow-free): a file's content hash, an atomic
write that never leaves a partial file, and an error's first line for a one-line message."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def sha256(path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path, data: bytes | str, *, sync: bool = False) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path` in one step (sync: flushed to the
    disk first, for files a crash must not find empty). On any failure the temporary file is removed and the error
    raised; `path` is either untouched or whole."""
    path = Path(path)
    mode = "w" if isinstance(data, str) else "wb"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as file:
            file.write(data)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message (or of a text), at most `limit` characters; the error's type name when
    it has no message."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else ""


@contextlib.contextmanager
def temporary_folder(prefix: str):
    """A new private folder in the temporary directory, removed when the block ends however it ends - Ctrl-C or
    SIGTERM included. tempfile.TemporaryDirectory leaks its folder when the signal lands between its mkdir and the
    `with` (the name is lost): here the folder is made inside the `try` whose `finally` removes it."""
    folder = Path(tempfile.gettempdir()) / f"{prefix}{secrets.token_hex(6)}"
    try:
        folder.mkdir(mode=0o700)
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

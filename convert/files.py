"""Atomic file writes: a failure never leaves a partial output file behind."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path


def write_atomic(path, data: bytes | str) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path` in one step."""
    path = Path(path)
    mode = "w" if isinstance(data, str) else "wb"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as file:
            file.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256(path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def disk_full(error: BaseException) -> bool:
    """Whether `error` (an OSError, or h5py's / TensorFlow's wrapping of one) says the device is full."""
    while error is not None:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False

"""Atomic file writes (a failure never leaves a partial output file behind) and disk-full detection; the writes and
hashes themselves are sepconv.deploy.files', shared with the device side."""

from __future__ import annotations

import errno

from sepconv.deploy.files import sha256, write_atomic  # noqa: F401  (convert's callers import them from here)


def disk_full(error: BaseException) -> bool:
    """Whether `error` (an OSError, or h5py's / TensorFlow's wrapping of one) says the device is full."""
    while error is not None:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False

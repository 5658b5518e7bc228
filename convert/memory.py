"""Memory between stages: a large model's conversion is a sequence of stages whose peaks must not stack."""

from __future__ import annotations


def release_memory() -> None:
    """Give back to the system what a finished stage freed: Python's unreachable cycles, then glibc's free lists.
    Converters free large buffers that glibc keeps for reuse, so the next stage's peak would stack on them (0.9 GiB
    after ResNet50's TFLite conversion, docs/benchmarks.md). A no-op where malloc_trim does not exist."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass

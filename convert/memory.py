"""Memory between and within stages: a large model's conversion is a sequence of stages whose peaks must not stack."""

from __future__ import annotations

import contextlib
import gc
import threading
from pathlib import Path

MIB = 1 << 20


def release_memory() -> None:
    """Give back to the system what a finished stage freed: Python's unreachable cycles, then glibc's free lists.
    Converters free large buffers that glibc keeps for reuse, so the next stage's peak would stack on them (0.9 GiB
    after ResNet50's TFLite conversion, docs/benchmarks.md). A no-op where malloc_trim does not exist."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def resident_bytes(pid: int | str = "self") -> int | None:
    """A process's resident memory now (/proc/PID/statm), in bytes; None where it cannot be read (no such process,
    not Linux)."""
    import os

    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def collecting_cycles(growth_mib: int = 256, every: float = 0.1):
    """Collect Python's cyclic garbage whenever the process's resident memory has grown by `growth_mib` since the last
    collection, for the duration of the block (a thread watching /proc/self/statm every `every` seconds).

    tf2onnx deep-copies its whole graph, constants included, before each of its ONNX optimizers and drops the old
    copy, whose nodes and graph refer to each other: only the cycle collector frees them, and its thresholds count
    objects, not bytes, so ResNet50's copies piled up to 3.3 GiB before one ran (docs/benchmarks.md). Where
    /proc/self/statm does not exist (not Linux) the block runs as it is."""
    if resident_bytes() is None:
        yield
        return
    done = threading.Event()
    start = resident_bytes()  # read here, not in the thread: its first turn may come after the block has grown

    def watch():
        base = start
        while not done.wait(every):
            now = resident_bytes()
            if now > base + growth_mib * MIB:
                gc.collect()
                base = resident_bytes()
            base = min(base, now)

    watcher = threading.Thread(target=watch, name="sepconv-collect-cycles", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()

"""convert/memory.py: cyclic garbage is collected while a converter runs, when the cycle collector would not run."""

import gc
import os
import sys
import time
import weakref

import pytest

from sepconv.convert.memory import collecting_cycles

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")


class _Node:
    """A graph node that refers to its graph, as tf2onnx's do: freed only by the cycle collector."""

    def __init__(self, megabytes: int):
        self.payload = b"\x01" * (megabytes << 20)  # written, so resident
        self.me = self


def _make_garbage(megabytes: int, count: int) -> list:
    """`count` unreachable cycles of `megabytes` each; their weak references."""
    refs = []
    for _ in range(count):
        node = _Node(megabytes)
        refs.append(weakref.ref(node))
        del node
    return refs


def _wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("watched", [True, False])
def test_cycles_are_collected_when_memory_grows(watched):
    gc.collect()
    gc.disable()  # as when the collector's object-count thresholds are not reached
    try:
        if watched:
            with collecting_cycles(growth_mib=8, every=0.005):
                refs = _make_garbage(megabytes=16, count=4)
                collected = _wait_until(lambda: refs[0]() is None)
        else:
            refs = _make_garbage(megabytes=16, count=4)
            collected = _wait_until(lambda: refs[0]() is None, seconds=0.2)
        assert collected == watched, f"watched={watched}: the first 16 MiB cycle was{'' if collected else ' not'} freed"
    finally:
        gc.enable()
        gc.collect()


def test_resident_bytes_reads_a_process_or_says_none():
    from sepconv.convert.memory import resident_bytes

    mine = resident_bytes()
    assert mine is not None and mine > 1 << 20 and resident_bytes(os.getpid()) > 1 << 20
    assert resident_bytes(2 ** 22 + 1) is None, "no such process: None, not an error"

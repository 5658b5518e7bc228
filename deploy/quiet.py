"""Keep converters' chatter (C++ logs, Keras export prints) off the terminal, and keep it for error messages."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


class Captured:
    text: str = ""


@contextlib.contextmanager
def captured_output():
    """Redirect the process's stdout and stderr (file descriptors 1 and 2) to a temporary file for the block."""
    captured = Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", errors="replace")

"""Run a TensorFlow command in a child process, so that a crash in native code is an error the user can act on.

TensorFlow 2.21's oneDNN kernels crash (SIGSEGV, or glibc's "free(): invalid size" abort) while training a model with
a strided 1x1 convolution - every ResNet projection shortcut - on x86 CPUs with AVX-512 (seen on Intel Xeon with AMX
and on this project's AMD EPYC). Two defences:

- the safe configuration: on x86 the child runs with TF_ENABLE_ONEDNN_OPTS=0 unless the user set that variable
  (its cost is measured in docs/benchmarks.md); TensorFlow reads it once, at import, hence the child process;
- if native code still kills the child, the parent (which never imports TensorFlow) prints one line naming the
  signal and the stage that was running, and, when fine-tuning checkpoints exist, the `--resume` that continues.

The child is the same command (`python -m sepconv.convert.cli PROG ARGS...`) with SEPCONV_WORKER set; it dies with
its parent (Linux), and Ctrl-C / SIGTERM sent to the parent are passed on to it.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from sepconv.convert.errors import SepconvError
from sepconv.deploy.errors import RECEIVED, Terminated
from sepconv.deploy.files import write_atomic

WORKER = "SEPCONV_WORKER"  # set in the child: do the work here
STATUS = "SEPCONV_STATUS"  # a file where the child writes the stage it is in
ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_CRASH = 70  # EX_SOFTWARE: the child died in native code


def in_worker() -> bool:
    return bool(os.environ.get(WORKER))


def safe_environment(environ=None) -> dict:
    """The child's environment: the worker mark, and oneDNN off on x86 unless the user chose."""
    env = dict(os.environ if environ is None else environ)
    env[WORKER] = "1"
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        env.setdefault(ONEDNN, "0")
    return env


def supervise(prog: str, argv: list[str], checkpoints: Path | None = None) -> tuple[int, str | None]:
    """Run `prog argv` in a child process: (its exit status, None), or (EXIT_CRASH, the one-line message naming the
    signal, the stage and how to go on) when native code killed it. The caller prints."""
    fd, status = tempfile.mkstemp(prefix="sepconv-status-")
    os.close(fd)
    env = dict(safe_environment(), **{STATUS: status})
    try:
        child = subprocess.Popen([sys.executable, "-m", "sepconv.convert.cli", prog, *argv], env=env,
                                 start_new_session=True)
        returncode = _wait(child)
        stage = Path(status).read_text().strip() or "start-up"
    finally:
        os.unlink(status)
    if returncode < 0 and -returncode in CRASHES:
        return EXIT_CRASH, crash_line(signal.Signals(-returncode), stage, checkpoints, env.get(ONEDNN))
    return (returncode if returncode >= 0 else 128 - returncode), None


def crash_line(signum: signal.Signals, stage: str, checkpoints: Path | None, onednn: str | None) -> str:
    resume = (f"finished fine-tuning epochs are checkpointed in {checkpoints}: run the same command with --resume "
              f"to continue" if checkpoints is not None and checkpoints.exists() else "run the same command again")
    switch = (f"; if it happens again, try {ONEDNN}={'1' if onednn == '0' else '0'}" if onednn is not None else "")
    return (f"TensorFlow crashed in native code ({signum.name}) during the {stage} stage; nothing was "
            f"written; {resume}{switch}, and report it with --debug output")


_reported = [None]


def report_stage(stage: str) -> None:
    """In the child: remember the stage that is running, for the parent's crash message. Written only when it
    changes, and atomically (a crash between truncating and writing the file would leave it empty)."""
    path = os.environ.get(STATUS)
    if path and stage != _reported[0]:
        try:
            write_atomic(path, stage)
            _reported[0] = stage
        except OSError:
            pass


_INTERRUPTED: list[int] = []  # in the worker: the SIGINTs received (an error after one is the interrupt's doing)


def _interrupt(signum, frame):
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def reported_as_interrupt(body):
    """`body(args)`, with an error that follows a Ctrl-C raised as the KeyboardInterrupt it is (the CLI's exit 130, no
    traceback; after SIGTERM / SIGHUP, the errors.Terminated it is). TensorFlow's code catches KeyboardInterrupt in
    bare `except:` clauses and raises another error instead (`tf.int32.max` during a model clone: "TypeError: Cannot
    find maximum value of <dtype: 'int32'>"). A sepconv error passes as it is: one raised for the interrupt says how
    to go on (InterruptedRunError)."""

    def wrapped(args):
        try:
            return body(args)
        except SepconvError:
            raise
        except Exception as error:
            if RECEIVED:
                raise Terminated(RECEIVED[-1]) from error
            if _INTERRUPTED:
                raise KeyboardInterrupt from error
            raise

    return wrapped


def die_with_parent() -> None:
    """In the child: Ctrl-C acts (the parent passes on only what it was sent, and a shell or test runner may have
    started it with SIGINT ignored, which the child would inherit) and is remembered (reported_as_interrupt); on
    Linux, get SIGKILL when the parent dies, so a killed command leaves no worker running."""
    signal.signal(signal.SIGINT, _interrupt)
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _wait(child: subprocess.Popen) -> int:
    """Wait for the child, passing Ctrl-C and termination signals on to it (it stops cleanly and says how to go on),
    and job control: Ctrl-Z stops the child, then this process; `fg` / `bg` continue both."""
    previous = {}

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    def suspend(signum, frame):
        if child.poll() is None:
            child.send_signal(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # continues here on SIGCONT, which `forward` passes on

    for signum in FORWARDED + (signal.SIGCONT,):
        previous[signum] = signal.signal(signum, forward)
    previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, suspend)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # a handler replaced ours: keep waiting for the child
                continue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""Errors shared by both sides of sepconv. Each message is one line: the thing, the value received, the fix.

This module imports nothing heavy: the device side (numpy + LiteRT / ONNX Runtime) and the workstation side both
raise these, and only a command-line layer turns them into a message and an exit status.
"""


class SepconvError(Exception):
    """Base of all sepconv errors; `str(error)` is a complete one-line message for the user."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Python is, like Ctrl-C's KeyboardInterrupt (so that every clean-up that
    Ctrl-C runs runs for them too); the command exits 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name


TERMINATING = ("SIGTERM", "SIGHUP")  # handled like Ctrl-C: raised where Python is, so that clean-ups run
RECEIVED: list[int] = []  # the SIGTERM / SIGHUP this process received (an error after one is its doing)


def raise_terminated(signum, frame):
    """A signal handler: SIGTERM / SIGHUP become Terminated (and are remembered in RECEIVED)."""
    RECEIVED.append(signum)
    raise Terminated(signum)


class InvalidOptionError(SepconvError, ValueError):
    """An argument has a value sepconv does not accept (the message says which values it does)."""


class RuntimeMissingError(SepconvError, ImportError):
    """The runtime an artifact needs (LiteRT, ONNX Runtime) is not installed; the message has the pip command."""


class ArtifactError(SepconvError):
    """A .tflite or .onnx file is missing, empty, damaged, or not loadable by its runtime."""


class RemoteError(SepconvError):
    """Something failed on or on the way to a device reached over SSH."""


class HostUnreachableError(RemoteError):
    """The device did not answer: off, wrong name or port, no sshd, network down."""


class AuthenticationError(RemoteError):
    """The device refused the login (no authorized key, wrong user)."""


class HostKeyError(RemoteError):
    """The device's host key is unknown or changed; sepconv never accepts host keys silently."""


class UnsupportedDeviceError(RemoteError):
    """The device cannot run the deploy side: no Python 3.9+, an architecture without runtime wheels, no disk space."""


class RemoteInstallError(RemoteError):
    """Installing the runtime into the device's ~/.sepconv failed (the message has pip's last lines)."""


class RemoteRuntimeError(RemoteError):
    """The benchmark crashed or failed on the device."""


class InputDataError(SepconvError):
    """Benchmark input data (an .npz) that cannot be read or does not fit the model."""


class OutputError(SepconvError):
    """A report or output path that cannot be written: a missing folder, a directory, not writable, an input of the run,
    an existing file without --overwrite, or a write that failed (disk full); nothing half-written is left."""


class ReportInputError(SepconvError):
    """A JSON file given to the HTML report that is missing, unreadable, not JSON, a failure report, or of a kind the
    report does not know."""

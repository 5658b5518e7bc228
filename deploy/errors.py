"""Errors shared by both sides of sepconv. Each message is one line: the thing, the value received, the fix.

This module imports nothing heavy: the device side (numpy + LiteRT / ONNX Runtime) and the workstation side both
raise these, and only a command-line layer turns them into a message and an exit status.
"""


class SepconvError(Exception):
    """Base of all sepconv errors; `str(error)` is a complete one-line message for the user."""


class InvalidOptionError(SepconvError, ValueError):
    """An argument has a value sepconv does not accept (the message says which values it does)."""


class RuntimeMissingError(SepconvError, ImportError):
    """The runtime an artifact needs (LiteRT, ONNX Runtime) is not installed; the message has the pip command."""


class ArtifactError(SepconvError):
    """A .tflite or .onnx file is missing, empty, damaged, or not loadable by its runtime."""

"""Every error sepconv raises on purpose. Each message is one line: the thing, the value received, the fix.

Library code raises these; only the command-line layer turns them into a message and an exit status.
"""


class SepconvError(Exception):
    """Base of all sepconv errors; `str(error)` is a complete one-line message for the user."""


class InvalidOptionError(SepconvError, ValueError):
    """An argument has a value sepconv does not accept (the message says which values it does)."""


class ModelLoadError(SepconvError):
    """The model file could not be turned into a Keras model."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The path names nothing."""


class EmptyModelFileError(ModelLoadError):
    """The file exists but has no bytes (an interrupted copy or save)."""


class CorruptModelFileError(ModelLoadError):
    """The file claims a model format but its content is not readable as one."""


class WrongFileKindError(ModelLoadError):
    """The file is a readable thing, but not a Keras model file (TFLite, ONNX, a directory, ...)."""


class SavedModelError(WrongFileKindError):
    """A TensorFlow SavedModel directory: Keras 3 cannot rebuild its layers."""


class WeightsOnlyFileError(WrongFileKindError):
    """An HDF5 file with weights but no architecture."""


class UnsafeModelError(ModelLoadError):
    """The model holds Python code (a Lambda layer) and safe mode is on."""


class UnknownObjectError(ModelLoadError):
    """The model names a custom class or function that is not registered or passed in custom_objects."""


class UnsupportedModelError(SepconvError):
    """The model is of a kind sepconv cannot rewrite (a subclassed model)."""

"""Every error sepconv raises on purpose. Each message is one line: the thing, the value received, the fix.

Library code raises these; only the command-line layer turns them into a message and an exit status. The base
classes live in `sepconv.deploy.errors`, which the device side shares without TensorFlow.
"""

from sepconv.deploy.errors import ArtifactError, InvalidOptionError, ReportInputError, RuntimeMissingError, SepconvError

__all__ = [
    "ArtifactError", "BudgetError", "CheckpointError", "CorruptModelFileError", "DataError", "DiskFullError",
    "EmptyModelFileError", "ExportError", "FlexOpsError", "InterruptedRunError", "InvalidOptionError", "ModelLoadError",
    "ModelNotFoundError", "ModelTooLargeError", "OutputBusyError", "OutputPathError", "ReportInputError",
    "RuntimeMissingError",
    "SavedModelError", "SepconvError", "UnknownObjectError", "UnsafeModelError", "UnsupportedModelError",
    "VerificationError", "WeightsOnlyFileError", "WorkerLostError", "WrongFileKindError",
]


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


class ModelTooLargeError(ModelLoadError):
    """A model file that would expand past a bound (a zip bomb), or whose input is too large to feed."""


class UnsafeModelError(ModelLoadError):
    """The model holds Python code (a Lambda layer) and safe mode is on."""


class UnknownObjectError(ModelLoadError):
    """The model names a custom class or function that is not registered or passed in custom_objects."""


class UnsupportedModelError(SepconvError):
    """The model is of a kind sepconv cannot rewrite or export (a subclassed model, several image inputs for --data)."""


class DataError(SepconvError):
    """Representative or held-out data that cannot be read or cannot match the model's input."""


class ExportError(SepconvError):
    """A converter (TFLite, tf2onnx, ONNX Runtime's quantizer) failed on the model."""


class FlexOpsError(ExportError):
    """The model needs TensorFlow ops that the built-in TFLite runtime lacks."""


class OutputPathError(SepconvError):
    """An output path that cannot be written: unknown extension, existing file, missing or read-only folder."""


class OutputBusyError(OutputPathError):
    """Another convert-model run holds the lock on an output or checkpoint folder."""


class DiskFullError(SepconvError):
    """No space left on the device while writing an artifact, a manifest or a checkpoint; nothing half-written is
    left. Deliberately not an OSError: callers that turn OSErrors into other messages must let it through."""


class VerificationError(SepconvError):
    """An exported artifact does not reproduce the Keras model within its tolerance."""


class BudgetError(VerificationError):
    """The fine-tuned model lost more accuracy than --max-accuracy-drop allows."""


class CheckpointError(SepconvError):
    """Checkpoints of an interrupted run are in the way (or missing for --resume, or from another run)."""


class WorkerLostError(SepconvError):
    """Multi-worker fine-tuning stopped: another worker ended or cannot be reached; the message says how to resume."""


class InterruptedRunError(SepconvError):
    """Ctrl-C during a resumable stage; the message says how to resume."""

    exit_status = 130  # as for any Ctrl-C; the CLI prints the message without "error:"

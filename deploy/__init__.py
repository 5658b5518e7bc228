"""sepconv.deploy: the device side. Runs .tflite and .onnx artifacts with only numpy and LiteRT / ONNX Runtime.

    from sepconv.deploy import open_runtime
    runtime = open_runtime("model.tflite")
    probabilities = runtime.run([images])[0]      # float in, float out; quantized tensors handled

This package never imports TensorFlow, directly or through a dependency: it is what runs on a Raspberry Pi.
"""

from sepconv.deploy.errors import ArtifactError, InvalidOptionError, RuntimeMissingError, SepconvError
from sepconv.deploy.runtime import Runtime, TensorSpec, open_runtime

__all__ = ["ArtifactError", "InvalidOptionError", "Runtime", "RuntimeMissingError", "SepconvError", "TensorSpec",
           "open_runtime"]

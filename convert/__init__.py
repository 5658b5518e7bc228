"""sepconv.convert: the workstation side. Load a trained Keras model, separate its convolutions, export verified
TFLite / ONNX artifacts.

    >>> from sepconv.convert import load, separate, convert_model
    >>> model = load("model.h5")
    >>> small, report = separate(model, rank=1)
    >>> print(report)
    >>> convert_model("model.h5", ["model.tflite", "model.onnx"], data="images/")

Names are imported on first use, so that `import sepconv.convert` (and `--help` of the tools) stays instant and
TensorFlow loads only when a function that needs it is called.
"""

from importlib import import_module

_EXPORTS = {
    "load": "sepconv.convert.loading",
    "parse_custom_objects": "sepconv.convert.loading",
    "separate": "sepconv.convert.separation",
    "separate_with": "sepconv.convert.separation",
    "SeparationOptions": "sepconv.convert.policy",
    "DEFAULT_ENERGY": "sepconv.convert.policy",
    "SeparationReport": "sepconv.convert.report",
    "LayerRow": "sepconv.convert.report",
    "register_rewrite": "sepconv.convert.rewrites",
    "export_tflite": "sepconv.convert.tflite_export",
    "TFLiteOptions": "sepconv.convert.tflite_export",
    "export_onnx": "sepconv.convert.onnx_export",
    "OnnxOptions": "sepconv.convert.onnx_export",
    "register_target": "sepconv.convert.targets",
    "TFLiteOutputOptions": "sepconv.convert.targets",
    "OnnxOutputOptions": "sepconv.convert.targets",
    "verify": "sepconv.convert.verification",
    "Tolerance": "sepconv.convert.verification",
    "Verification": "sepconv.convert.verification",
    "load_data": "sepconv.convert.data",
    "DataOptions": "sepconv.convert.data",
    "refine": "sepconv.convert.refinement",
    "recalibrate_batchnorm": "sepconv.convert.refinement",
    "plan_budget": "sepconv.convert.budget",
    "BudgetOptions": "sepconv.convert.budget",
    "LatencyOptions": "sepconv.convert.latency_table",
    "LatencyTarget": "sepconv.convert.latency",
    "choose_for_latency": "sepconv.convert.latency",
    "measure_table": "sepconv.convert.latency_table",
    "recover": "sepconv.convert.recovery",
    "RecoveryOptions": "sepconv.convert.recovery",
    "finetune": "sepconv.convert.finetuning",
    "FinetuneOptions": "sepconv.convert.finetuning",
    "convert_model": "sepconv.convert.pipeline",
    "ConvertOptions": "sepconv.convert.options",
    "ConvertResult": "sepconv.convert.results",
    "errors": "sepconv.convert.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sepconv.convert' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    value = module if name == "errors" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

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
    "separate": "sepconv.convert.separation.walk",
    "separate_with": "sepconv.convert.separation.walk",
    "SeparationOptions": "sepconv.convert.separation.policy",
    "DEFAULT_ENERGY": "sepconv.convert.separation.policy",
    "SeparationReport": "sepconv.convert.separation.report",
    "LayerRow": "sepconv.convert.separation.report",
    "register_rewrite": "sepconv.convert.separation.rewrites",
    "export_tflite": "sepconv.convert.export.tflite",
    "TFLiteOptions": "sepconv.convert.export.tflite",
    "export_onnx": "sepconv.convert.export.onnx",
    "OnnxOptions": "sepconv.convert.export.onnx",
    "register_target": "sepconv.convert.export.targets",
    "TFLiteOutputOptions": "sepconv.convert.export.targets",
    "OnnxOutputOptions": "sepconv.convert.export.targets",
    "verify": "sepconv.convert.export.verification",
    "Tolerance": "sepconv.convert.export.verification",
    "Verification": "sepconv.convert.export.verification",
    "load_data": "sepconv.convert.data",
    "DataOptions": "sepconv.convert.data",
    "refine": "sepconv.convert.recovery.refinement",
    "recalibrate_batchnorm": "sepconv.convert.recovery.refinement",
    "plan_budget": "sepconv.convert.recovery.budget",
    "BudgetOptions": "sepconv.convert.recovery.budget",
    "LatencyOptions": "sepconv.convert.recovery.latency_table",
    "LatencyTarget": "sepconv.convert.recovery.latency_choice",
    "choose_for_latency": "sepconv.convert.recovery.latency_choice",
    "measure_table": "sepconv.convert.recovery.latency_table",
    "recover": "sepconv.convert.recovery.steps",
    "RecoveryOptions": "sepconv.convert.recovery.steps",
    "finetune": "sepconv.convert.recovery.finetuning",
    "FinetuneOptions": "sepconv.convert.recovery.finetuning",
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

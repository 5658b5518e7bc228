"""The run's data in its three roles, which never share a sample: train (with a part that calibrates), validation
(every choice) and test (scores and verification only); without data, synthetic test inputs."""

from __future__ import annotations

import numpy as np

from sepconv.convert.data import check_labels, load_data, split
from sepconv.convert.errors import UnsupportedModelError
from sepconv.convert.options import MIN_SAMPLES, ConvertOptions

SYNTHETIC_SAMPLES = 64


def datasets(model, options: ConvertOptions):
    """(train, calibration inputs, validation, test, description) for the run; without data: (None, None, None,
    synthetic test inputs, description). The three roles never share a sample (module recovery.py says who uses what).
    """
    from sepconv.convert.data import Dataset, resolve_scale

    if len(model.inputs) != 1:
        raise UnsupportedModelError(f"convert-model handles single-input models; this one has {len(model.inputs)} "
                                    f"inputs: use export_tflite / export_onnx from the Python API")
    data_options, scale_note = resolve_scale(model, options.data_options)
    preprocessing = {"scale": data_options.scale, "mean": data_options.mean, "std": data_options.std,
                     "reason": scale_note}
    if options.data:
        data = _labelled_data(options.data, model, data_options)
        if options.test_data:
            rest, test = data, _labelled_data(options.test_data, model, data_options)
        else:
            rest, test = split(data, heldout=options.heldout_fraction)
        if options.validation_data:
            train = rest.take(np.random.default_rng(1).permutation(len(rest)))  # all of it, shuffled
            validation = _labelled_data(options.validation_data, model, data_options)
        else:
            train, validation = split(rest, heldout=options.validation_fraction, seed=1)
        calibration = train.take(np.arange(min(options.calibration_samples, len(train))))
        labels = "labelled" if data.y is not None else "unlabelled"
        held = f"{len(test)} from {test.source}" if options.test_data else f"{len(test)} held out"
        info = {"source": data.source, "test_source": test.source if options.test_data else None,
                "validation_source": validation.source if options.validation_data else None,
                "samples": len(data), "labelled": data.y is not None, "scale": data_options.scale,
                "preprocessing": preprocessing,
                "train_samples": len(train), "calibration_samples": len(calibration),
                "validation_samples": len(validation), "heldout_samples": len(test),
                "heldout_labelled": test.y is not None,
                "description": f"{len(data)} {labels} samples from {data.source} ({scale_note}): {len(train)} to train "
                               f"on (a random {len(calibration)} of them also calibrate), {len(validation)} to "
                               f"validate (every choice), {held} to test (scoring and verification only)"}
        return train, calibration.x, validation, test, info
    shape = tuple(model.inputs[0].shape)
    if any(d is None for d in shape[1:]):
        raise UnsupportedModelError(f"The model's input {shape} has a free size besides the batch; pass --data so "
                                    f"that sepconv knows what to feed it")
    x = np.random.default_rng(0).random((SYNTHETIC_SAMPLES, *shape[1:]), dtype=np.float32)
    info = {"source": None, "test_source": None, "samples": SYNTHETIC_SAMPLES, "labelled": False, "scale": None,
            "preprocessing": preprocessing,
            "train_samples": 0, "calibration_samples": 0, "validation_samples": 0,
            "heldout_samples": SYNTHETIC_SAMPLES, "heldout_labelled": False,
            "description": f"no --data: verifying on {SYNTHETIC_SAMPLES} synthetic uniform [0, 1) inputs, judged by "
                           f"output similarity (pass --data for accuracy and a top-1 agreement check)"}
    return None, None, None, Dataset(x, None, "synthetic uniform [0, 1) inputs"), info


def _labelled_data(source, model, data_options):
    """A data set read for `model`, its labels checked against the model's classes, and usable for a run."""
    from sepconv.convert.data import check_usable

    data = load_data(source, model.input_shape, data_options)
    check_labels(data, int(model.outputs[0].shape[-1]))
    check_usable(data, MIN_SAMPLES)
    return data

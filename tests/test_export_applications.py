"""keras.applications (weights=None), separated, exported and verified.

Every family goes to float32 TFLite and ONNX (allclose to Keras); the edge-sized families also to int8 TFLite and
ONNX. int8 calibration of the large families (InceptionResNetV2 alone takes minutes) is left out to keep the suite
short; the int8 path itself is covered by the hand-made models and the trained digits model.
"""

import keras
import numpy as np
import pytest
from test_applications import FAMILIES
from test_export import _check_artifact, _export

from sepconv.convert import separate
from sepconv.convert.errors import ExportError

INT8_FAMILIES = {"mobilenet_v2", "efficientnet"}


@pytest.mark.slow
@pytest.mark.parametrize("family, build, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_export_family(tmp_path, family, build, size):
    keras.utils.set_random_seed(0)
    model, report = separate(build(weights=None, input_shape=(size, size, 3), classes=10), rank=2)
    assert report.separated
    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 1, (8, size, size, 3)).astype(np.float32)
    x = rng.uniform(0, 1, (4, size, size, 3)).astype(np.float32)
    modes = [("tflite", "none"), ("onnx", "none")]
    if family in INT8_FAMILIES:
        modes += [("tflite", "int8"), ("onnx", "int8")]
    for fmt, mode in modes:
        path = tmp_path / f"{family}_{mode}.{fmt}"
        if family == "convnext" and fmt == "onnx":
            # Keras runs ConvNeXt's grouped 7x7 Conv2D (kept by separation) through an XLA-compiled function on
            # the CPU; tf2onnx cannot translate that call. The export must say so, naming the layers.
            with pytest.raises(ExportError, match=r"StatefulPartitionedCall.*depthwise_conv.*grouped Conv2D"):
                _export(fmt, model, path, mode, calibration)
            assert not path.exists()
            continue
        _export(fmt, model, path, mode, calibration)
        _check_artifact(fmt, mode, model, path, x, f"{family} {fmt} {mode}")

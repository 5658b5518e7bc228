"""The export-target registry (convert/export/targets.py): each registered target is one unit with a case here that exports a
tiny model through it and checks the artifact against Keras; the pipeline, the CLI and the latency table take their
per-target choices from the units."""

import keras
import numpy as np
import pytest

from sepconv.convert.errors import InvalidOptionError, OutputPathError
from sepconv.convert.export.targets import (KerasOutputOptions, OnnxOutputOptions, TFLiteOutputOptions, registered_targets,
                                     target_for, target_named)
from sepconv.convert.graph import predict_keras

FLOAT_RTOL = 1e-4  # float32 artifacts: relative max error, the contract of verification


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(image)
    model = keras.Model(image, keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x)))
    x = np.random.default_rng(0).uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
    return model, x


def _assert_same(model, actual, x, what):
    expected = predict_keras(model, x)[0]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=FLOAT_RTOL * np.abs(expected).max(),
                               err_msg=f"{what}: the float artifact differs from Keras")


def _run(path, x, layout):
    from sepconv.deploy import open_runtime

    return open_runtime(str(path)).run([np.transpose(x, (0, 3, 1, 2)) if layout == "nchw" else x])[0]


def _tflite_case(target, model, x, tmp_path):
    options = TFLiteOutputOptions()
    path = tmp_path / "m.tflite"
    target.export(model, path, target.export_options(options, "none"), None)
    _assert_same(model, _run(path, x, target.layout(options)), x, "tflite")
    assert target.manifest_extras(path) == {}
    # --io-type int8 belongs to int8; a fallback from int8 exports float activations with float32 I/O
    with pytest.raises(InvalidOptionError, match=r"io_type='int8' for quantize='dynamic'"):
        target.check(TFLiteOutputOptions(io_type="int8"), "dynamic", path)
    assert target.export_options(TFLiteOutputOptions(io_type="int8"), "dynamic").io_type == "float32"
    assert target.export_options(TFLiteOutputOptions(io_type="int8"), "int8").io_type == "int8"


def _onnx_case(target, model, x, tmp_path):
    options = OnnxOutputOptions(opset=13, layout="nchw")
    path = tmp_path / "m.onnx"
    target.export(model, path, target.export_options(options, "none"), None)
    assert target.layout(options) == "nchw"
    _assert_same(model, _run(path, x, "nchw"), x, "onnx nchw")
    assert target.manifest_extras(path) == {"opset": 13}
    with pytest.raises(InvalidOptionError) as error:
        target.check(options, "float16", path)
    assert str(error.value) == (f"--quantize float16 is not available for ONNX ({path}); supported modes are: "
                                f"['none', 'dynamic', 'int8']")


def _keras_case(target, model, x, tmp_path):
    path = tmp_path / "m.keras"
    assert target.mode("int8") == "none"  # a .keras output keeps the float model whatever --quantize says
    target.check(KerasOutputOptions(), "int8", path)
    target.export(model, path, target.export_options(KerasOutputOptions(), "none"), None)
    _assert_same(model, keras.models.load_model(path).predict(x, verbose=0), x, "keras")
    assert target.manifest_extras(path) == {}


TARGET_CASES = {".tflite": _tflite_case, ".onnx": _onnx_case, ".keras": _keras_case}


def test_every_registered_target_has_a_test_case():
    """A new registered target must come with a case here that exports through it."""
    missing = [extension for extension in registered_targets() if extension not in TARGET_CASES]
    assert not missing, f"registered targets with no test case: {missing}"


@pytest.mark.parametrize("extension", sorted(TARGET_CASES))
def test_target_exports_what_keras_computes(extension, tiny, tmp_path):
    target = registered_targets()[extension]
    assert target.extension == extension and target_for(f"x{extension.upper()}") is target
    assert target_named(target.name) is target
    TARGET_CASES[extension](target, *tiny, tmp_path)


@pytest.mark.parametrize("extension", sorted(TARGET_CASES))
def test_target_declarations_are_consistent(extension):
    target = registered_targets()[extension]
    assert "none" in target.modes, "every target exports the float model"
    assert set(target.auto_fallbacks) <= set(target.modes) - {"int8"}, target.auto_fallbacks
    assert target.calibration_methods[0] == "minmax"  # the repair's first calibration, as quantization.py assumes
    options = target.options_class()
    if target.exporter_class is not None:
        exported = target.export_options(options, "none")
        assert isinstance(exported, target.exporter_class) and exported.quantize == "none"
        assert target.describe(options).keys() <= vars(exported).keys()


def test_unknown_extension_is_the_same_one_line_error(tmp_path):
    from sepconv.convert.pipeline import ConvertOptions, preflight

    source = tmp_path / "m.h5"
    source.write_bytes(b"x")
    with pytest.raises(OutputPathError) as error:
        preflight(source, [tmp_path / "m.pt"], ConvertOptions())
    assert str(error.value) == (f"{tmp_path / 'm.pt'}: unknown extension '.pt', use one of "
                                "['.keras', '.onnx', '.tflite']")
    with pytest.raises(OutputPathError) as error:
        preflight(source, [], ConvertOptions())
    assert str(error.value) == "No output given; name at least one .tflite, .onnx or .keras file"


def test_convert_options_hold_one_options_per_target():
    from sepconv.convert.pipeline import ConvertOptions

    options = ConvertOptions(targets=(OnnxOutputOptions(layout="nchw"),))
    assert options.target_options(target_named("onnx")) == OnnxOutputOptions(layout="nchw")
    assert options.target_options(target_named("tflite")) == TFLiteOutputOptions()  # not given: defaults
    with pytest.raises(InvalidOptionError, match="two OnnxOutputOptions"):
        ConvertOptions(targets=(OnnxOutputOptions(), OnnxOutputOptions(opset=13)))
    with pytest.raises(InvalidOptionError, match="Supported options are"):
        ConvertOptions(targets=("onnx",))
    with pytest.raises(InvalidOptionError, match="opset=9"):
        OnnxOutputOptions(opset=9)
    with pytest.raises(InvalidOptionError, match="io_type='int32'"):
        TFLiteOutputOptions(io_type="int32")


def test_manifest_options_list_the_target_options_flat_as_before():
    """The manifest's `options` keep their keys and order: the targets' options flattened where they always were."""
    from sepconv.convert.pipeline import ConvertOptions

    described = ConvertOptions(targets=(TFLiteOutputOptions(io_type="uint8"), OnnxOutputOptions(opset=15))).describe()
    keys = list(described)
    assert keys[keys.index("calibration_samples"):keys.index("tolerance") + 1] == [
        "calibration_samples", "io_type", "per_channel", "allow_flex", "opset", "layout", "tolerance"]
    assert "targets" not in described
    assert (described["io_type"], described["opset"], described["layout"]) == ("uint8", 15, "nhwc")


def test_cli_flags_map_onto_target_options_and_default_to_them():
    from sepconv.convert.cli import convert_options, convert_parser

    parser = convert_parser()
    defaults = convert_options(parser.parse_args(["m.h5", "m.tflite"]), custom_objects=False)
    assert defaults.target_options(target_named("tflite")) == TFLiteOutputOptions()
    assert defaults.target_options(target_named("onnx")) == OnnxOutputOptions()
    args = parser.parse_args(["m.h5", "m.onnx", "--opset", "13", "--layout", "nchw", "--per-tensor", "--io-type",
                              "int8", "--allow-flex"])
    options = convert_options(args, custom_objects=False)
    assert options.target_options(target_named("onnx")) == OnnxOutputOptions(opset=13, layout="nchw",
                                                                              per_channel=False)
    assert options.target_options(target_named("tflite")) == TFLiteOutputOptions(io_type="int8", per_channel=False,
                                                                                 allow_flex=True)


def test_latency_times_the_first_output_a_runtime_runs():
    from sepconv.convert.recovery.latency_table import LatencyOptions, for_export
    from sepconv.convert.export.onnx import OnnxOptions

    keras_target, onnx_target = target_for("m.keras"), target_for("m.onnx")
    chosen = for_export(LatencyOptions(), [(keras_target, KerasOutputOptions()),
                                           (onnx_target, OnnxOutputOptions(opset=13))], "int8")
    assert chosen.export == OnnxOptions(quantize="int8", opset=13) and chosen.suffix == ".onnx"
    with pytest.raises(InvalidOptionError) as error:
        for_export(LatencyOptions(), [(keras_target, KerasOutputOptions())], "int8")
    assert str(error.value) == "latency is measured on a .tflite or .onnx artifact; name one among the outputs"
    with pytest.raises(InvalidOptionError, match=r"Use TFLiteOptions\(...\) or OnnxOptions\(...\)$"):
        LatencyOptions(export=OnnxOutputOptions())  # the exporter's options, with their mode, not an output's

"""Where the time goes (bench-model --profile, sepconv.deploy.profile; issue 26): per op and per Keras layer, from
ONNX Runtime's profiler and from a .tflite's prefixes; in the table, the JSON, deploy-model's flags and the report."""

import json
import subprocess
import sys

import pytest

from sepconv.deploy.bench import BenchOptions, benchmark
from sepconv.deploy.flags import DEPLOY_BENCH_FLAGS, bench_argv
from sepconv.deploy.profile import OVERHEAD, _layer_index, _layer_of


@pytest.mark.parametrize("name, layer", [
    ("tutorial_1/block1_conv1_1/separable_conv2d/depthwise2", "block1_conv1"),
    ("tutorial_1/block1_conv2_1/Relu;tutorial_1/block1_conv2_1/BiasAdd;tutorial_1/x", "block1_conv2"),
    ("functional_1/backbone_1/block_3_expand_1/Conv2D", "backbone/block_3_expand"),
    ("functional_1/conv_1_2/Conv2D", "conv_1"),  # the manifest's own name ends in _1: kept
    ("PartitionedCall:01", "PartitionedCall:01"),
])
def test_ops_are_charged_to_the_keras_layer_their_names_give(name, layer):
    known = _layer_index(["block1_conv1", "block1_conv2", "backbone/block_3_expand", "conv_1"])
    assert _layer_of(name, known) == layer


@pytest.fixture(scope="module")
def sized_artifacts(tmp_path_factory):
    """A separated CNN large enough (about 0.1 ms) that its ops' times stand above a microsecond's noise, as int8
    TFLite and ONNX."""
    import keras
    import numpy as np

    from sepconv.convert import separate
    from sepconv.convert.export.onnx import export_onnx
    from sepconv.convert.export.tflite import export_tflite

    keras.utils.set_random_seed(0)
    x_in = keras.Input((32, 32, 8), name="pixels")
    y = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c1")(x_in)
    y = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="c2")(y)
    y = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="c3")(y)
    model, _ = separate(keras.Model(x_in, keras.layers.Dense(4, name="head")(keras.layers.Flatten()(y))),
                        rank=1, include=("c2", "c3"))
    x = np.random.default_rng(0).random((16, 32, 32, 8), dtype=np.float32)
    folder = tmp_path_factory.mktemp("profiled")
    paths = {"tflite": folder / "m.tflite", "onnx": folder / "m.onnx"}
    export_tflite(model, paths["tflite"], quantize="int8", representative_data=x)
    export_onnx(model, paths["onnx"], quantize="int8", representative_data=x)
    return paths


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_profile_accounts_for_the_measured_time(sized_artifacts, kind):
    report = benchmark([sized_artifacts[kind]], BenchOptions(min_seconds=0.5, min_runs=50, profile=True))
    case = report.cases[0]
    profile = case.profile
    p50 = case.latency_ms["p50"]
    assert profile["layers"][-1]["layer"] == OVERHEAD and profile["ops"], profile["layers"]
    assert sum(layer["share"] for layer in profile["layers"]) == pytest.approx(1.0, abs=0.01)
    assert sum(op["ms"] for op in profile["ops"]) + profile["overhead_ms"] == pytest.approx(profile["total_ms"],
                                                                                           rel=1e-3)
    # the rows split the p50 measured without profiling; the profiled total (the full prefix among all of them, or
    # the nodes under ONNX Runtime's profiler) is the same model, slowed by the profiling (the module doc)
    assert profile["total_ms"] == pytest.approx(p50, rel=0.01), (profile["total_ms"], p50)
    # the raw profiled total is the same model timed at another moment, slowed by the profiling: measured 1.3x
    # (prefixes), 2-2.5x on a quiet machine and 5.4x under a loaded one (ONNX Runtime's records on this 0.08 ms
    # model), and 0.77x when the shared machine was busier during the p50 than during the profile (CI, Intel Xeon).
    # Only an order of magnitude either way says another model was timed: no tighter timing bound in a unit test.
    assert 0.1 * p50 < profile["raw_total_ms"] < 20 * p50, (profile["raw_total_ms"], p50, profile["method"])
    assert profile["method"] == ("prefix-truncation" if kind == "tflite" else "ort-profiler")
    convolutions = [layer for layer in profile["layers"] if layer["macs"]]
    assert convolutions and sum(layer["mac_share"] for layer in convolutions) == pytest.approx(1.0, abs=0.01)
    assert {"c1", "c2", "c3"} <= {layer["layer"] for layer in convolutions}, profile["layers"]
    # the convolutions are where the time goes: a burst of another job charged to the op ending the prefixes it slowed
    # made the Flatten the slowest in 11 of 124 profiles before the prefixes took one run per round and their 10th
    # percentile (profile.py's module doc); none of 100 since, beside 0-2 bursty busy loops
    slowest = max(profile["layers"][:-1], key=lambda layer: layer["ms"])  # the overhead (last) aside
    assert slowest["layer"] in ("c1", "c2", "c3"), profile["layers"]


def test_bench_model_prints_and_writes_the_profile(tmp_path, small_artifacts):
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "sepconv.deploy.cli", str(small_artifacts["tflite_int8"]),
                           "--profile", "--min-time", "0.3", "--min-runs", "20", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "where the time goes: int8.tflite @ 1 thread(s), prefix-truncation" in done.stdout, done.stdout
    assert "by op type:" in done.stdout and OVERHEAD in done.stdout
    case = json.loads(out.read_text())["cases"][0]
    assert {"method", "ops", "layers", "op_types", "total_ms"} <= set(case["profile"])
    report = tmp_path / "report.html"
    made = subprocess.run([sys.executable, "-c", "import sys; from sepconv.convert.cli import report_main; "
                           "sys.exit(report_main(sys.argv[1:]))", str(out), "-o", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and "Where the time goes, per layer" in report.read_text(), made.stderr


def test_deploy_model_asks_the_device_for_the_profile():
    assert "profile" in DEPLOY_BENCH_FLAGS
    assert "--profile" in bench_argv(BenchOptions(profile=True), ["profile", "seed"])
    assert bench_argv(BenchOptions(), ["profile", "seed"]) == ("--seed=0",)

import numpy as np
import pytest
from models import CASES

from sepconv.convert import separate

from sepconv.convert.demo import digits as demo
from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.recovery.refinement import refine


def _inputs(model, n=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *model.input_shape[1:])).astype(np.float32)


@pytest.mark.parametrize("case", ["sequential_options", "functional_branches", "channels_first"])
def test_refinement_reduces_every_layer_error(case):
    original = CASES[case]()
    separated, report = separate(original, rank=1)
    before = [w.copy() for w in separated.get_weights()]
    result = refine(original, separated, _inputs(original), report)
    assert [layer.path for layer in result.layers] == [row.path for row in report.separated]
    for layer in result.layers:
        assert layer.status == "refined", layer
        assert layer.error_after < layer.error_before, f"{layer.path}: {layer.error_before} -> {layer.error_after}"
    assert any(not np.array_equal(a, b) for a, b in zip(before, separated.get_weights()))
    assert result.to_dict()["samples"] == 64


def test_layers_inside_nested_models_are_refined():
    original = CASES["nested"]()
    separated, report = separate(original, rank=1)
    paths = [row.path for row in report.separated]
    assert {"top_conv", "mid/mid_conv", "mid/deep/deep_conv", "inner_seq/seq_conv"} <= set(paths), paths
    result = {layer.path: layer for layer in refine(original, separated, _inputs(original), report).layers}
    for path in paths:
        assert result[path].status == "refined", result[path]
        assert result[path].error_after < result[path].error_before, result[path]


def test_layer_input_reaches_through_nested_models():
    import keras

    from sepconv.convert.graph import layer_at, layer_input

    model = CASES["nested"]()
    x = _inputs(model, n=8)
    # by hand: top_conv's output is mid's input; mid_conv's output is deep's input
    top = keras.ops.convert_to_numpy(model.get_layer("top_conv")(x))
    mid = model.get_layer("mid")
    expected = keras.ops.convert_to_numpy(mid.get_layer("mid_conv")(top))
    np.testing.assert_allclose(layer_input(model, "mid/deep/deep_conv", x), expected, rtol=1e-5, atol=1e-6,
                               err_msg="the input of a layer two models deep")
    assert layer_at(model, "mid/deep/deep_conv").name == "deep_conv"


def test_shared_layers_are_skipped_with_a_reason():
    original = CASES["shared"]()
    separated, report = separate(original, rank=1)
    x = [np.random.default_rng(0).uniform(0, 1, (16, 10, 10, 4)).astype(np.float32)] * 2
    result = refine(original, separated, x[0], report)
    assert [layer.status for layer in result.layers] == ["skipped: shared by several calls"]


def test_refinement_needs_data():
    original = CASES["sequential_options"]()
    separated, report = separate(original, rank=1)
    with pytest.raises(InvalidOptionError, match="calibration images"):
        refine(original, separated, np.zeros((0, 24, 24, 3), np.float32), report)


@pytest.mark.slow
def test_refinement_recovers_the_trained_digits_model(trained_demo, digits):
    original = trained_demo["model"]
    baseline = demo.accuracy(original, digits.x_test, digits.y_test)
    separated, report = separate(original, rank=1)
    unrefined = demo.accuracy(separated, digits.x_test, digits.y_test)
    result = refine(original, separated, digits.x_train[:300], report)
    refined = demo.accuracy(separated, digits.x_test, digits.y_test)
    assert all(layer.error_after < layer.error_before for layer in result.layers)
    assert refined > unrefined + 0.2, f"K=1 accuracy {unrefined:.2%} -> {refined:.2%} after refinement"
    assert refined >= baseline - 0.05, f"refined K=1 {refined:.2%} vs original {baseline:.2%}"


# Refinement and BatchNorm recalibration run each model once, layer by layer (refinement.layer_inputs); before, they
# probed every layer's input from the model's input (refinement.layer_input), which grows with the square of the
# depth. The results must be those of the probes, up to float32 rounding (the probes ran other batch sizes).
ONE_PASS_RTOL, ONE_PASS_ATOL = 1e-4, 1e-5
ONE_PASS_CASES = ["sequential_options", "functional_branches", "nested", "channels_first"]


def _assert_same_weights(walked, probed, what: str):
    for variable, mine, theirs in zip(walked.weights, walked.get_weights(), probed.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=ONE_PASS_RTOL, atol=ONE_PASS_ATOL,
                                   err_msg=f"{what}: {variable.path}, one pass vs a probe per layer")


@pytest.mark.parametrize("case", ONE_PASS_CASES)
def test_refinement_in_one_pass_matches_a_probe_per_layer(case):
    from sepconv.convert.recovery.refinement import _refine_layer
    from sepconv.convert.graph import layer_input

    original = CASES[case]()
    x = _inputs(original, n=16)
    walked, report = separate(original, rank=1)
    probed, _ = separate(original, rank=1)
    result = refine(original, walked, x, report)
    rng = np.random.default_rng(0)  # refine's default seed
    for mine, row in zip(result.layers, report.separated):  # every layer of these models is called once
        theirs = _refine_layer(original, probed, row.path, layer_input(original, row.path, x),
                               layer_input(probed, row.path, x), 1e-6, rng)
        assert mine.status == theirs.status == "refined", (mine, theirs)
        np.testing.assert_allclose([mine.error_before, mine.error_after], [theirs.error_before, theirs.error_after],
                                   rtol=ONE_PASS_RTOL, err_msg=f"{case} {row.path}: layer errors")
    _assert_same_weights(walked, probed, f"{case} refined")


@pytest.mark.parametrize("case", [c for c in ONE_PASS_CASES if c != "channels_first"])  # the others have BatchNorm
def test_batchnorm_recalibration_in_one_pass_matches_a_probe_per_layer(case):
    import keras

    from sepconv.convert.recovery.refinement import recalibrate_batchnorm
    from sepconv.convert.graph import called_once, layer_input
    from sepconv.convert.graph import leaf_layers

    original = CASES[case]()
    x = _inputs(original, n=16)
    walked, _ = separate(original, rank=1)
    probed, _ = separate(original, rank=1)
    done = recalibrate_batchnorm(walked, x)
    paths = []
    for path, layer in leaf_layers(probed):
        if isinstance(layer, keras.layers.BatchNormalization) and called_once(probed, path):
            inputs = layer_input(probed, path, x).astype(np.float64)  # earlier BatchNorm layers already re-estimated
            axis = layer.axis if layer.axis >= 0 else inputs.ndim + layer.axis
            reduce = tuple(i for i in range(inputs.ndim) if i != axis)
            layer.moving_mean.assign(inputs.mean(axis=reduce).astype(np.float32))
            layer.moving_variance.assign(inputs.var(axis=reduce).astype(np.float32))
            paths.append(path)
    assert [d.path for d in done] == paths and paths, paths
    _assert_same_weights(walked, probed, f"{case} recalibrated")

"""The spatially separable form (issue 25): a Conv2D as a kh x 1 then a 1 x kw Conv2D from the kernel's spatial SVD.
Exact at full rank whatever the strides, dilation and padding; the error falls as r grows; refined, saved, exported
and chosen per layer beside the depthwise form."""

import keras
import numpy as np
import pytest

from sepconv.convert import separate
from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.export.onnx import export_onnx
from sepconv.convert.export.tflite import export_tflite
from sepconv.convert.graph import predict_keras
from sepconv.convert.options import ConvertOptions
from sepconv.convert.recovery.budget import BudgetOptions, plan_budget, spatial_ranks
from sepconv.convert.recovery.latency_choice import choose_for_latency
from sepconv.convert.recovery.refinement import refine
from sepconv.convert.separation import svd
from sepconv.convert.separation.policy import SeparationOptions
from sepconv.deploy import open_runtime
from sepconv.deploy.choices import choice_columns, choice_label, parse_choice

CONFIGS = {
    "same": dict(padding="same"),
    "strided same": dict(strides=2, padding="same"),
    "unequal strides, valid, no bias": dict(strides=(2, 1), padding="valid", use_bias=False),
    "dilated, relu": dict(dilation_rate=2, padding="same", activation="relu"),
    "stride 3 valid": dict(strides=3, padding="valid"),
    "5x3 kernel, strided": dict(kernel_size=(5, 3), strides=2, padding="same"),
}


def conv_model(seed=0, kernel_size=3, filters=7, channels=5, size=(13, 11), **config):
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((*size, channels))
    y = keras.layers.Conv2D(filters, kernel_size, name="c", **config)(x_in)
    model = keras.Model(x_in, keras.layers.Conv2D(3, 1, name="head")(y))
    rng = np.random.default_rng(seed)
    for weight in model.get_layer("c").weights:  # not the initializers' zero bias: every weight matters
        weight.assign(rng.standard_normal(weight.shape).astype("float32"))
    return model


def images(model, n=8, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *model.input_shape[1:])).astype(np.float32)


def test_factorisation_is_exact_at_full_rank_and_its_error_is_the_spectrum_s():
    kernel = np.random.default_rng(0).standard_normal((3, 5, 4, 6))
    spectrum = svd.spatial_spectrum(kernel)
    assert spectrum.full_rank == min(3 * 4, 5 * 6)
    vertical, horizontal = svd.spatial_factorise(spectrum, spectrum.full_rank)
    assert vertical.shape == (3, 1, 4, 12) and horizontal.shape == (1, 5, 12, 6)
    np.testing.assert_allclose(svd.spatial_reconstruct(vertical, horizontal), kernel, atol=1e-12,
                               err_msg="the full-rank spatial pair does not reconstruct the kernel")
    errors = []
    for rank in range(1, spectrum.full_rank + 1):
        rebuilt = svd.spatial_reconstruct(*svd.spatial_factorise(spectrum, rank))
        errors.append(np.linalg.norm(rebuilt - kernel) / np.linalg.norm(kernel))
        assert errors[-1] == pytest.approx(spectrum.relative_error(rank), abs=1e-9), f"r={rank}"
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), f"the error grows with r: {errors}"
    padded = svd.spatial_factorise(spectrum, spectrum.full_rank + 3)
    np.testing.assert_allclose(svd.spatial_reconstruct(*padded), kernel, atol=1e-12,
                               err_msg="a rank above the exact one is padded with zero components")


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_separated_model_is_exact_at_full_rank(config):
    model = conv_model(**config)
    x = images(model)
    separated, report = separate(model, rank="full", form="spatial", only_if_smaller=False)
    row = report.row("c")
    assert (row.status, row.form, row.rank) == ("separated", "spatial", row.full_rank)
    pair = separated.get_layer("c")
    assert [type(layer).__name__ for layer in pair.layers[1:]] == ["Conv2D", "Conv2D"]
    assert pair.layers[1].kernel.shape[:2] == (row.kernel[0], 1) and pair.layers[2].kernel.shape[:2] == (1, row.kernel[1])
    expected = predict_keras(model, x)[0]
    np.testing.assert_allclose(predict_keras(separated, x)[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max(),
                               err_msg=f"{config}: the full-rank spatial pair differs from the Conv2D")
    assert row.macs_after == _counted_macs(pair, x[:1]), "the row's MACs are those of the two convolutions"


def _counted_macs(pair, x) -> int:
    vertical, horizontal = pair.layers[1], pair.layers[2]
    inner = vertical(x)
    out = horizontal(inner)
    return int(np.prod(inner.shape[1:3]) * np.prod(vertical.kernel.shape)
               + np.prod(out.shape[1:3]) * np.prod(horizontal.kernel.shape))


def test_error_falls_as_the_rank_grows():
    model = conv_model(filters=12, channels=8)
    x = images(model, n=16)
    expected = predict_keras(model, x)[0]
    errors = []
    for rank in (1, 4, 8, 16, 24):
        separated, _ = separate(model, rank=rank, form="spatial", only_if_smaller=False)
        errors.append(np.linalg.norm(predict_keras(separated, x)[0] - expected) / np.linalg.norm(expected))
    assert all(b < a for a, b in zip(errors, errors[1:])), f"output error by r: {errors}"
    assert errors[-1] < 1e-5, f"r=24 is the exact rank (min(3*8, 3*12)): error {errors[-1]}"


def test_layers_it_cannot_help_are_kept_with_a_reason():
    model = conv_model(kernel_size=(3, 1), filters=4, channels=4)
    _, report = separate(model, rank=2, form="spatial")
    assert report.row("c").status == "kept" and "already separable in space" in report.row("c").reason
    big = conv_model(filters=4, channels=4)  # r=12 costs 12 * (3*4 + 3*4) = 288 >= 3*3*4*4 + 4 = 148 params
    _, report = separate(big, rank=12, form="spatial")
    assert report.row("c").status == "kept" and "spatially separable cost" in report.row("c").reason


def test_refinement_fits_the_second_half_to_the_original_output():
    keras.utils.set_random_seed(3)
    model = conv_model(filters=16, channels=8, strides=2, padding="same", activation="relu")
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.standard_normal((64, 13, 11, 8)), axis=1).astype(np.float32)  # correlated pixels
    separated, report = separate(model, rank=4, form="spatial")
    expected = predict_keras(model, smooth)[0]
    before = np.linalg.norm(predict_keras(separated, smooth)[0] - expected)
    result = refine(model, separated, smooth, report)
    layer = result.layers[0]
    assert layer.status == "refined" and layer.error_after < layer.error_before, layer
    after = np.linalg.norm(predict_keras(separated, smooth)[0] - expected)
    assert after < before, f"the model's output error rose: {before} -> {after}"


def test_saved_model_loads_in_safe_mode_without_sepconv(tmp_path):
    model = conv_model(padding="same")
    separated, _ = separate(model, rank=6, form="spatial")
    path = tmp_path / "spatial.keras"
    separated.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # two plain Conv2D layers: no custom class
    x = images(model)
    np.testing.assert_allclose(predict_keras(loaded, x)[0], predict_keras(separated, x)[0], rtol=0, atol=1e-6,
                               err_msg="the saved spatial model computes something else once loaded")


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_exports_agree_with_keras(tmp_path, fmt):
    model = conv_model(strides=2, padding="same", activation="relu")
    separated, _ = separate(model, rank=6, form="spatial")
    x = images(model, n=32)
    path = tmp_path / f"m.{fmt}"
    export = export_tflite if fmt == "tflite" else export_onnx
    export(separated, path, quantize="none", representative_data=x)
    expected = predict_keras(separated, x)[0]
    actual = open_runtime(path).run([x])[0]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max(),
                               err_msg=f"{fmt} float32 artifact of the spatial form differs from Keras")
    export(separated, tmp_path / f"q.{fmt}", quantize="int8", representative_data=x)
    quantized = open_runtime(tmp_path / f"q.{fmt}").run([x])[0]
    cosine = np.mean(np.sum(quantized * expected, 1) / np.linalg.norm(quantized, axis=1) / np.linalg.norm(expected, axis=1))
    assert cosine > 0.95, f"{fmt} int8 of the spatial form: cosine {cosine:.3f} to Keras"


def test_per_layer_choices_mix_both_forms():
    keras.utils.set_random_seed(0)
    x_in = keras.Input((12, 12, 4))
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(x_in)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="b")(y)
    y = keras.layers.Conv2D(8, 3, padding="same", name="c")(y)
    model = keras.Model(x_in, y)
    separated, report = separate(model, ranks={"a": 1, "b": "s3", "c": 0}, include=("a", "b", "c"))
    assert [(r.path, r.status, r.form, r.rank) for r in report.rows] == [
        ("a", "separated", "depthwise", 1), ("b", "separated", "spatial", 3), ("c", "kept", None, None)]
    assert type(separated.get_layer("a")).__name__ == "SeparableConv2D"
    assert [layer.name for layer in separated.get_layer("b").layers[1:]] == ["b_v", "b_h"]
    with pytest.raises(InvalidOptionError, match="s<r>"):
        SeparationOptions(ranks={"a": "x3"})
    with pytest.raises(InvalidOptionError, match="form"):
        SeparationOptions(form="diagonal")


def test_budget_measures_both_forms_and_the_choice_can_take_either():
    model = conv_model(filters=16, channels=8, padding="same", activation="relu")
    x = images(model, n=64)
    plan = plan_budget(model, x, None, x[:32], BudgetOptions(max_drop=5.0, forms=("depthwise", "spatial")))
    layer = plan.layers[0]
    choices = [c.rank for c in layer.candidates]
    row = separate(model, rank=1)[1].row("c")
    assert {f"s{r}" for r in spatial_ranks(row, (0.25, 0.5))} <= set(choices), choices
    assert 1 in choices and choices[-1] == 0, "depthwise K and keeping the layer are candidates too"
    assert [c.params for c in layer.candidates] == sorted(c.params for c in layer.candidates)
    table = {"c": {"keep": 10.0, "1": 9.0, "2": 12.0, "4": 20.0}}
    for choice in choices:
        if isinstance(choice, str):
            table["c"][choice] = 3.0  # the spatial form fastest here
    chosen = choose_for_latency(plan.layers, table, 100.0)
    assert parse_choice(chosen.ranks["c"])[0] == "spatial", chosen
    only_depthwise = plan_budget(model, x, None, x[:32], BudgetOptions(max_drop=5.0))
    assert all(isinstance(c.rank, int) for c in only_depthwise.layers[0].candidates)


def test_options_and_labels():
    from sepconv.convert.options import budget_forms

    with pytest.raises(InvalidOptionError, match="form='auto'"):
        ConvertOptions(separation=SeparationOptions(rank=2), form="auto")
    assert ConvertOptions(separation=SeparationOptions(rank=2), form="spatial").separation.form == "spatial"
    default = ConvertOptions(separation=SeparationOptions(rank=2))  # the default: a depthwise K
    assert default.form is None and default.separation.form == "depthwise"
    assert budget_forms("auto") == ("depthwise", "spatial") and budget_forms(None) == budget_forms("depthwise") == (
        "depthwise",), "the budget's default: the depthwise form (docs/benchmarks.md says why)"
    with pytest.raises(InvalidOptionError, match="forms"):
        BudgetOptions(forms=("diagonal",))
    assert [choice_label(c) for c in (0, 2, "s16", "bogus")] == ["kept", "K=2", "spatial r=16", "bogus"]
    columns = choice_columns([[1, 2, "s4", "s8", 0], [1, "s16"]])
    assert [header for header, _ in columns] == ["K=1", "K=2", "spatial #1", "spatial #2"]
    assert [pick([1, "s16"]) for _, pick in columns] == [1, None, "s16", None]

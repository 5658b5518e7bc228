import json

import numpy as np
import pytest

from sepconv.convert.errors import InvalidOptionError, VerificationError
from sepconv.convert.export.verification import OutputCheck, Tolerance, Verification, _check

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(200, 10))


def test_float_criterion():
    ok = _check("out", LOGITS, LOGITS * (1 + 1e-6), None, False, Tolerance())
    assert ok.passed and ok.max_relative_error < 1e-5 and ok.agreement == 1.0
    bad = _check("out", LOGITS, LOGITS + 0.01, None, False, Tolerance())
    assert not bad.passed and "relative max error" in bad.criterion


def test_agreement_and_accuracy():
    labels = np.argmax(LOGITS, 1)
    flipped = LOGITS.copy()
    flipped[:5] = -flipped[:5]  # 5 of 200 rows change their top-1: 97.5% agreement
    check = _check("out", LOGITS, flipped, labels, True, Tolerance(confidence=0))
    assert check.agreement == pytest.approx(0.975) and not check.passed
    assert check.keras_accuracy == 1.0 and check.accuracy == pytest.approx(0.975)
    assert _check("out", LOGITS, flipped, labels, True, Tolerance(min_agreement=0.97, confidence=0)).passed


def test_share_bound_is_the_wilson_bound():
    from sepconv.deploy.stats import share_bound

    # Wilson's one-sided 95% bounds (z = 1.6449), computed by hand from the closed form
    assert share_bound(219, 225, 0.95, upper=True) == pytest.approx(0.98615, abs=1e-5)
    assert share_bound(10, 10, 0.95, upper=False) == pytest.approx(0.78706, abs=1e-5)
    assert share_bound(0, 10, 0.95, upper=True) == pytest.approx(0.21294, abs=1e-5), "symmetric to the one above"
    for n in (10, 100, 1000, 10000):  # brackets the measured share, and tightens as the samples grow
        low, high = share_bound(n // 4, n, 0.95, upper=False), share_bound(n // 4, n, 0.95, upper=True)
        assert low < (n // 4) / n < high and high - low < 1.5 / n ** 0.5, (n, low, high)
    assert share_bound(0, 0, 0.95, upper=True) == 1.0 and share_bound(0, 0, 0.95, upper=False) == 0.0


def test_agreement_fails_only_when_the_images_show_it():
    """97.5% against a 98% bar: on 200 images that is 1 image short, within their noise, and passes, saying so; on
    4,000 images the same share is shown to be under the bar and fails; at confidence 0 the measurement decides."""
    tolerance = Tolerance()
    passed, criterion = tolerance.agreement_verdict(0.975, 200)
    assert passed and "under 98.00% by less than 200 samples can show" in criterion and "upper bound" in criterion
    needed = int(criterion.split("about ")[1].split(" would")[0])
    assert not tolerance.agreement_verdict(0.975, needed)[0], "the sample count named resolves it"
    assert tolerance.agreement_verdict(0.975, int(needed * 0.95))[0], "and is the least that does (within 5%)"
    passed, criterion = tolerance.agreement_verdict(0.975, 4000)
    assert not passed and "on 4000 samples (95% upper bound" in criterion, criterion
    assert not Tolerance(confidence=0).agreement_verdict(0.975, 200)[0]
    assert tolerance.agreement_verdict(0.99, 10)[0] and "99.00% >= 98.00%" in tolerance.agreement_verdict(0.99, 10)[1]
    with pytest.raises(InvalidOptionError, match="confidence"):
        Tolerance(confidence=1.0)


@pytest.mark.parametrize("worse, better, held", [(0, 0, True), (2, 0, True), (3, 1, True), (9, 0, False),
                                                 (12, 2, False)])
def test_the_budget_counts_the_images_where_the_models_differ(worse, better, held):
    """The drop's lower bound comes from the images only one of the two models gets right: on 225 validation
    images (0.44 points each), 2 more wrong (0.89 points) is within a 0.5-point budget's noise; 9 more wrong (4
    points) is shown over it."""
    from sepconv.convert.export.verification import BudgetCheck, drop_bound

    least = drop_bound(worse, better, 225, 0.95)
    drop = 100.0 * (worse - better) / 225
    assert least <= drop + 1e-9 and drop_bound(worse, better, 225, 0.0) == pytest.approx(drop)
    check = BudgetCheck(metric="accuracy", original=0.9, artifact=0.9 - drop / 100, drop=drop, max_drop=0.5,
                        samples=225, least_drop=least, confidence=0.95)
    assert check.held == held, (least, check.criterion())
    if worse - better > 1:  # over the budget as measured: the criterion says whether the images show it
        assert ("by less than 225 samples can show" in check.criterion()) == held, check.criterion()


def test_cosine_for_feature_maps():
    maps = RNG.normal(size=(8, 4, 4, 3))
    assert _check("map", maps, maps + 0.01, None, True, Tolerance()).passed
    check = _check("map", maps, RNG.normal(size=maps.shape), None, True, Tolerance())
    assert not check.passed and check.agreement is None and "cosine" in check.criterion


def test_failure_is_raised_with_reasons():
    check = _check("probs", LOGITS, -LOGITS, None, True, Tolerance())
    result = Verification(artifact="m.tflite", quantize="int8", samples=200, inputs="held-out samples",
                          outputs=(check,))
    assert not result.passed and result.to_dict()["passed"] is False
    with pytest.raises(VerificationError, match=r"m.tflite \(int8\) failed verification.*output probs: top-1"):
        result.raise_for_failure()
    assert isinstance(check, OutputCheck)


def test_bad_tolerance():
    with pytest.raises(InvalidOptionError, match="min_agreement=1.5"):
        Tolerance(min_agreement=1.5)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_non_finite_outputs_never_pass(quantized):
    """A model whose outputs are NaN agrees with itself on argmax; verification must fail it all the same."""
    nan = np.full_like(LOGITS, np.nan)
    both = _check("out", nan, nan, np.argmax(LOGITS, 1), quantized, Tolerance())
    assert not both.passed and "the artifact outputs 2,000 non-finite values" in both.criterion, both.criterion
    assert "the Keras model outputs 2,000 non-finite values" in both.criterion
    inf = LOGITS.copy()
    inf[3, 4] = np.inf
    artifact_only = _check("out", LOGITS, inf, None, quantized, Tolerance(min_agreement=0.5))
    assert not artifact_only.passed and artifact_only.criterion == ("the artifact outputs 1 non-finite values (NaN or "
                                                                    "infinity) of 2,000")


def _outlier_model(path):
    """A classifier whose int8 export loses most of its answers: one channel of `wide` spans ~500x the others, so a
    per-tensor int8 activation flattens the channels the head reads (the head ignores the outlier channel)."""
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 1, name="wide")(keras.layers.Conv2D(8, 3, name="c1")(image))
    model = keras.Model(image, keras.layers.Dense(4, activation="softmax", name="head")(keras.layers.Flatten()(x)))
    kernel, bias = model.get_layer("wide").get_weights()
    kernel[..., 0] *= 500.0
    model.get_layer("wide").set_weights([kernel, bias])
    kernel, bias = model.get_layer("head").get_weights()
    kernel[0::8] = 0.0
    model.get_layer("head").set_weights([kernel, bias])
    model.save(path)
    return path


@pytest.mark.parametrize("quantize", ["int8", "auto"])
def test_the_accuracy_budget_covers_the_artifact(tmp_path, quantize):
    """--max-accuracy-drop holds for what ships: an artifact that passes the (here lowered) agreement bar but loses
    more than the budget on the validation data fails verification; int8 as requested fails with one reason and
    writes nothing, auto falls back (dynamic is over the budget too here, float16 holds it)."""
    from sepconv.convert import ConvertOptions, convert_model
    from sepconv.convert.export.quantization import QuantizationOptions

    source = _outlier_model(tmp_path / "outlier.keras")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).random((300, 8, 8, 3)).astype(np.float32))
    options = ConvertOptions(data=str(tmp_path / "data.npz"), epochs=0, quantize=quantize, max_accuracy_drop=1.0,
                             tolerance=Tolerance(min_agreement=0.05), quantization=QuantizationOptions(repair=False))
    target = tmp_path / "m.tflite"
    if quantize == "int8":
        with pytest.raises(VerificationError, match=r"over the budget of 1.0 \(--max-accuracy-drop; quantization "
                                                    r"counts\).* or a larger --max-accuracy-drop") as raised:
            convert_model(source, [target], options=options)
        assert "top-1 agreement" not in str(raised.value).split("failed verification: ")[1].split(";")[0], \
            "the agreement bar passes here: only the budget may fail the artifact"
        assert not target.exists() and not target.with_name("m.tflite.json").exists()
        return
    artifact = convert_model(source, [target], options=options).artifacts[0]
    assert artifact.quantize == "float16", artifact.quantize_fallback
    reasons = artifact.quantize_fallback["reasons"]
    assert artifact.quantize_fallback["reason"] == " | ".join(reasons)
    assert [r.split(":")[0] for r in reasons] == ["int8", "dynamic"] and "over the budget" in reasons[1], reasons
    budget = artifact.verification.budget
    assert budget.held and budget.drop <= 1.0 and budget.samples == 45, budget
    assert artifact.verification.to_dict()["budget"] == \
        json.loads(target.with_name("m.tflite.json").read_text())["verification"]["budget"]


def test_activation_bytes_counts_every_layer_output_nested_models_included():
    from models import functional_branches, nested

    from sepconv.convert.graph import activation_bytes

    # functional_branches, per sample: input 16x16x4; stem, res_a, res_bn, shortcut, add, relu 16x16x8 each; left
    # 16x16x6; right 16x16x10; concat 16x16x16; tail and flat 7x7x12; logits 3 (float32)
    branches = 16 * 16 * 4 + 6 * 16 * 16 * 8 + 16 * 16 * (6 + 10 + 16) + 2 * 7 * 7 * 12 + 3
    assert activation_bytes(functional_branches()) == 4 * branches
    # nested: input 16x16x3; top_conv, mid's output and, inside mid, its input, mid_conv, deep's output and deep's
    # input and deep_conv: 8x8x6 each; inner_seq's output, seq_conv, seq_bn and flatten 8x8x7, its input 8x8x6
    outer = 16 * 16 * 3 + 7 * 8 * 8 * 6 + 4 * 8 * 8 * 7 + 8 * 8 * 6
    assert activation_bytes(nested()) == 4 * outer


def test_forward_batches_stay_within_the_activation_budget(monkeypatch):
    import keras
    from models import functional_branches

    from sepconv.convert import graph

    model = functional_branches()
    x = RNG.random((10, 16, 16, 4), dtype=np.float32)
    assert graph.batch_size_for(model) == graph.MAX_BATCH, "a small model keeps batches of 64"
    monkeypatch.setattr(graph, "ACTIVATION_BUDGET", 3 * graph.activation_bytes(model) + 1)
    assert graph.batch_size_for(model) == 3
    seen = []
    original_call = keras.Model.__call__
    monkeypatch.setattr(keras.Model, "__call__", lambda self, batch, **kw: (seen.append(len(batch)),
                                                                            original_call(self, batch, **kw))[1])
    bounded = graph.predict_keras(model, x)
    assert seen == [3, 3, 3, 1]
    whole = graph.predict_keras(model, x, batch_size=64)[0]
    # the same function; only float32 summation order differs with the batch (oneDNN picks its kernels by batch size:
    # 3.8e-5 apart on outputs of magnitude 48 was seen), so the tolerance is relative to the outputs' scale
    np.testing.assert_allclose(bounded[0], whole, rtol=0, atol=1e-5 * np.abs(whole).max(),
                               err_msg="the batch size must not change the outputs beyond float32 summation order")
    monkeypatch.setattr(graph, "ACTIVATION_BUDGET", 1)
    assert graph.batch_size_for(model) == 1, "never less than one sample"
    free = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(2, 3)])
    assert graph.activation_bytes(free) is None and graph.batch_size_for(free) == 64

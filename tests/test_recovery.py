"""Accuracy budget, BatchNorm recalibration, feature distillation and the recovery stages of convert_model."""

from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from sepconv.convert import convert_model, separate
from sepconv.convert.recovery.budget import KEEP, BudgetOptions, BudgetPlan, Candidate, LayerSensitivity, choose, plan_budget
from sepconv.convert.errors import BudgetError, CheckpointError, InvalidOptionError
from sepconv.convert.recovery.finetuning import finetune
from sepconv.convert.recovery.steps import STEPS, _check_budget, _Scorer
from sepconv.convert.recovery.refinement import recalibrate_batchnorm
from sepconv.convert.graph import layer_input as _layer_input
from sepconv.convert.graph import predict_keras
from test_finetuning import agreement, teacher_and_data


def layer(path, drops, params):
    """A synthetic sensitivity: K=1, 2, ... with these drops and parameter counts, then KEEP."""
    candidates = [Candidate(k + 1, p, 0.0, d) for k, (d, p) in enumerate(zip(drops, params[:-1]))]
    return LayerSensitivity(path, len(drops), tuple(candidates) + (Candidate(KEEP, params[-1], 0.0, 0.0),))


# Each recovery stage's own test: the file and the test that show what the stage does. A new Step in STEPS needs its
# line here (test_every_recovery_stage_has_a_test_case), as a new rewrite needs a model in tests/models.py.
STAGE_CASES = {
    "refined": ("test_refinement.py", "test_refinement_reduces_every_layer_error"),
    "batchnorm recalibrated": ("test_recovery.py", "test_batchnorm_statistics_are_re_estimated_in_graph_order"),
    "fine-tuned": ("test_finetuning.py", "test_finetuning_improves_agreement"),
    "fine-tuned, BatchNorm frozen": ("test_recovery.py",
                                     "test_a_batchnorm_model_gets_a_frozen_batchnorm_pass_judged_on_validation"),
    "fine-tuned under int8 noise": ("test_quantization_noise.py",
                                    "test_an_int8_run_fine_tunes_again_under_int8_noise_when_the_model_is_unstable"),
}


def test_every_recovery_stage_has_a_test_case():
    missing = [step.name for step in STEPS if step.name not in STAGE_CASES]
    assert not missing, f"recovery stages with no test case in STAGE_CASES: {missing}"
    assert len({step.name for step in STEPS}) == len(STEPS), "stage names are the report's keys: one each"
    for name, (file, test) in STAGE_CASES.items():
        assert f"\ndef {test}(" in (Path(__file__).parent / file).read_text(), f"{name}: no {test} in tests/{file}"


def test_choose_spends_the_budget_where_it_buys_most():
    layers = (layer("a", [3.0, 0.5], [10, 20, 100]), layer("b", [0.4, 0.1], [10, 20, 100]))
    ranks, predicted = choose(layers, max_drop=1.0)
    assert ranks == {"a": 2, "b": 1} and predicted == pytest.approx(0.9), "a's K=2 removes 2.5 points for 10 params"
    assert choose(layers, max_drop=10.0) == ({"a": 1, "b": 1}, pytest.approx(3.4)), "a large budget: smallest K"
    ranks, predicted = choose(layers, max_drop=0.0)
    assert predicted == 0.0 and ranks == {}, "no budget at all: every layer kept"
    ranks, _ = choose((layer("c", [-0.2, 0.3], [10, 20, 100]),), max_drop=0.0)
    assert ranks == {"c": 1}, "a negative (noise) drop counts as no drop"
    # greedy alone keeps both: d (cheap to keep) first, then e, whose K=1 alone is over budget; d's K=1 then fits again
    ranks, predicted = choose((layer("d", [14.0], [10, 30]), layer("e", [18.0], [100, 1000])), max_drop=15.0)
    assert ranks == {"d": 1} and predicted == pytest.approx(14.0), "a layer kept too eagerly gets its K back"


def test_plan_budget_measures_every_layer_and_respects_the_budget():
    teacher, x, y = teacher_and_data(n=256)
    for max_drop in (0.0, 3.0, 50.0):
        plan = plan_budget(teacher, x[128:], y[128:], x[:128], BudgetOptions(max_drop=max_drop))
        assert [s.path for s in plan.layers] == ["c1", "c2"]
        assert plan.predicted_drop <= max_drop + 1e-9
        chosen = sum(max(0.0, s.candidate(plan.ranks.get(s.path, KEEP)).drop) for s in plan.layers)
        assert chosen == pytest.approx(plan.predicted_drop), "the prediction is the sum of the chosen drops"
        assert plan.params_after <= plan.params_before
        for sensitivity in plan.layers:
            assert sensitivity.candidates[-1].rank == KEEP and sensitivity.candidates[-1].drop == 0.0
            assert all(c.drop == 0.0 for c in sensitivity.candidates if c.rank == sensitivity.full_rank), \
                "the exact K (when it is smaller than the layer) loses nothing"
            params = [c.params for c in sensitivity.candidates]
            assert params == sorted(params), "candidates ascend by parameters, keeping the layer last"
    assert plan.ranks == {"c1": 1, "c2": 1}, "a 50-point budget takes the smallest K everywhere"


def test_budget_check_fails_loudly():
    teacher, x, y = teacher_and_data(n=64)
    scorer = _Scorer(teacher, _Data(x[:48], y[:48]), _Data(x[48:], y[48:]))
    stages = [scorer.stage("original", teacher, 0.0), scorer.stage("fine-tuned", _Constant(teacher), 0.0)]
    plan = BudgetPlan(metric="accuracy", baseline=1.0, max_drop=1.0, samples=48, layers=(), ranks={"c1": 1},
                      predicted_drop=0.2, params_before=0, params_after=0, seconds=0.0)
    with pytest.raises(BudgetError, match=r"the budget did not hold: the fine-tuned model lost \d+\.\d\d points of "
                                          r"accuracy on 48 validation samples.*nothing was written"):
        _check_budget(plan, stages, scorer)
    held = _check_budget(replace(plan, max_drop=100.0), stages, scorer)
    assert held.held is True and held.plan.max_drop == 100.0 and held.measured_on == "48 validation samples"
    assert held.to_dict() == {**held.plan.to_dict(), "measured_drop": held.measured_drop,
                              "measured_on": "48 validation samples", "test_drop": held.test_drop, "test_samples": 16,
                              "held": True, "params_ratio": held.params_ratio}, "the manifest's recovery.budget"


def test_a_budget_plan_survives_the_resume_state():
    """A resumed run reads its plan back from state.json: the same BudgetPlan, layers and candidates typed."""
    import json

    candidates = (Candidate(rank=1, params=40, score=0.9, drop=2.5), Candidate(rank=KEEP, params=90, score=1.0, drop=0))
    layer = LayerSensitivity(path="c1", full_rank=9, candidates=candidates)
    plan = BudgetPlan(metric="agreement", baseline=1.0, max_drop=1.0, samples=30, layers=(layer,), ranks={"c1": 1},
                      predicted_drop=0.5, params_before=90, params_after=40, seconds=0.1, latency={"choice": {}})
    back = BudgetPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.layers[0].candidate(1).drop == 2.5


def test_the_scorer_takes_the_originals_outputs_it_is_handed():
    """The pipeline hands the original's outputs on the test and validation inputs to recovery (and keeps them for the
    artifacts' budget check), so the original runs once on each: the scorer must judge against those, not its own."""
    teacher, x, y = teacher_and_data(n=64)

    class Given:  # what verification.Outputs offers: the outputs, already computed
        def __init__(self, x):
            self.values = [np.roll(np.asarray(teacher(x)), 1, axis=1)]  # every class moved one on: no agreement

    copy = keras.models.clone_model(teacher)
    copy.set_weights(teacher.get_weights())
    validation, test = _Data(x[:48], y[:48]), _Data(x[48:], y[48:])
    own = _Scorer(teacher, validation, test).stage("copy", copy, 0.0)
    handed = _Scorer(teacher, validation, test, {"test": Given(test.x), "validation": Given(validation.x)})
    stage = handed.stage("copy", copy, 0.0)
    assert own.agreement == 1.0 and own.val_agreement == 1.0, "the same model agrees with itself"
    assert stage.agreement == 0.0 and stage.val_agreement == 0.0, "agreement is counted against the outputs handed over"
    assert stage.accuracy == own.accuracy, "accuracy still counts against the labels"


class _Data:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)


def _Constant(model):
    """A model that always answers class 0 (to break a budget)."""
    x_in = keras.Input(model.input_shape[1:])
    flat = keras.layers.Flatten()(x_in)
    dense = keras.layers.Dense(model.output_shape[-1], activation="softmax", kernel_initializer="zeros",
                               bias_initializer=keras.initializers.Constant([9.0] + [0.0] * (model.output_shape[-1] - 1)))
    return keras.Model(x_in, dense(flat))


def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, use_bias=False, name="c1")(x_in)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, use_bias=False, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    model = keras.Model(x_in, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(x)))
    images = np.random.default_rng(seed).uniform(0, 1, (128, 12, 12, 3)).astype(np.float32)
    for bn in ("bn1", "bn2"):  # trained-looking statistics, far from the defaults (0, 1)
        layer = model.get_layer(bn)
        inputs = _layer_input(model, bn, images)
        layer.moving_mean.assign(inputs.mean(axis=(0, 1, 2)))
        layer.moving_variance.assign(inputs.var(axis=(0, 1, 2)))
    return model, images


def test_batchnorm_statistics_are_re_estimated_in_graph_order():
    model, x = bn_model()
    separated, _ = separate(model, rank=1)
    done = recalibrate_batchnorm(separated, x)
    assert [d.path for d in done] == ["bn1", "bn2"]
    for bn in ("bn1", "bn2"):
        inputs = _layer_input(separated, bn, x).astype(np.float64)  # with bn1 already re-estimated
        layer = separated.get_layer(bn)
        np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5,
                                   err_msg=f"{bn}: moving mean must be its actual input mean")
        np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-6,
                                   err_msg=f"{bn}: moving variance must be its actual input variance")
    assert any(d.mean_shift > 0 for d in done), "separation at K=1 moved the statistics"
    exact, _ = separate(model, rank="full")
    for d in recalibrate_batchnorm(exact, x):
        assert d.mean_shift < 1e-3 and d.variance_ratio == pytest.approx(1.0, rel=1e-3), \
            "an exact separation leaves the statistics where they were"
    with pytest.raises(InvalidOptionError, match="needs images"):
        recalibrate_batchnorm(separated, x[:0])


def relative_feature_error(student, teacher, name, x):
    mine = keras.Model(student.inputs, student.get_layer(name).output)(x)
    theirs = keras.Model(teacher.inputs, teacher.get_layer(name).output)(x)
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    return float(np.sum((mine - theirs) ** 2) / np.sum(theirs ** 2))


def test_feature_distillation_matches_the_separated_layers():
    teacher, x, _ = teacher_and_data(n=256)
    plain, _ = separate(teacher, rank=1)
    matched, _ = separate(teacher, rank=1)
    finetune(plain, teacher, x, epochs=4, patience=4, verbose=0)
    result = finetune(matched, teacher, x, epochs=4, patience=4, verbose=0, feature_weight=5.0)
    assert result.feature_layers == ("c1", "c2")
    for name in ("c1", "c2"):
        assert relative_feature_error(matched, teacher, name, x) < relative_feature_error(plain, teacher, name, x), \
            f"{name}: feature distillation must bring the layer's output closer to the original's"
    with pytest.raises(InvalidOptionError, match="feature_layers"):
        finetune(matched, teacher, x, epochs=1, feature_weight=1.0, feature_layers=("nope",), verbose=0)


def test_a_start_no_epoch_beats_is_kept():
    teacher, x, y = teacher_and_data(n=128)
    exact, _ = separate(teacher, rank="full")
    before = [w.copy() for w in exact.get_weights()]
    result = finetune(exact, teacher, x, epochs=2, patience=2, verbose=0, learning_rate=0.05)
    assert result.best_epoch == 0 and result.initial_value == 1.0, "an exact separation agrees 100% at the start"
    for a, b in zip(before, exact.get_weights()):
        np.testing.assert_array_equal(a, b, err_msg="the start's weights must be restored")


def test_convert_model_budget_stages_and_checkpoints(tmp_path):
    teacher, x, y = teacher_and_data(n=1024)
    teacher.save(tmp_path / "teacher.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    lines = []
    result = convert_model(tmp_path / "teacher.keras", [tmp_path / "m.tflite"], data=str(tmp_path / "data.npz"),
                           quantize="none", max_accuracy_drop=15.0, epochs=4, measure_latency=False,
                           progress=lambda stage, message: lines.append((stage, message)))  # the stages, by accuracy
    recovery = result.recovery
    assert [s.name for s in recovery.stages] == ["original", "separated", "refined", "fine-tuned"], \
        "no BatchNorm in this model: no recalibration stage"
    assert recovery.budget.plan.ranks, "a 15-point budget separates something"
    assert recovery.budget.held and recovery.budget.measured_drop <= 15.0
    assert recovery.samples == 256 and recovery.validation_samples == 154 and result.data.train_samples == 614
    assert recovery.budget.plan.samples == 154, "the sensitivity is measured on the validation data, not the test data"
    original, final = recovery.stages[0], recovery.stages[-1]
    assert final.accuracy > recovery.stages[1].accuracy, f"recovery must beat the raw separation: {recovery}"
    assert original.accuracy - final.accuracy <= 0.15 + 1e-9
    assert final.params < original.params
    assert result.plan.defaults == ("refine", "recalibrate_bn"), "quantize was given"
    assert any(stage == "finetune" and message.startswith("epoch 1/4") for stage, message in lines)
    assert not (tmp_path / "m.tflite.checkpoints").exists(), "checkpoints go once the artifacts are written"
    (tmp_path / "m.tflite.checkpoints").mkdir()
    (tmp_path / "m.tflite.checkpoints" / "state.json").write_text("{}")  # an empty folder would be used (issue 27)
    with pytest.raises(CheckpointError, match="pass --resume to continue it, or delete the folder"):
        convert_model(tmp_path / "teacher.keras", [tmp_path / "n.tflite"], data=str(tmp_path / "data.npz"),
                      checkpoint_dir=str(tmp_path / "m.tflite.checkpoints"), quantize="none", rank=1)
    assert not (tmp_path / "n.tflite").exists()


def test_model_stages_score_the_same_as_predictions():
    teacher, x, y = teacher_and_data(n=64)
    stage = _Scorer(teacher, None, _Data(x, y)).stage("original", teacher, 0.0)
    assert stage.agreement == 1.0
    assert stage.accuracy == pytest.approx(float(np.mean(np.argmax(predict_keras(teacher, x)[0], 1) == y)))
    assert agreement(teacher, teacher, x) == 1.0


@pytest.mark.parametrize("frozen_pass", [True, False], ids=["frozen-pass", "no-frozen-pass"])
def test_a_batchnorm_model_gets_a_frozen_batchnorm_pass_judged_on_validation(tmp_path, frozen_pass):
    from sepconv.convert.data import Dataset
    from sepconv.convert.recovery.finetuning import FinetuneOptions
    from sepconv.convert.separation.policy import SeparationOptions
    from sepconv.convert.recovery.steps import RecoveryOptions, recover

    model, images = bn_model()
    y = np.argmax(predict_keras(model, images)[0], 1)
    data = [Dataset(images[i::3], y[i::3], "test") for i in range(3)]
    options = RecoveryOptions(separation=SeparationOptions(rank=1), epochs=1, checkpoint_dir=str(tmp_path / "ckpt"),
                              finetune=FinetuneOptions(frozen_batchnorm_pass=frozen_pass))
    _, _, report = recover(model, data[0], data[0].x, data[1], data[2], options)
    names = [stage.name for stage in report.stages]
    assert names == ["original", "separated", "fine-tuned"] + ["fine-tuned, BatchNorm frozen"] * frozen_pass, names
    assert (report.finetune_frozen is not None) == frozen_pass
    if frozen_pass:
        before, frozen = [s for s in report.stages[:-1] if s.kept][-1], report.stages[-1]
        # the pass is kept exactly when the validation accuracy did not fall
        assert frozen.kept == (frozen.val_accuracy >= before.val_accuracy), (before, frozen)


def test_the_frozen_batchnorm_pass_flag_maps_onto_finetune_options():
    from sepconv.convert.cli import convert_options, convert_parser

    off = convert_options(convert_parser().parse_args(["m.h5", "m.tflite", "--no-frozen-batchnorm-pass"]))
    assert off.finetune.frozen_batchnorm_pass is False
    assert convert_options(convert_parser().parse_args(["m.h5", "m.tflite"])).finetune.frozen_batchnorm_pass is True


def test_resume_refuses_other_data_and_an_empty_checkpoint_folder_is_used(tmp_path):
    """Issue 27: --resume took another --data file or --max-samples silently and went on at the saved epoch on a new
    split (images changing roles mid-run). The state keeps a fingerprint of each role's samples; another one is
    refused in one line that names the role and the counts. An existing empty --checkpoint-dir is simply used."""
    from sepconv.convert.data import Dataset
    from sepconv.convert.recovery.steps import RecoveryOptions, _fingerprint, _open_state, _save_state

    rng = np.random.default_rng(0)
    train = Dataset(rng.random((40, 4, 4, 3), dtype=np.float32), rng.integers(0, 3, 40), "d.npz")
    validation = Dataset(rng.random((10, 4, 4, 3), dtype=np.float32), rng.integers(0, 3, 10), "d.npz")
    folder = tmp_path / "ck"
    folder.mkdir()
    options = RecoveryOptions(epochs=1, checkpoint_dir=str(folder))
    data = _fingerprint(train=train, validation=validation, test=None)
    assert set(data) == {"train", "validation"} and data["train"]["samples"] == 40
    state = _open_state(folder, options, "abc", data)  # empty folder: a fresh state, not "holds checkpoints"
    _save_state(folder, state, plan=None, source_sha256="abc")
    resumed = replace(options, resume=True)
    assert _open_state(folder, resumed, "abc", data)["data"] == data, "the same data resumes"
    fewer = _fingerprint(train=Dataset(train.x[:30], train.y[:30], "d.npz"), validation=validation, test=None)
    with pytest.raises(CheckpointError, match=r"trained on other data \(train 40 samples then, 30 now\)"):
        _open_state(folder, resumed, "abc", fewer)
    relabelled = _fingerprint(train=Dataset(train.x, (train.y + 1) % 3, "d.npz"), validation=validation, test=None)
    with pytest.raises(CheckpointError, match=r"train other samples \(40\)"):
        _open_state(folder, resumed, "abc", relabelled)
    with pytest.raises(CheckpointError, match="holds checkpoints of an interrupted run"):
        _open_state(folder, options, "abc", data)


def two_headed(seed=0):
    """A classifier head and a 3-value regression head on one backbone."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    image = keras.Input((12, 12, 3))
    x = L.Conv2D(16, 3, activation="relu", name="c1")(image)
    x = L.Conv2D(16, 3, activation="relu", name="c2")(x)
    pooled = L.GlobalAveragePooling2D()(x)
    return keras.Model(image, [L.Dense(4, activation="softmax", name="classes")(pooled),
                               L.Dense(3, name="box")(pooled)])


def test_a_step_that_harms_only_the_second_output_is_rejected():
    """Issue 27: a model's other outputs were never scored, so a step that harmed only them was kept. Each output's
    validation agreement with the original is kept per stage (top-1 for a classifier head, cosine otherwise), and a
    step under which any of them falls is rejected, its weights put back."""
    from sepconv.convert.data import Dataset
    from sepconv.convert.recovery.steps import Context, Step, _run_step, _Scorer

    original = two_headed()
    model = keras.models.clone_model(original)
    model.set_weights(original.get_weights())
    rng = np.random.default_rng(0)
    validation, test = (Dataset(rng.random((60, 12, 12, 3), dtype=np.float32), None, "v") for _ in range(2))
    scorer = _Scorer(original, validation, test)
    stages = [scorer.stage("original", original, 0.0)]
    assert stages[0].val_outputs == (1.0, 1.0) and stages[0].val_agreement == 1.0

    def harm_the_box(context):
        kernel, bias = context.model.get_layer("box").get_weights()
        context.model.get_layer("box").set_weights([-kernel, bias])

    said = []
    context = Context(original=original, model=model, report=None, train=None, calibration=None,
                      validation=validation, options=None, folder=None, state={},
                      say=lambda stage, message: said.append(message))
    _run_step(Step("harmed", "harm", lambda c: True, harm_the_box), context, scorer, stages)
    harmed = stages[-1]
    assert not harmed.kept and "agreement of output 1 with the original 100.00% ->" in harmed.note, harmed
    assert harmed.val_agreement == 1.0, "the first output did not move: only the second one shows it"
    np.testing.assert_allclose(model.get_layer("box").get_weights()[0], original.get_layer("box").get_weights()[0],
                               err_msg="the step's weights are put back")
    _run_step(Step("untouched", "noop", lambda c: True, lambda c: None), context, scorer, stages)
    assert stages[-1].kept, stages[-1]


def test_the_budget_covers_every_output_of_a_two_headed_model(tmp_path):
    """The budget's sensitivity and its final check count every output: the measured drop is the worst output's."""
    from sepconv.convert.recovery.budget import _scorer

    original = two_headed()
    x = np.random.default_rng(1).random((60, 12, 12, 3), dtype=np.float32)
    baseline, score = _scorer(original, x, None)
    assert baseline == 100.0 and score(original) == pytest.approx(100.0)
    harmed = keras.models.clone_model(original)
    harmed.set_weights(original.get_weights())
    kernel, bias = harmed.get_layer("box").get_weights()
    harmed.get_layer("box").set_weights([-kernel, bias])  # cosine -1 -> agreement 0: a 100-point drop
    assert score(harmed) == pytest.approx(0.0), "the second output's drop counts, though the first kept 100%"
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(2).random((300, 12, 12, 3), dtype=np.float32))
    original.save(tmp_path / "two.keras")
    result = convert_model(tmp_path / "two.keras", [tmp_path / "two.tflite"], data=str(tmp_path / "d.npz"),
                           epochs=0, measure_latency=False)
    stages = result.recovery.stages
    assert all(stage.val_outputs is not None and len(stage.val_outputs) == 2 for stage in stages), stages
    final = [stage for stage in stages if stage.kept][-1]
    worst = max(100.0 * (1.0 - final.val_agreement), 100.0 * (1.0 - final.val_outputs[1]))
    assert result.recovery.budget.measured_drop == pytest.approx(worst, abs=1e-3), result.recovery.budget
    assert result.recovery.budget.held


def test_the_budget_on_a_named_output(tmp_path):
    """Issue 27: --budget-output NAME puts the budget on that output alone: the sensitivity scores it, the recovery's
    check and the artifact's check measure it; other outputs do not count; an unknown name is one line naming the
    outputs there are."""
    from sepconv.convert.errors import InvalidOptionError
    from sepconv.convert.recovery.budget import _scorer

    original = two_headed()
    x = np.random.default_rng(1).random((60, 12, 12, 3), dtype=np.float32)
    harmed = keras.models.clone_model(original)
    harmed.set_weights(original.get_weights())
    kernel, bias = harmed.get_layer("box").get_weights()
    harmed.get_layer("box").set_weights([-kernel, bias])  # the box head reversed: agreement 0 there
    assert _scorer(original, x, None, output=0)[1](harmed) == pytest.approx(100.0), "the classes alone: untouched"
    assert _scorer(original, x, None, output=1)[1](harmed) == pytest.approx(0.0), "the box alone: all lost"
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(2).random((300, 12, 12, 3), dtype=np.float32))
    original.save(tmp_path / "two.keras")
    for name, index in (("box", 1), ("0", 0)):
        result = convert_model(tmp_path / "two.keras", [tmp_path / f"{name}.tflite"], data=str(tmp_path / "d.npz"),
                               epochs=0, measure_latency=False, budget_output=name, quantize="none")
        budget = result.recovery.budget
        final = [stage for stage in result.recovery.stages if stage.kept][-1]
        expected = 100.0 * (1.0 - (final.val_outputs[1] if index else final.val_agreement))
        assert budget.plan.output == index and budget.measured_drop == pytest.approx(expected, abs=1e-3), budget
        check = result.artifacts[0].verification.budget
        assert check.metric == "agreement" and check.samples == result.recovery.validation_samples, check
    with pytest.raises(InvalidOptionError, match=r"no such output; its outputs are 0: classes, 1: box"):
        convert_model(tmp_path / "two.keras", [tmp_path / "x.tflite"], data=str(tmp_path / "d.npz"), epochs=0,
                      measure_latency=False, budget_output="boxes")
    with pytest.raises(InvalidOptionError, match="needs the budget"):
        convert_model(tmp_path / "two.keras", [tmp_path / "y.tflite"], budget_output="box")


def test_the_artifacts_budget_check_takes_the_worst_output():
    """The budget on each artifact counts every output (the worst drop), or the named one alone."""
    from types import SimpleNamespace

    from sepconv.convert.data import Dataset
    from sepconv.convert.export.verification import Verification, within_budget
    from sepconv.convert.pipeline import HeldOut

    rng = np.random.default_rng(0)
    classes, box = np.eye(4)[rng.integers(0, 4, 50)], rng.standard_normal((50, 3))
    runtime = SimpleNamespace(run=lambda inputs: [classes[:len(inputs[0])], -box[:len(inputs[0])]])  # box reversed
    held = HeldOut(Dataset(np.zeros((50, 2), np.float32), None, "v"), None, np.argmax(classes, 1), [classes, box])

    def budget_of(output):
        plan = SimpleNamespace(output=output, max_drop=1.0)
        recovery = SimpleNamespace(budget=SimpleNamespace(plan=plan), stages=[SimpleNamespace(val_accuracy=None)])
        verification = Verification(artifact="a", quantize="int8", samples=50, inputs="v", outputs=())
        return within_budget(verification, runtime, held, recovery).budget

    assert budget_of(None).drop == pytest.approx(100.0) and not budget_of(None).held, "the box head lost everything"
    assert budget_of(0).drop == pytest.approx(0.0) and budget_of(0).held, "the classes alone: nothing lost"
    assert budget_of(1).drop == pytest.approx(100.0)

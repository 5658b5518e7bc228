"""The latency-aware choice of K per layer (convert/recovery/latency_choice.py) on synthetic sensitivities and latency tables; the
table measured on tiny models (convert/recovery/latency_table.py, deploy/timing.py) and convert_model's use of it."""

import itertools
import json

import numpy as np
import pytest

from sepconv.convert.recovery.budget import KEEP, Candidate, LayerSensitivity
from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.recovery.latency_choice import (LatencyTarget, LatencyTargetError, WholeModel, choose_for_latency,
                                                     predict_ms)


def layer(path, drops, params):
    """K=1, 2, ... with these drops and parameter counts, then KEEP (drop 0, params[-1])."""
    candidates = [Candidate(k + 1, p, 0.0, d) for k, (d, p) in enumerate(zip(drops, params[:-1]))]
    return LayerSensitivity(path, len(drops), tuple(candidates) + (Candidate(KEEP, params[-1], 0.0, 0.0),))


def row(keep, *ks):
    return {"keep": keep, **{str(k + 1): ms for k, ms in enumerate(ks)}}


def total_drop(layers, ranks):
    return sum(max(0.0, s.candidate(ranks.get(s.path, KEEP)).drop) for s in layers)


def test_a_separation_slower_than_keeping_is_never_chosen():
    layers = (layer("fast", [0.0, 0.0], [10, 20, 100]), layer("slow", [0.0, 0.0], [10, 20, 100]))
    table = {"fast": row(0.030, 0.010, 0.020), "slow": row(0.030, 0.045, 0.031)}
    choice = choose_for_latency(layers, table, max_drop=50.0, original_ms=0.12)
    assert choice.ranks == {"fast": 1}, "the slow layer is slower separated at every K: kept, though it is free"
    slow = choice.layers[1]
    assert slow.rank == KEEP and slow.slower == (1, 2) and slow.fastest_rank == KEEP
    assert choice.table_sum_ms == pytest.approx(0.040) and choice.predicted_delta_ms == pytest.approx(-0.020)
    assert choice.predicted_ms == pytest.approx(0.080), "the table's sum for the plan, scaled as keeping both is to the " \
                                                        "original (0.06 -> 0.12 ms)"


def test_the_fastest_plan_within_the_accuracy_budget():
    # a: K=1 is fastest but costs 0.8 points; b: K=1 costs 0.5; both at K=1 is over a 1-point budget
    layers = (layer("a", [0.8, 0.1], [10, 20, 100]), layer("b", [0.5, 0.0], [10, 20, 100]))
    table = {"a": row(1.0, 0.2, 0.5), "b": row(1.0, 0.6, 0.7)}
    choice = choose_for_latency(layers, table, max_drop=1.0, original_ms=2.0)
    assert choice.ranks == {"a": 1, "b": 2}, "a's K=1 saves 0.3 ms more than a's K=2; b's K=2 is free"
    assert choice.predicted_drop == pytest.approx(0.8) and choice.predicted_ms == pytest.approx(2.0 - 0.8 - 0.3)
    assert choose_for_latency(layers, table, max_drop=0.0, original_ms=2.0).ranks == {"b": 2}, \
        "no budget: only the free separation"
    assert choose_for_latency(layers, table, max_drop=2.0).ranks == {"a": 1, "b": 1}


def test_ties_in_latency_go_to_the_smaller_layer():
    layers = (layer("a", [0.0, 0.0], [10, 20, 100]),)
    choice = choose_for_latency(layers, {"a": row(1.0, 0.5, 0.5)}, max_drop=1.0)
    assert choice.ranks == {"a": 1}


def test_a_target_takes_the_least_accuracy_loss_that_meets_it():
    layers = (layer("a", [0.8, 0.1], [10, 20, 100]), layer("b", [0.5, 0.0], [10, 20, 100]))
    table = {"a": row(1.0, 0.2, 0.5), "b": row(1.0, 0.6, 0.7)}
    choice = choose_for_latency(layers, table, max_drop=1.0, original_ms=2.0, target=LatencyTarget(ms=1.3))
    assert choice.ranks == {"a": 2, "b": 2}, "1.2 ms at 0.1 points meets 1.3 ms; the fastest plan (0.9) loses 0.8"
    assert choice.predicted_drop == pytest.approx(0.1) and choice.predicted_ms == pytest.approx(1.2)
    assert choice.target_ms == 1.3
    speedup = choose_for_latency(layers, table, max_drop=1.0, original_ms=2.0, target=LatencyTarget(speedup=2.0 / 1.3))
    assert speedup.ranks == choice.ranks and speedup.target_ms == pytest.approx(1.3)
    doubled = choose_for_latency(layers, table, max_drop=1.0, original_ms=4.0, target=LatencyTarget(speedup=2.0 / 1.3))
    assert doubled.ranks == choice.ranks and doubled.predicted_ms == pytest.approx(2.4), \
        "a speed-up target does not depend on the scale between the table and the whole model"
    with pytest.raises(LatencyTargetError, match=r"no plan within --max-accuracy-drop 1.0 is predicted to reach 0.8 ms: "
                                                 r"the fastest is 0.9 ms \(the original: 2 ms\); raise"):
        choose_for_latency(layers, table, max_drop=1.0, original_ms=2.0, target=LatencyTarget(ms=0.8))


def test_bad_tables_and_targets_are_refused():
    layers = (layer("a", [0.0], [10, 100]),)
    with pytest.raises(InvalidOptionError, match=r"no 'keep' latency for \['a'\]"):
        choose_for_latency(layers, {"a": {"1": 0.1}}, max_drop=1.0)
    with pytest.raises(InvalidOptionError, match="needs the original model's measured latency"):
        choose_for_latency(layers, {"a": row(1.0, 0.5)}, max_drop=1.0, target=LatencyTarget(speedup=2.0))
    with pytest.raises(InvalidOptionError, match="give one of them"):
        LatencyTarget(ms=1.0, speedup=2.0)
    with pytest.raises(InvalidOptionError, match=r"Unrecognized target speed-up -1"):
        LatencyTarget(speedup=-1)


def test_predict_ms_scales_the_tables_sum_to_the_original():
    table = {"a": row(1.0, 0.2), "b": row(0.5, 0.7)}
    assert predict_ms(table, {}, 3.0) == pytest.approx(3.0), "keeping every layer is the original"
    assert predict_ms(table, {"a": 1, "b": KEEP}, 3.0) == pytest.approx(2 * (0.2 + 0.5))
    assert predict_ms(table, {"a": 1, "b": 1}, 3.0) == pytest.approx(2 * (0.2 + 0.7))


def test_the_whole_model_is_the_line_through_two_timed_models():
    """mobilenet_v1's table (int8, AMD EPYC): the two separable candidates are 0.019 of its 0.030 ms; the rest of
    the model does not change with the plan, so the scaled sum predicted 2.42x where 1.60x was measured."""
    table = {"stem": row(0.00358, 0.00466), "head": row(0.01545, 0.00428)}
    whole = WholeModel.fit(0.01903, 0.03015, plan_sum_ms=0.00894, plan_ms=0.01990, least_sum_ms=0.00786)
    assert whole.method == "fitted"
    assert whole.predict(0.01903) == pytest.approx(0.03015) and whole.predict(0.00894) == pytest.approx(0.01990), \
        "through both timed models"
    assert whole.scale == pytest.approx(0.01025 / 0.01009), "(0.03015 - 0.01990) / (0.01903 - 0.00894)"
    assert predict_ms(table, {"head": 1}, 0.03015, whole) == pytest.approx(0.03015 - whole.scale * (0.01545 - 0.00428)), \
        "the rest of the model is unchanged: only head's change counts, at the line's slope"
    assert predict_ms(table, {"head": 1}, 0.03015) == pytest.approx(0.03015 * (0.00358 + 0.00428) / 0.01903), \
        "without the second model: the sum scaled to the original"
    layers = (layer("stem", [0.0], [10, 100]), layer("head", [0.0], [10, 100]))
    fitted = choose_for_latency(layers, table, 1.0, original_ms=0.03015, whole=whole)
    scaled = choose_for_latency(layers, table, 1.0, original_ms=0.03015)
    assert fitted.ranks == scaled.ranks == {"head": 1}, "stem's K=1 is slower than kept; the choice is the same"
    assert fitted.predicted_ms == pytest.approx(whole.predict(0.00358 + 0.00428))
    assert fitted.whole_model == {"scale": whole.scale, "rest_ms": whole.rest_ms, "method": "fitted"}
    assert scaled.whole_model["method"] == "proportional"
    with pytest.raises(LatencyTargetError, match="the fastest is 0.01"):
        choose_for_latency(layers, table, 1.0, original_ms=0.03015, whole=whole, target=LatencyTarget(speedup=2.0))
    assert choose_for_latency(layers, table, 1.0, original_ms=0.03015, target=LatencyTarget(speedup=2.0)).ranks == \
        {"head": 1}, "the scaled sum promised 2.42x"


@pytest.mark.parametrize("plan_sum, plan_ms, least_sum, why", [
    (None, None, None, "no second model"),
    (0.99, 0.5, None, "two sums 1% apart fix no slope"),
    (0.5, 1.2, None, "the faster plan measured slower: a line that falls"),
    (0.5, 0.1, 0.05, "predicts no time at the table's least sum"),
])
def test_a_line_the_two_models_cannot_fix_falls_back_to_the_scaled_sum(plan_sum, plan_ms, least_sum, why):
    whole = WholeModel.fit(1.0, 1.1, plan_sum, plan_ms, least_sum_ms=least_sum)
    assert whole == WholeModel.proportional(1.0, 1.1) and whole.method == "proportional", why


@pytest.mark.parametrize("seed", range(40))
def test_the_choice_is_the_best_of_every_plan(seed):
    """Against brute force over every plan of random 4-layer problems: the choice is within the budget, never
    slower than keeping a layer, and as fast (no target) or as accurate then as fast (target) as the best plan."""
    rng = np.random.default_rng(seed)
    layers, table = [], {}
    for index in range(4):
        drops = np.round(rng.uniform(-0.2, 1.0, size=3), 3).tolist()
        layers.append(layer(f"l{index}", drops, [10, 20, 40, 100]))
        table[f"l{index}"] = row(*np.round(rng.uniform(0.01, 1.0, size=4), 4).tolist())
    max_drop = float(np.round(rng.uniform(0.0, 2.0), 3))
    plans = []
    for combo in itertools.product(*[[c.rank for c in s.candidates] for s in layers]):
        ranks = dict(zip(table, combo))
        if total_drop(layers, ranks) <= max_drop + 1e-9:
            plans.append((predict_ms(table, ranks, 5.0), total_drop(layers, ranks)))
    choice = choose_for_latency(layers, table, max_drop, original_ms=5.0)
    assert total_drop(layers, choice.ranks) <= max_drop + 1e-9
    for chosen in choice.layers:
        assert chosen.rank == KEEP or chosen.ms <= chosen.keep_ms, f"{chosen.path}: slower than keeping it"
    assert choice.predicted_ms == pytest.approx(min(ms for ms, _ in plans))
    target = float(np.round(rng.uniform(4.0, 5.0), 3))
    reachable = [(drop, ms) for ms, drop in plans if ms <= target + 1e-9]
    if not reachable:
        with pytest.raises(LatencyTargetError):
            choose_for_latency(layers, table, max_drop, original_ms=5.0, target=LatencyTarget(ms=target))
        return
    targeted = choose_for_latency(layers, table, max_drop, original_ms=5.0, target=LatencyTarget(ms=target))
    least = min(drop for drop, _ in reachable)
    assert targeted.predicted_ms <= target + 1e-9
    assert targeted.predicted_drop == pytest.approx(least, abs=1e-9)
    assert targeted.predicted_ms == pytest.approx(min(ms for drop, ms in reachable if drop <= least + 1e-9))


# ------------------------------------------------------------------ the table, measured (tiny models, short timing)

@pytest.fixture(scope="module")
def tiny():
    from test_finetuning import teacher_and_data

    teacher, x, y = teacher_and_data(n=64)
    return teacher, x, y


def test_single_layer_models_are_the_layer_as_it_will_run(tiny):
    import keras

    from sepconv.convert.recovery.latency_table import single_layer_model
    from sepconv.convert.graph import predict_keras

    teacher, x, _ = tiny
    layer_c2 = teacher.get_layer("c2")
    inputs = predict_keras(keras.Model(teacher.inputs, layer_c2.input), x[:8])[0]
    kept = single_layer_model(layer_c2, KEEP)
    np.testing.assert_allclose(predict_keras(kept, inputs)[0], predict_keras(keras.Model(
        layer_c2.input, layer_c2.output), inputs)[0], rtol=1e-5, atol=1e-5,
        err_msg="the kept single-layer model computes what the layer does (float32, same weights)")
    separated = single_layer_model(layer_c2, 1)
    assert [type(l).__name__ for l in separated.layers[1:]] == ["SeparableConv2D"]
    assert separated.layers[1].depth_multiplier == 1 and separated.layers[1].strides == (2, 2)
    assert single_layer_model(teacher.get_layer("c1"), 9) is None, "3 -> 16 channels at K=9 is not smaller: kept"


def test_measure_table_times_every_candidate_once_then_reads_the_cache(tiny, tmp_path):
    from sepconv.convert.recovery.latency_table import LatencyOptions, _Cache, measure_table
    from sepconv.convert.export.tflite import TFLiteOptions
    from sepconv.deploy.timing import TimingOptions

    teacher, _, _ = tiny
    layers = (layer("c1", [0.0, 0.0], [10, 20, 100]), layer("c2", [0.0], [10, 100]))
    options = LatencyOptions(timing=TimingOptions(min_seconds=0.02, min_runs=5), cache_dir=str(tmp_path),
                             export=TFLiteOptions(quantize="none"))
    said = []
    first = measure_table(teacher, layers, options, progress=lambda stage, message: said.append(message))
    again = 2 if any("timing both again" in message for message in said) else 0  # two whole models that contradicted
    # the table on this run's noise (0.02 s each, a loaded machine) are timed once more, and count as measured
    assert first["measured"] == 8 + again and first["cached"] == 0, (
        "the original, c1 at K=1, K=2 in both forms and kept, c2 at K=1 and kept, the model with both at K=1", said)
    whole = first["whole_model"]
    assert whole["least"] == {"c1": 1, "c2": 1} and whole["least_ms"] > 0
    assert whole["least_sum_ms"] == pytest.approx(first["layers"]["c1"]["1"] + first["layers"]["c2"]["1"], abs=1e-5)
    assert whole["method"] in ("fitted", "proportional")
    if whole["method"] == "fitted":
        line = WholeModel(whole["scale"], whole["rest_ms"], "fitted")
        assert line.predict(first["raw_keep_sum_ms"]) == pytest.approx(first["original_ms"], rel=1e-3)
        assert line.predict(whole["least_sum_ms"]) == pytest.approx(whole["least_ms"], rel=1e-3)
    assert set(first["forms"]) == {"c1"} and first["forms"]["c1"]["2"] in ("separable", "tiled"), first["forms"]
    assert set(first["layers"]) == {"c1", "c2"} and set(first["layers"]["c1"]) == {"1", "2", "keep"}
    assert set(first["layers"]["c2"]) == {"1", "keep"}
    assert all(ms > 0 for row in first["layers"].values() for ms in row.values()) and first["original_ms"] > 0
    assert first["where"] == "local" and first["runtime"].startswith("ai-edge-litert ")
    assert first["raw_keep_sum_ms"] == pytest.approx(first["layers"]["c1"]["keep"] + first["layers"]["c2"]["keep"])
    said.clear()
    second = measure_table(teacher, layers, options, progress=lambda stage, message: said.append(message))
    again = 2 if any("timing both again" in message for message in said) else 0  # as above: noise on a loaded machine
    assert second["measured"] == again and second["cached"] == 8 - again, said
    assert again or second["whole_model"] == first["whole_model"]
    assert second["layers"] == first["layers"] and (again or second["original_ms"] == first["original_ms"])
    cache_files = list(tmp_path.glob("*.json"))
    assert len(cache_files) == 1, "one file per device"
    cache = _Cache(options, {"where": "local", "device": second["device"], "xnnpack": True})
    spec = json.dumps({"x": 1})
    cache.put(spec, 1, "ai-edge-litert 2.3.0", 0.5, "x")
    assert cache.get(spec, 1, "ai-edge-litert 2.3.0") == 0.5
    assert cache.get(spec, 1, "ai-edge-litert 9.9.9") is None, "another runtime version is another measurement"
    assert cache.get(spec, 1, None) is None, "a device without its runtime has nothing cached"


def test_two_whole_models_that_contradict_the_table_are_timed_again(tiny, monkeypatch):
    """The least-K model measured slower than the original where the table says it is faster (a noisy measurement,
    or a cached one from another day): both are timed again, together, and the line is fitted from the new pair."""
    from sepconv.convert.recovery import latency_table
    from sepconv.convert.recovery.latency_table import LEAST, ORIGINAL, LatencyOptions, _Measured, measure_table

    teacher, _, _ = tiny
    layers = (layer("c1", [0.0], [10, 100]), layer("c2", [0.0], [10, 100]))
    table_ms = {ORIGINAL: 1.0, "c1 1": 0.1, "c1 0": 0.4, "c2 1": 0.2, "c2 0": 0.4, LEAST: 2.0}
    calls = []

    def fake(entries, options, say, what, *, together=(), fresh=False):
        calls.append(([entry.what for entry in entries], fresh))
        again = {ORIGINAL: 1.02, LEAST: 0.52}
        ms = [(again if fresh else table_ms).get(entry.what, table_ms.get(f"{entry.what} {entry.rank}"))
              for entry in entries]
        identity = {"where": "local", "device": {"cpu": "test"}, "runtime": "ai-edge-litert test", "xnnpack": True}
        return _Measured(ms, identity, len(entries))

    monkeypatch.setattr(latency_table, "_time_entries", fake)
    said = []
    table = measure_table(teacher, layers, LatencyOptions(), progress=lambda stage, message: said.append(message))
    assert len(calls) == 2 and calls[1] == ([ORIGINAL, LEAST], True), calls
    assert any("timing both again" in message for message in said), said
    whole = table["whole_model"]
    assert whole["method"] == "fitted" and whole["least_ms"] == 0.52 and table["original_ms"] == 1.02
    assert whole["least"] == {"c1": 1, "c2": 1} and whole["least_sum_ms"] == pytest.approx(0.3)
    assert whole["scale"] == pytest.approx((1.02 - 0.52) / (0.8 - 0.3))
    assert table["measured"] == len(calls[0][0]) + 2, "the second timing counts as measured"


@pytest.mark.parametrize("content, kept, damaged", [
    ("{not json", 0, "not JSON"),
    ("[1, 2]", 0, "no {\"entries\""),
    ('{"entries": [1]}', 0, "no {\"entries\""),
    ('{"entries": {"a": "x", "b": {"ms": "0.2"}, "c": {"ms": 0}, "d": {"ms": 1e-7}, "e": {"ms": NaN},'
     ' "f": {"ms": -3}, "g": {"ms": true}, "h": {"ms": 0.25}}}', 1, None),
    ("[" * 100000 + "]" * 100000, 0, "not JSON"),
])
def test_a_damaged_latency_cache_is_set_aside_or_its_bad_entries_dropped(tmp_path, content, kept, damaged):
    """Issue 27: a cache entry of 0 ms, 1e-7 ms, a string, NaN, a negative or a boolean, entries that are a list, a
    file that is not JSON (or nested past the parser): never a traceback. A file that is not the cache's JSON is set
    aside (NAME.damaged) with one line; bad entries are dropped with one line; the valid ones are kept."""
    from sepconv.convert.recovery.latency_table import LatencyOptions, _Cache, cache_path

    options = LatencyOptions(cache_dir=str(tmp_path))
    identity = {"where": "local", "device": {"cpu": "test"}, "xnnpack": True}
    path = cache_path(options, identity)
    path.write_text(content)
    said = []
    cache = _Cache(options, identity, lambda stage, message: said.append(message))
    assert len(cache.entries) == kept and len(said) == 1, (cache.entries, said)
    if damaged:
        assert damaged in said[0] and "set aside as" in said[0] and not path.exists(), said
        assert path.with_name(path.name + ".damaged").read_text() == content, "the user's file is kept, aside"
    else:
        assert "7 of 8 cached timings" in said[0] and cache.entries == {"h": {"ms": 0.25}}, said
    cache.save({"where": "local"})
    assert json.loads(path.read_text())["entries"] == cache.entries, "rebuilt"


def test_a_cache_path_that_is_a_folder_leaves_nothing_behind(tmp_path):
    from sepconv.convert.recovery.latency_table import LatencyOptions, _Cache, cache_path

    options = LatencyOptions(cache_dir=str(tmp_path))
    identity = {"where": "local", "device": {"cpu": "test"}, "xnnpack": True}
    cache_path(options, identity).mkdir()
    said = []
    cache = _Cache(options, identity, lambda stage, message: said.append(message))
    assert cache.entries == {} and "unreadable" in said[0], said
    cache.put("{}", 1, "ai-edge-litert test", 0.5, "x")
    cache.save({"where": "local"})
    assert [p.name for p in tmp_path.iterdir()] == [cache_path(options, identity).name], "no .partial left"


def test_cached_layer_timings_slower_than_the_whole_model_are_timed_again(tiny, monkeypatch):
    """A single layer cannot take longer than the whole model it is part of: a cached entry 1.5x over it (a timing on
    a busy machine) is timed again, fresh, with the two whole models, in one run; the table takes the new values."""
    from sepconv.convert.recovery import latency_table
    from sepconv.convert.recovery.latency_table import LEAST, ORIGINAL, LatencyOptions, _Measured, measure_table

    teacher, _, _ = tiny
    layers = (layer("c1", [0.0], [10, 100]), layer("c2", [0.0], [10, 100]))
    cached_ms = {ORIGINAL: 1.0, "c1 1": 0.1, "c1 0": 9.0, "c2 1": 0.2, "c2 0": 0.4, LEAST: 0.5}
    fresh_ms = {ORIGINAL: 1.0, "c1 0": 0.45, LEAST: 0.5}
    calls = []

    def fake(entries, options, say, what, *, together=(), fresh=False):
        calls.append(([entry.what for entry in entries], fresh))
        source = fresh_ms if fresh else cached_ms
        ms = [source.get(entry.what, source.get(f"{entry.what} {entry.rank}")) for entry in entries]
        identity = {"where": "local", "device": {"cpu": "test"}, "runtime": "ai-edge-litert test", "xnnpack": True}
        return _Measured(ms, identity, 0 if not fresh else len(entries),
                         set() if fresh else set(range(len(entries))))

    monkeypatch.setattr(latency_table, "_time_entries", fake)
    said = []
    table = measure_table(teacher, layers, LatencyOptions(), progress=lambda stage, message: said.append(message))
    assert calls[1] == ([ORIGINAL, "c1", LEAST], True), calls
    assert any("exceed 1.5x the whole model" in message and "c1: 9.0000 ms" in message for message in said), said
    assert table["layers"]["c1"]["keep"] == 0.45 and table["measured"] == 3 and table["cached"] == len(calls[0][0]) - 3


def test_a_measurement_far_slower_than_predicted_or_short_of_the_target_is_flagged():
    from sepconv.convert.export.speed import Speed, with_prediction

    speed = Speed(artifact_ms=1.0, artifact_ci95_ms=(0.95, 1.05), original_ms=1.2, original_ci95_ms=(1.15, 1.25),
                  speedup=1.2, speedup_ci95=(1.1, 1.3), verdict="faster", shipped="separated", where="local",
                  device="cpu", runtime="rt", threads=1, xnnpack=True, format="tflite", quantize="int8")
    assert not speed.mispredicted and not speed.missed_target, "no prediction, no target: nothing to flag"
    assert with_prediction(speed, 0.45).mispredicted, "1.0 ms measured against 0.45 predicted: more than twice"
    assert not with_prediction(speed, 0.55).mispredicted
    assert with_prediction(speed, 0.9, target_speedup=1.5).missed_target, "1.2x (1.1-1.3) is short of 1.5x"
    assert not with_prediction(speed, 0.9, target_speedup=1.25).missed_target, "within the interval: not shown short"


def test_convert_model_chooses_for_latency_and_reports_prediction_and_measurement(tiny, tmp_path):
    from sepconv.convert.recovery.latency_table import LatencyOptions
    from sepconv.convert.pipeline import convert_model
    from sepconv.deploy.timing import TimingOptions

    teacher, x, y = tiny
    teacher.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    options = LatencyOptions(target=LatencyTarget(speedup=0.5), timing=TimingOptions(min_seconds=0.02, min_runs=5),
                             cache_dir=str(tmp_path / "cache"))
    result = convert_model(tmp_path / "m.keras", [tmp_path / "m.tflite"], data=str(tmp_path / "d.npz"), epochs=0,
                           quantize="none", max_accuracy_drop=50.0, refine=False, recalibrate_bn=False,
                           latency=options)
    budget = result.recovery.budget.plan
    latency = budget.latency
    assert latency["table"]["format"] == "tflite" and latency["table"]["quantize"] == "none"
    assert budget.ranks == latency["choice"]["ranks"], "the separation follows the latency choice"
    assert latency["choice"]["target_ms"] == pytest.approx(2 * latency["table"]["original_ms"])
    for row in latency["choice"]["layers"]:
        assert row["rank"] == KEEP or row["ms"] <= row["keep_ms"], f"{row['path']} separated though slower"
    speed = result.artifacts[0].speed
    manifest = json.loads((tmp_path / "m.tflite.json").read_text())
    assert manifest["recovery"]["budget"]["latency"]["choice"]["ranks"] == budget.ranks
    text = result.table()
    assert "us chosen" in text and "whole model predicted" in text
    if not result.separation.separated:  # every layer kept (the least accuracy loss meeting 0.5x): nothing to time
        assert speed is None and "speed" not in manifest
        return
    assert speed.artifact_ms > 0 and speed.original_ms > 0 and speed.format == "tflite" and speed.quantize == "none"
    assert speed.predicted_ms == pytest.approx(latency["choice"]["predicted_ms"], rel=1e-3)
    assert speed.speedup == pytest.approx(speed.original_ms / speed.artifact_ms, rel=1e-2)
    assert manifest["speed"]["artifact_ms"] == speed.artifact_ms and manifest["speed"]["shipped"] == speed.shipped
    assert "m.tflite: measured" in text


def test_timing_says_where_and_with_what_it_measures():
    from sepconv.deploy.errors import InvalidOptionError as DeployOptionError
    from sepconv.deploy.timing import TimingOptions, identify

    here = identify(None, ".tflite", TimingOptions(xnnpack=False))
    assert here["where"] == "local" and here["runtime"].startswith("ai-edge-litert ") and here["xnnpack"] is False
    assert here["device"]["machine"] and here["device"]["emulated"] is False
    onnx = identify(None, ".onnx")
    assert onnx["runtime"].startswith("onnxruntime ") and onnx["xnnpack"] is None, "XNNPACK is LiteRT's alone"
    with pytest.raises(DeployOptionError, match=r"Unrecognized artifact extension '.pt'"):
        identify(None, ".pt")
    with pytest.raises(DeployOptionError, match=r"Unrecognized threads=0"):
        TimingOptions(threads=0)


def test_the_device_side_of_timing_needs_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys\nfor name in ('tensorflow', 'keras', 'tf_keras'):\n    sys.modules[name] = None\n"
            "from sepconv.deploy.timing import identify, time_artifacts\n"
            "print(identify(None, '.tflite')['runtime'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ai-edge-litert "), done.stderr[-2000:]


def _wide():
    """A CNN whose separation pays on any CPU (64 channels, 3x3: K=1 has about 8x fewer multiply-adds), with its own
    predictions as labels: the tiny model's choice between separating and keeping depends on the machine (on an
    Intel Xeon it kept both layers, so nothing was timed)."""
    import keras

    keras.utils.set_random_seed(3)
    image = keras.Input((24, 24, 16))
    x = keras.layers.Conv2D(64, 3, activation="relu", name="c1")(image)
    x = keras.layers.Conv2D(64, 3, strides=2, activation="relu", name="c2")(x)
    model = keras.Model(image, keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    x = np.random.default_rng(3).uniform(0, 1, (64, 24, 24, 16)).astype(np.float32)
    return model, x, np.argmax(model.predict(x, verbose=0), 1)


def test_a_poisoned_cache_is_caught_by_timing_the_artifact_and_set_aside(tmp_path):
    """Issue 27: cached timings that promise far more than the model gives (here every entry cut to a fifth, as if
    timed on a faster machine under the same name) make the plan's prediction wrong; the artifact's own timing
    against the original shows it, the run says so, and the device's cache is set aside (.stale) so that the next
    run times everything again."""
    from sepconv.convert.pipeline import convert_model
    from sepconv.convert.recovery.latency_table import LatencyOptions
    from sepconv.deploy.timing import TimingOptions

    teacher, x, y = _wide()
    teacher.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    options = LatencyOptions(timing=TimingOptions(min_seconds=0.02, min_runs=5), cache_dir=str(tmp_path / "cache"))
    run = dict(data=str(tmp_path / "d.npz"), epochs=0, quantize="none", max_accuracy_drop=50.0, refine=False,
               recalibrate_bn=False, latency=options)
    convert_model(tmp_path / "m.keras", [tmp_path / "a.tflite"], **run)
    [path] = (tmp_path / "cache").glob("*.json")
    content = json.loads(path.read_text())
    for entry in content["entries"].values():  # consistently: the table's own checks cannot see it
        entry["ms"] *= 0.2
    path.write_text(json.dumps(content))
    said = []
    result = convert_model(tmp_path / "m.keras", [tmp_path / "b.tflite"], progress=lambda s, m: said.append(m), **run)
    speed = result.artifacts[0].speed
    assert result.recovery.budget.plan.latency["table"]["measured"] == 0, "the poisoned entries were read"
    assert result.separation.separated, "the wide model's separation pays: something is separated and timed"
    assert speed is not None and speed.mispredicted, speed
    assert any("the latency cache" in line and "set aside as" in line for line in said), said
    assert not path.exists() and path.with_name(path.name + ".stale").exists()

"""Never slower (convert/export/speed.py, staging.py): each artifact timed against the original converted the same
way; the verdict on synthetic timings; a slower separated artifact replaced by the verified original unless the user
forced the rank; --no-latency times nothing."""

import json

import numpy as np
import pytest

from sepconv.convert.export import speed as speed_module
from sepconv.convert.export.speed import EQUAL, FASTER, SLOWER, Speed, speedup_interval, verdict
from sepconv.convert.export.verification import Tolerance


def test_the_speedup_interval_holds_both_medians_uncertainty():
    ratio, (low, high) = speedup_interval((1.0, 0.9, 1.1), (0.5, 0.45, 0.55))
    assert ratio == pytest.approx(2.0)
    assert low == pytest.approx(0.9 / 0.55) and high == pytest.approx(1.1 / 0.45)
    with pytest.raises(ValueError, match="positive"):
        speedup_interval((1.0, 0.0, 1.1), (0.5, 0.45, 0.55))


@pytest.mark.parametrize("interval, expected", [((1.01, 1.4), FASTER), ((0.7, 0.99), SLOWER), ((0.95, 1.05), EQUAL),
                                                ((1.0, 1.3), EQUAL), ((0.8, 1.0), EQUAL)])
def test_the_verdict_calls_slower_only_what_the_interval_puts_below_one(interval, expected):
    assert verdict(interval) == expected


def timed(artifact_ms, original_ms, spread=0.02):
    """What speed.compare would measure: a Speed with both medians +- spread."""
    ratio, interval = speedup_interval((original_ms, original_ms * (1 - spread), original_ms * (1 + spread)),
                                       (artifact_ms, artifact_ms * (1 - spread), artifact_ms * (1 + spread)))
    return lambda artifact, original, *, where, timing, fmt, quantize, say=None, original_quantize=None: Speed(
        artifact_ms=artifact_ms, artifact_ci95_ms=(artifact_ms * 0.98, artifact_ms * 1.02), original_ms=original_ms,
        original_ci95_ms=(original_ms * 0.98, original_ms * 1.02), speedup=round(ratio, 3), speedup_ci95=interval,
        verdict=verdict(interval), shipped="separated", where="local", device="test CPU", runtime="ai-edge-litert",
        threads=1, xnnpack=True, format=fmt, quantize=quantize, original_quantize=original_quantize)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from test_finetuning import teacher_and_data

    teacher, x, y = teacher_and_data(n=96)
    folder = tmp_path_factory.mktemp("speed")
    teacher.save(folder / "m.keras")
    np.savez(folder / "d.npz", x=x, y=y)
    return folder


def convert(folder, out, monkeypatch, measured, **options):
    from sepconv.convert import staging
    from sepconv.convert.pipeline import convert_model

    calls, lines = [], []
    if measured is not None:
        def fake(*args, **kwargs):
            calls.append(args)
            return measured(*args, **kwargs)

        monkeypatch.setattr(staging, "compare", fake)
    options = {"quantize": "none", **options}
    result = convert_model(folder / "m.keras", [out], data=str(folder / "d.npz"), epochs=0, refine=False,
                           recalibrate_bn=False, progress=lambda stage, message: lines.append(message), **options)
    return result, calls, lines


def test_a_slower_separation_ships_the_original_converted_the_same_way(tiny_files, tmp_path, monkeypatch):
    """The timing is faked (a separated artifact 2x slower); what ships is the original's own export, verified, and
    the manifest says why. Every other part is the real pipeline."""
    from sepconv.convert.loading import load
    from sepconv.convert.graph import predict_keras
    from sepconv.deploy.runtime import open_runtime

    out = tmp_path / "slow.tflite"
    _latency_by_size(monkeypatch)
    result, calls, lines = convert(tiny_files, out, monkeypatch, timed(artifact_ms=0.2, original_ms=0.1),
                                   max_accuracy_drop=50.0, latency=_quick_latency(tmp_path))
    assert len(calls) == 2, "the one .tflite artifact is timed against the original, then again to confirm 'slower'"
    artifact = result.artifacts[0]
    assert artifact.speed.verdict == SLOWER and artifact.speed.shipped == "original"
    assert artifact.speed.first_speedup == pytest.approx(0.5), "the first timing's figure is kept beside the longer one"
    predicted = result.recovery.budget.plan.latency["choice"]["predicted_ms"]
    assert artifact.speed.predicted_ms == round(predicted, 5), "the table's prediction beside it (5 decimals of ms)"
    assert artifact.speed.error == pytest.approx((0.2 - artifact.speed.predicted_ms) / 0.2, abs=1e-3)
    assert any("not faster than the original" in line and "shipping the original" in line for line in lines), lines
    manifest = json.loads((tmp_path / "slow.tflite.json").read_text())
    assert manifest["separation"] is None and manifest["speed"]["shipped"] == "original"
    assert manifest["verification"]["passed"] is True
    budget = manifest["verification"]["budget"]
    assert budget is not None and budget["held"] and budget["max_drop"] == 50.0, \
        "the run's accuracy budget binds the original shipped in the separated model's place, checked on its artifact"
    original = load(tiny_files / "m.keras")
    x = np.load(tiny_files / "d.npz")["x"][:16]
    runtime = open_runtime(out)
    shipped = np.concatenate([runtime.run([x[i:i + 1]])[0] for i in range(len(x))])
    np.testing.assert_allclose(shipped, predict_keras(original, x)[0], rtol=1e-4, atol=1e-5,
                               err_msg="the shipped artifact is the original model (float32 TFLite)")
    assert not list(tmp_path.glob(".*partial*")), "no temporary file is left behind"
    assert "(original shipped)" in result.artifact_table()
    assert any("the original, converted the same way, was shipped" in warning for warning in result.warnings)


def test_a_first_slower_timing_is_confirmed_by_a_longer_one_before_the_original_ships(tiny_files, tmp_path,
                                                                                       monkeypatch):
    """A short timing on a shared machine can say "slower" where a longer one does not (docs/benchmarks.md, seventh
    session): the first "slower" is timed again, CONFIRM_FACTOR times as long, and that timing decides."""
    from sepconv.convert.export.speed import CONFIRM_FACTOR

    first, second, timings = timed(artifact_ms=0.2, original_ms=0.1), timed(artifact_ms=0.1, original_ms=0.1), []

    def measured(*args, timing, **kwargs):
        timings.append(timing)
        return (first if len(timings) == 1 else second)(*args, timing=timing, **kwargs)

    out = tmp_path / "noisy.tflite"
    _latency_by_size(monkeypatch)
    result, calls, lines = convert(tiny_files, out, monkeypatch, measured, max_accuracy_drop=50.0,
                                   latency=_quick_latency(tmp_path))
    assert len(calls) == 2 and timings[1].min_seconds == pytest.approx(timings[0].min_seconds * CONFIRM_FACTOR)
    assert timings[1].min_runs == timings[0].min_runs * CONFIRM_FACTOR
    speed = result.artifacts[0].speed
    assert speed.verdict == EQUAL and speed.shipped == "separated" and speed.first_speedup == pytest.approx(0.5)
    assert any("in a first timing; timing again 3x as long" in line for line in lines), lines
    assert not any("shipping the original" in line for line in lines), lines
    manifest = json.loads((tmp_path / "noisy.tflite.json").read_text())
    assert manifest["separation"] is not None and manifest["speed"]["first_speedup"] == pytest.approx(0.5)


def test_a_forced_rank_ships_the_slower_separation_and_says_so(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "forced.tflite"
    result, calls, lines = convert(tiny_files, out, monkeypatch, timed(artifact_ms=0.2, original_ms=0.1), rank=1)
    assert len(calls) == 1 and result.artifacts[0].speed.shipped == "separated"
    assert any("slower than the original, shipped as --rank / --energy asked" in line for line in lines), lines
    manifest = json.loads((out.parent / "forced.tflite.json").read_text())
    assert manifest["separation"] is not None and manifest["speed"]["verdict"] == SLOWER
    assert any("shipped as --rank / --energy asked" in warning for warning in result.warnings)


def test_a_faster_separation_ships_with_its_measured_speedup(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "fast.tflite"
    result, calls, lines = convert(tiny_files, out, monkeypatch, timed(artifact_ms=0.05, original_ms=0.1), rank=1)
    speed = result.artifacts[0].speed
    assert speed.verdict == FASTER and speed.shipped == "separated" and speed.speedup == pytest.approx(2.0)
    assert "2.00x (1.92-2.08)" in result.artifact_table()
    assert any(line.startswith(f"{out}: 2.00x (1.92-2.08) against the original tflite none (faster)")
               for line in lines), lines


LOOSE = Tolerance(min_agreement=0.5)  # the tiny model at K=1 in int8: its speed is the point here


def _int8_slower_than_float32(int8_ms):
    """Timings where every artifact is as fast as the original in its own mode, and an int8 one takes `int8_ms`
    against the original's 0.1 ms in float32 (ONNX Runtime's int8 depthwise convolutions on x86 run about so:
    docs/benchmarks.md, ninth session)."""
    def measured(artifact, original, *, original_quantize=None, **kwargs):
        if original_quantize == "none" and kwargs["quantize"] == "int8":
            return timed(artifact_ms=int8_ms, original_ms=0.1)(artifact, original, original_quantize="none", **kwargs)
        return timed(artifact_ms=0.1, original_ms=0.1)(artifact, original, original_quantize=original_quantize,
                                                         **kwargs)

    return measured


def test_auto_ships_float32_where_int8_runs_slower_than_the_original_in_float32(tiny_files, tmp_path, monkeypatch):
    """--quantize auto chose int8 (data given); the int8 artifact, timed against the user's model in float32, is 2x
    slower: float32 ships instead (verified, itself timed against the original), said in a line and a warning, and
    recorded as the artifact's quantize_fallback. An explicit --quantize int8 is shipped as asked, untimed so."""
    from sepconv.deploy.runtime import open_runtime

    out = tmp_path / "auto.onnx"
    result, calls, lines = convert(tiny_files, out, monkeypatch, _int8_slower_than_float32(0.2), rank=1,
                                   quantize="auto", tolerance=LOOSE)
    artifact = result.artifacts[0]
    assert result.plan.quantize == "int8" and artifact.quantize == "none", "auto's choice, then what ships"
    assert artifact.quantize_fallback["from"] == "int8" and artifact.quantize_fallback["slower"] == "int8"
    assert artifact.quantize_fallback["reasons"][-1].startswith(
        "int8: int8 ran slower than the original model in float32 by more than 10% (0.50x (0.48-0.52)"), \
        artifact.quantize_fallback
    assert [call[1].name.split(".original.")[0] for call in calls] == [".auto.onnx"] * len(calls)
    assert len(calls) == 4, "int8 against the original int8, against float32 twice (confirmed), float32 against float32"
    assert calls[1][1] == calls[2][1] == calls[3][1] != calls[0][1], "the original in float32 converted once for both"
    assert artifact.verification.passed and artifact.speed.quantize == "none" and artifact.speed.shipped == "separated"
    assert any("--quantize auto ships float32 instead (pass --quantize int8 to insist)" in line for line in lines)
    assert any("shipped none instead; pass --quantize int8 to insist" in warning for warning in result.warnings)
    assert "onnx none (int8 slower)" in result.artifact_table()
    inputs = {tensor.dtype for tensor in open_runtime(out).inputs}
    assert "QuantizeLinear" not in open_runtime(out).op_histogram() and inputs == {"float32"}, "a float32 model"
    manifest = json.loads((tmp_path / "auto.onnx.json").read_text())
    assert manifest["quantize"] == "none" and manifest["quantize_fallback"]["slower"] == "int8"

    insisted, calls, _ = convert(tiny_files, tmp_path / "int8.onnx", monkeypatch, _int8_slower_than_float32(0.2),
                                 rank=1, quantize="int8", tolerance=LOOSE)
    assert insisted.artifacts[0].quantize == "int8" and len(calls) == 1, "only against the original int8"


@pytest.mark.parametrize("int8_ms", [0.05, 0.105])
def test_auto_keeps_int8_that_runs_faster_than_float32_or_within_the_margin(tiny_files, tmp_path, monkeypatch,
                                                                            int8_ms):
    """2x faster, or 5% slower (within MODE_MARGIN: the int8 artifact is 2-4x smaller): int8 ships, and the
    comparison is in its manifest."""
    out = tmp_path / "fast.tflite"
    result, calls, lines = convert(tiny_files, out, monkeypatch, _int8_slower_than_float32(int8_ms), rank=1,
                                   quantize="auto", tolerance=LOOSE)
    artifact = result.artifacts[0]
    assert artifact.quantize == "int8" and artifact.quantize_fallback is None and len(calls) == 2, \
        "against the original in int8, then in float32 (no confirming timing: nothing would be replaced)"
    manifest = json.loads((tmp_path / "fast.tflite.json").read_text())
    assert manifest["speed_float32"]["original_quantize"] == "none"
    assert manifest["speed"]["original_quantize"] is None, "the other comparison: the original in the same mode"
    if int8_ms > 0.1:
        assert manifest["speed_float32"]["verdict"] == SLOWER and not result.warnings, "slower, within the margin"
        return
    assert any(line.startswith(f"{out}: 2.00x (1.92-2.08) against the original tflite none (faster)")
               for line in lines), lines
    assert manifest["speed_float32"]["speedup"] == 2.0


def test_no_latency_times_nothing_and_says_so(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "untimed.tflite"
    result, calls, lines = convert(tiny_files, out, monkeypatch, timed(artifact_ms=0.2, original_ms=0.1),
                                   measure_latency=False)
    assert calls == [] and result.artifacts[0].speed is None
    assert result.plan.latency is False and result.recovery.budget.plan.latency is None
    plan = next(line for line in lines if "rank per layer" in line)
    assert "(speed not measured: --no-latency)" in plan and "artifacts not timed" in plan
    assert "speed" not in json.loads((out.parent / "untimed.tflite.json").read_text())


def test_the_real_timing_compares_two_files_in_one_run(tiny_files, tmp_path):
    """speed.compare itself, unfaked: the same file twice is equal within noise, with both medians measured."""
    from sepconv.convert.loading import load
    from sepconv.convert.export.tflite import TFLiteOptions, export_tflite
    from sepconv.deploy.timing import TimingOptions

    data = export_tflite(load(tiny_files / "m.keras"), options=TFLiteOptions(quantize="none"))
    (tmp_path / "a.tflite").write_bytes(data)
    (tmp_path / "b.tflite").write_bytes(data)
    speed = speed_module.compare(tmp_path / "a.tflite", tmp_path / "b.tflite", where=None,
                                 timing=TimingOptions(min_seconds=0.3, min_runs=200), fmt="tflite", quantize="none")
    assert speed.artifact_ms > 0 and speed.original_ms > 0
    low, high = speed.speedup_ci95
    assert low <= speed.speedup <= high and speed.where == "local" and speed.runtime.startswith("ai-edge-litert")
    assert 0.5 < speed.speedup < 2.0, f"one file against itself: {speed.interval()}"


def _latency_by_size(monkeypatch):
    """The latency table's timings made a function of each timed file's size (a smaller layer is faster), so that the
    budget's plan separates the tiny model whatever the machine's load: timed for real, its single-layer models are
    within noise of each other, and a busy moment made the plan keep every layer (no speed check to test)."""
    import dataclasses
    import os

    from sepconv.convert.recovery import latency_table

    real = latency_table.time_artifacts

    def by_size(paths, *args, **kwargs):
        timing = real(paths, *args, **kwargs)
        return dataclasses.replace(timing, p50_ms={str(path): os.path.getsize(path) / 1e5 for path in paths})

    monkeypatch.setattr(latency_table, "time_artifacts", by_size)


def _quick_latency(tmp_path):
    from sepconv.convert.recovery.latency_table import LatencyOptions
    from sepconv.deploy.timing import TimingOptions

    return LatencyOptions(timing=TimingOptions(min_seconds=0.02, min_runs=5), cache_dir=str(tmp_path / "cache"))


def test_the_plan_says_when_nothing_can_be_timed():
    """Latency is measured on a .tflite / .onnx artifact: with only a .keras output the plan says nothing is timed,
    and does not list latency among its defaults."""
    from sepconv.convert.options import ConvertOptions, plan_line

    options = ConvertOptions(data="d.npz")
    untimed, timed = options.plan(timed=False), options.plan()
    assert untimed.latency is False and "latency" not in untimed.defaults
    assert timed.latency is True and "latency" in timed.defaults
    line = plan_line(untimed, options)
    assert "(speed not measured: no .tflite / .onnx output)" in line and "artifacts not timed (no .tflite" in line
    off = ConvertOptions(data="d.npz", measure_latency=False)
    assert "(speed not measured: --no-latency)" in plan_line(off.plan(), off)
    assert ConvertOptions(separate=False).plan().latency is False, "nothing separated: nothing to time"

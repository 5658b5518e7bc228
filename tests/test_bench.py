"""bench-model's measurement and statistics (sepconv.deploy.bench, stats, context) on small real artifacts."""

import hashlib

import numpy as np
import pytest

from helpers import write_file
from sepconv.deploy.bench import BenchOptions, benchmark
from sepconv.deploy.context import system, thermal
from sepconv.deploy.errors import ArtifactError, InputDataError, InvalidOptionError
from sepconv.deploy.stats import median_interval, summarize

FAST = dict(warmup_runs=2, warmup_seconds=0.0, min_runs=20, min_seconds=0.05, max_seconds=5.0, block=5)


def test_statistics_of_known_samples():
    ms = np.arange(1, 101, dtype=np.float64)  # 1..100 ms
    stats = summarize(ms / 1000.0)
    assert stats["count"] == 100 and stats["min"] == pytest.approx(1) and stats["max"] == pytest.approx(100)
    assert stats["mean"] == pytest.approx(50.5) and stats["std"] == pytest.approx(np.std(ms, ddof=1))
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05) and stats["p99"] == pytest.approx(99.01), "linear interpolation"
    assert stats["ci95_p50"] == pytest.approx([40.0, 61.0]), "order statistics 40 and 61 of 100 (binomial, 95%)"
    assert stats["inferences_per_second"] == pytest.approx(100 / (5050 / 1000))
    assert summarize(ms / 1000.0, batch=4)["inferences_per_second"] == pytest.approx(4 * 100 / 5.05)


def test_median_interval_covers_the_median_and_degrades_to_the_range():
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0), "too few samples: the whole range"
    rng = np.random.default_rng(0)
    misses = 0
    for _ in range(400):
        sample = rng.lognormal(0.0, 1.0, 60)  # skewed, like latencies; the true median is exp(0) = 1
        low, high = median_interval(sample)
        misses += not low <= 1.0 <= high
    assert misses / 400 < 0.08, f"a 95% interval missed the true median {misses / 400:.1%} of the time"


def test_interleaved_benchmark_of_several_artifacts(small_artifacts):
    paths = [small_artifacts["tflite"], small_artifacts["tflite_int8"], small_artifacts["onnx"],
             small_artifacts["onnx_int8"]]
    lines = []
    report = benchmark(paths, BenchOptions(threads=(1, 2), **FAST), progress=lines.append).to_dict()
    assert report["schema"] == 1 and len(report["cases"]) == 8
    assert [(c["model"], c["threads"]) for c in report["cases"]][:2] == [("float.tflite", 1), ("float.tflite", 2)]
    for case in report["cases"]:
        lat = case["latency_ms"]
        assert lat["count"] == len(case["samples_ms"]) >= 20 and sum(case["samples_ms"]) >= 50
        assert lat["min"] <= lat["ci95_p50"][0] <= lat["p50"] <= lat["ci95_p50"][1] <= lat["max"]
        assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert case["load_ms"] > 0 and case["first_ms"] > 0 and case["warmup"]["runs"] >= 2
        assert case["stopped_by"] == "min_runs and min_seconds"
        assert case["memory"]["rss_after_load_bytes"] > 0
        artifact = case["artifact"]
        assert artifact["sha256"] == hashlib.sha256(open(case["path"], "rb").read()).hexdigest()
        assert artifact["inputs"][0]["shape"][1:] == [12, 12, 3]
    for threads in (1, 2):
        first = next(c for c in report["cases"] if c["threads"] == threads)
        assert first["speedup"] == 1.0, "the first artifact is the baseline at each thread count"
    int8 = next(c for c in report["cases"] if c["model"] == "int8.tflite")
    assert int8["artifact"]["inputs"][0]["dtype"] == "int8"
    assert report["peak_rss_bytes"] >= max(c["memory"]["rss_after_first_run_bytes"] for c in report["cases"])
    assert report["context"]["cores"] >= 1 and "before" in report["context"] and "after" in report["context"]
    assert any("loaded in" in line for line in lines)


def test_labelled_npz_gives_accuracy_and_the_same_predictions_everywhere(small_artifacts, tmp_path):
    x = small_artifacts["x"]
    y = np.argmax(small_artifacts["expected"], axis=1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    report = benchmark([small_artifacts["tflite"], small_artifacts["onnx"]], inputs=str(tmp_path / "d.npz"),
                       xnnpack=False, batch=2, **FAST).to_dict()
    first, second = report["cases"]
    assert first["accuracy"]["top1"] == 1.0 and first["accuracy"]["samples"] == len(y), \
        "float artifacts predict the Keras model's classes"
    assert first["accuracy"]["predictions_sha256"] == second["accuracy"]["predictions_sha256"]
    assert report["options"]["xnnpack"] is False and report["options"]["batch"] == 2


@pytest.mark.parametrize("make, error, match", [
    (lambda t, a: [t / "missing.tflite"], ArtifactError, "no such file"),
    (lambda t, a: [write_file(t / "bad.tflite", b"\0" * 64)], ArtifactError, "LiteRT cannot load it"),
    (lambda t, a: [write_file(t / "bad.onnx", b"junk" * 16)], ArtifactError, "ONNX Runtime cannot load it"),
    (lambda t, a: [write_file(t / "m.pt", b"x")], ArtifactError, "unrecognized artifact extension"),
])
def test_bad_artifacts(tmp_path, small_artifacts, make, error, match):
    with pytest.raises(error, match=match):
        benchmark(make(tmp_path, small_artifacts), **FAST)


@pytest.mark.parametrize("arrays, match", [
    (dict(x=np.zeros((4, 10, 10, 3), np.float32)), r"shape \(10, 10, 3\), float.tflite takes \(12, 12, 3\)"),
    (dict(images=np.zeros((4, 12, 12, 3), np.float32)), "no array 'x'"),
    (dict(x=np.zeros((4, 12, 12, 3), np.float32), y=np.zeros(3)), "3 labels for 4 inputs"),
])
def test_bad_inputs(tmp_path, small_artifacts, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputDataError, match=match):
        benchmark([small_artifacts["tflite"]], inputs=str(tmp_path / "d.npz"), **FAST)


@pytest.mark.parametrize("kwargs, match", [
    (dict(threads=(0,)), "threads"), (dict(min_runs=0), "min_runs"), (dict(min_seconds=-1), "min_seconds"),
    (dict(min_seconds=5, max_seconds=1), "below min_seconds"), (dict(batch=0), "batch"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        BenchOptions(**kwargs)


def test_unknown_onnx_provider_lists_the_available_ones(small_artifacts):
    with pytest.raises(InvalidOptionError, match="CUDAExecutionProvider.*This installation has"):
        benchmark([small_artifacts["onnx"]], providers=("CUDAExecutionProvider",), **FAST)


def test_context_reads_a_raspberry_pi(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel\t: 17\nHardware\t: BCM2712\n")
    (tmp_path / "sys/devices/system/cpu/cpu0/cpufreq").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").write_text("ondemand\n")
    (tmp_path / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq").write_text("2400000\n")
    (tmp_path / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (tmp_path / "sys/class/thermal/thermal_zone0/temp").write_text("51234\n")
    info, heat = system(tmp_path), thermal(tmp_path)
    assert info["pi_model"] == "Raspberry Pi 5 Model B Rev 1.0" and info["cpu"] == "BCM2712"
    assert info["governor"] == "ondemand"
    assert heat["cpu_mhz"] == 2400.0 and heat["temperature_c"] == 51.2
    empty = system(tmp_path / "nothing")
    assert empty["pi_model"] is None and empty["governor"] is None, "missing files are None, not errors"



def test_integer_input_is_scaled_as_the_manifest_says(tmp_path, small_artifacts):
    """bench-model --input with uint8 pixels: scaled to [0, 1] by default, left raw when the artifact's manifest says
    its model rescales itself; the accuracy column is measured on what the model expects."""
    import json
    import shutil

    from sepconv.deploy.bench import benchmark
    from sepconv.deploy.preprocess import from_pixels

    pixels = np.random.default_rng(0).integers(0, 256, (32, 12, 12, 3)).astype(np.uint8)
    model = small_artifacts["model"]
    labels = np.argmax(np.asarray(model(pixels.astype(np.float32) / 255.0, training=False)), axis=1)
    np.savez(tmp_path / "pixels.npz", x=pixels, y=labels)
    artifact = tmp_path / "float.tflite"
    shutil.copy(small_artifacts["tflite"], artifact)
    fast = dict(min_runs=1, min_seconds=0.0, warmup_runs=0, warmup_seconds=0.0, inputs=str(tmp_path / "pixels.npz"))
    lines = []
    unit = benchmark([artifact], **fast, progress=lines.append).cases[0]
    assert unit.accuracy["top1"] == 1.0, "0..255 pixels become [0, 1] without a manifest"
    assert unit.artifact["input_preprocessing"]["scale"] == "unit" and unit.artifact["input_preprocessing"]["guessed"]
    warned = [line for line in lines if line.startswith("warning: float.tflite: no manifest beside it")]
    assert len(warned) == 1 and "--scale raw / symmetric / unit" in warned[0], lines
    assert unit.row()[-1] == "100.00% (scaled as unit: no manifest)", "the guess is said where its accuracy is shown"
    lines.clear()
    given = benchmark([artifact], **fast, scale="unit", progress=lines.append).cases[0]
    assert not given.artifact["input_preprocessing"]["guessed"] and given.row()[-1] == "100.00%"
    assert not [line for line in lines if line.startswith("warning:")], lines
    for scale, feed in (("raw", pixels.astype(np.float32)), ("symmetric", pixels / 127.5 - 1.0)):
        (tmp_path / "float.tflite.json").write_text(json.dumps({"preprocessing": {"scale": scale}}))
        case = benchmark([artifact], **fast).cases[0]
        assert case.artifact["input_preprocessing"] == {"scale": scale, "mean": None, "std": None,
                                                           "source": "manifest float.tflite.json", "guessed": False}
        expected = float(np.mean(np.argmax(np.asarray(model(feed.astype(np.float32), training=False)), 1) == labels))
        assert case.accuracy["top1"] == pytest.approx(expected), f"{scale}: the model is fed what the manifest says"
    np.testing.assert_allclose(from_pixels(pixels, {"scale": "symmetric"}), pixels / 127.5 - 1.0, atol=1e-6,
                               err_msg="symmetric maps 0..255 to [-1, 1]")
    floats = pixels.astype(np.float32)
    assert from_pixels(floats, {"scale": "unit"}) is not None and from_pixels(floats, {"scale": "unit"}).max() > 1, \
        "float arrays are taken as preprocessed"

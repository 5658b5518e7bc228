"""bench-model's harness: its JSON report is a stable, documented schema, and it is fair - every case gets the same
time slice per interleaved round, no garbage collection and no library import is charged to a model, and a closed
stdout is not a traceback."""

import gc
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sepconv.deploy import BenchOptions, InvalidOptionError, RuntimeMissingError, benchmark
from sepconv.deploy.bench import runs_per_round
from sepconv.deploy.runtime import import_runtime

DOC = Path(__file__).resolve().parents[1] / "docs" / "bench.md"
BENCH = str(Path(sys.executable).parent / "bench-model")
FAST = dict(warmup_runs=2, warmup_seconds=0.0, min_runs=20, min_seconds=0.05, max_seconds=5.0, round_seconds=0.01)
CLI_FAST = ["--min-runs", "10", "--min-time", "0.05", "--warmup-runs", "2", "--warmup-time", "0", "--quiet"]

# Schema 1, pinned: renaming or removing a key means raising SCHEMA_VERSION and updating docs/bench.md.
SCHEMA = {
    "": {"schema", "context", "options", "cases", "peak_rss_bytes", "seconds"},
    "context": {"tool", "libraries", "python", "os", "kernel", "machine", "cpu", "cores", "cores_available",
                "governor", "pi_model", "before", "after"},
    "context.tool": {"name", "version"},
    "context.before": {"cpu_mhz", "temperature_c", "throttled"},
    "context.after": {"cpu_mhz", "temperature_c", "throttled"},
    "options": {"threads", "warmup_runs", "warmup_seconds", "min_runs", "min_seconds", "max_seconds", "block",
                "round_seconds", "batch", "inputs", "scale", "xnnpack", "providers", "seed", "profile"},
    "cases[]": {"model", "path", "format", "threads", "runtime", "artifact", "load_ms", "first_ms", "warmup",
                "memory", "latency_ms", "samples_ms", "accuracy", "speedup", "stopped_by", "runs_per_round",
                "rounds", "profile"},
    "cases[].artifact": {"path", "bytes", "sha256", "inputs", "outputs", "manifest", "input_preprocessing"},
    "cases[].artifact.input_preprocessing": {"scale", "mean", "std", "source", "guessed"},
    "cases[].artifact.inputs[]": {"name", "shape", "dtype", "scale", "zero_point"},
    "cases[].artifact.outputs[]": {"name", "shape", "dtype", "scale", "zero_point"},
    "cases[].artifact.manifest": {"quantize", "sha256_matches", "verification_passed", "accuracy", "agreement",
                                  "original_agreement"},
    "cases[].warmup": {"runs", "seconds"},
    "cases[].memory": {"rss_before_load_bytes", "rss_after_load_bytes", "rss_after_first_run_bytes",
                       "load_growth_bytes", "first_run_growth_bytes"},
    "cases[].latency_ms": {"count", "mean", "std", "min", "p50", "p90", "p95", "p99", "max", "ci95_p50",
                           "inferences_per_second"},
    "cases[].accuracy": {"top1", "samples", "source", "predictions_sha256"},
}
FREE_KEYS = {"context.libraries"}  # keyed by distribution name


def key_sets(value, path="") -> dict:
    """{dotted path: set of keys} for every object in `value` (list items merged under `name[]`)."""
    found = {}
    if isinstance(value, dict) and path not in FREE_KEYS:
        found.setdefault(path, set()).update(value)
        for key, child in value.items():
            for sub, keys in key_sets(child, f"{path}.{key}" if path else key).items():
                found.setdefault(sub, set()).update(keys)
    elif isinstance(value, list):
        for item in value:
            for sub, keys in key_sets(item, path + "[]").items():
                found.setdefault(sub, set()).update(keys)
    return found


@pytest.fixture(scope="module")
def full_report(small_artifacts, tmp_path_factory):
    """A report with every optional part filled: labels (accuracy) and a manifest beside the artifact."""
    folder = tmp_path_factory.mktemp("schema")
    model = Path(shutil.copy(small_artifacts["tflite_int8"], folder / "int8.tflite"))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    (folder / "int8.tflite.json").write_text(json.dumps({
        "quantize": "int8", "sha256": digest,
        "verification": {"passed": True, "original_agreement": 0.99,
                         "outputs": [{"accuracy": 0.9, "agreement": 1.0}]}}))
    np.savez(folder / "d.npz", x=small_artifacts["x"], y=np.argmax(small_artifacts["expected"], axis=1))
    return benchmark([model, small_artifacts["onnx"]], inputs=str(folder / "d.npz"), **FAST).to_dict()


def test_report_has_exactly_the_pinned_schema(full_report):
    assert full_report["schema"] == 1
    assert key_sets(full_report) == SCHEMA
    json.dumps(full_report, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere


def test_every_key_is_documented():
    text = re.sub(r"```.*?```", "", DOC.read_text(), flags=re.S)  # code examples are not the schema
    spans = re.findall(r"`([^`]+)`", text)  # `key`, or `{key, key (note), ...}` for an object's keys
    documented = {word for span in spans for word in re.findall(r"[a-z][a-z0-9_]*", span)}
    missing = {key for keys in SCHEMA.values() for key in keys} - documented
    assert not missing, f"docs/bench.md does not document {sorted(missing)}"


def test_manifest_beside_the_artifact_is_reported(full_report):
    tflite, onnx = full_report["cases"]
    assert tflite["artifact"]["manifest"] == {"quantize": "int8", "sha256_matches": True, "verification_passed": True,
                                              "accuracy": 0.9, "agreement": 1.0, "original_agreement": 0.99}
    assert onnx["artifact"]["manifest"] is None, "no manifest beside it"


def test_every_case_is_timed_in_every_round_of_its_slice(full_report):
    for case in full_report["cases"]:
        assert case["runs_per_round"] >= 1
        assert case["latency_ms"]["count"] == case["rounds"] * case["runs_per_round"] == len(case["samples_ms"])


@pytest.mark.parametrize("latency, expected", [(0.007, 7), (0.0002, 250), (0.05, 1), (1.0, 1), (0.0, 50_000_000)])
def test_runs_per_round_fill_the_same_time_slice(latency, expected):
    assert runs_per_round(latency, BenchOptions(round_seconds=0.05)) == expected


def test_round_seconds_zero_means_a_fixed_block():
    assert runs_per_round(0.0002, BenchOptions(round_seconds=0, block=7)) == 7


def test_runtime_libraries_are_imported_before_any_load_is_timed(monkeypatch):
    """import_runtime is what benchmark() calls first; it raises the same one-line hint as opening the model would."""
    import_runtime("model.pt")  # an unknown extension is left to open_runtime's error
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(RuntimeMissingError, match="pip install onnxruntime"):
        import_runtime("model.onnx")


def test_garbage_collector_is_back_on_after_the_timed_runs(small_artifacts):
    assert gc.isenabled()
    benchmark(small_artifacts["tflite"], **FAST)
    assert gc.isenabled()


@pytest.mark.parametrize("kwargs, match", [
    (dict(round_seconds=-0.1), "round_seconds"), (dict(max_seconds=float("inf")), "finite"),
    (dict(min_seconds=float("nan")), "min_seconds"), (dict(warmup_runs=True), "warmup_runs"),
])
def test_bad_timing_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        BenchOptions(**kwargs)


def test_cli_fixed_blocks_csv_on_stdout_and_xnnpack_off(small_artifacts):
    done = subprocess.run([BENCH, small_artifacts["tflite"], "--round-time", "0", "--block", "3", "--no-xnnpack",
                           "--csv", "-", *CLI_FAST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    header, row = done.stdout.strip().splitlines()
    assert header.startswith("host,model,format,threads") and row.startswith("local,float.tflite,tflite,1")
    assert int(row.split(",")[5]) % 3 == 0, "whole blocks of 3 runs"


def test_cli_bad_round_time_is_one_line(small_artifacts):
    done = subprocess.run([BENCH, small_artifacts["tflite"], "--round-time", "soon"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "invalid number of seconds 'soon'" in done.stderr


def test_cli_output_into_a_closed_pipe_is_not_a_traceback(small_artifacts):
    """`bench-model ... --json | true`: the reader is gone before the report is written; no traceback."""
    done = subprocess.run(f"'{BENCH}' '{small_artifacts['tflite']}' {' '.join(CLI_FAST)} --json | true",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-2000:]

"""bench-model as a user runs it, in a subprocess: tables, JSON, CSV, Markdown, bad input, no TensorFlow."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import save_npz, write_file

BENCH = str(Path(sys.executable).parent / "bench-model")
FAST = ["--min-runs", "10", "--min-time", "0.05", "--warmup-runs", "2", "--warmup-time", "0"]
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in {blocked!r} else _find(name, *a)
from sepconv.deploy.cli import bench_main
sys.exit(bench_main(sys.argv[1:]))
"""


def run(*args, blocked=None, timeout=300):
    if blocked is None:
        return subprocess.run([BENCH, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    script = textwrap.dedent(BLOCK.format(blocked=tuple(blocked)))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_table_for_several_models_and_threads(small_artifacts):
    done = run(small_artifacts["tflite"], small_artifacts["onnx_int8"], "--threads", "1,2", *FAST)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "format", "threads", "size"]
    rows = [line for line in lines if line.startswith(("float.tflite", "int8.onnx"))]
    assert [row.split()[2] for row in rows] == ["1", "2", "1", "2"]
    assert rows[0].split()[-1] == "1.00x", "the first model is the baseline"
    assert "speed-up: p50 of the first model" in lines[-1]
    assert "loaded in" in done.stderr, "progress goes to stderr"


def test_json_to_stdout_is_the_whole_report(small_artifacts):
    done = run(small_artifacts["tflite_int8"], "--json", *FAST, "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    case = report["cases"][0]
    assert report["schema"] == 1 and case["model"] == "int8.tflite"
    assert len(case["samples_ms"]) == case["latency_ms"]["count"], "raw samples are in the JSON"
    assert set(case["latency_ms"]) >= {"count", "mean", "std", "min", "p50", "p90", "p95", "p99", "max", "ci95_p50",
                                       "inferences_per_second"}
    assert done.stderr == "", "--quiet: nothing on stderr"


def test_json_and_csv_files_and_markdown(small_artifacts, tmp_path):
    done = run(small_artifacts["tflite"], small_artifacts["onnx"], "--json", tmp_path / "r.json", "--csv",
               tmp_path / "r.csv", "--markdown", *FAST)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("| model") and "|---" in done.stdout.replace(" ", "")[:400]
    report = json.loads((tmp_path / "r.json").read_text())
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [r["model"] for r in rows] == ["float.tflite", "float.onnx"]
    assert float(rows[1]["p50_ms"]) == pytest.approx(report["cases"][1]["latency_ms"]["p50"])
    assert not list(tmp_path.glob(".*partial")), "files are written whole"


@pytest.mark.parametrize("make, phrase", [
    (lambda t, a: [t / "nope.tflite"], "no such file"),
    (lambda t, a: [write_file(t / "bad.tflite", b"\0" * 64)], "LiteRT cannot load it"),
    (lambda t, a: [write_file(t / "empty.onnx", b"")], "empty"),
    (lambda t, a: [a["tflite"], "--input", save_npz(t / "d.npz", x=np.zeros((3, 5, 5, 3), np.float32))],
     "takes (12, 12, 3)"),
    (lambda t, a: [a["tflite"], "--input", t / "missing.npz"], "no such file"),
])
def test_bad_input_is_one_line(tmp_path, small_artifacts, make, phrase):
    done = run(*make(tmp_path, small_artifacts), *FAST)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bench-model: error: ") and phrase in last, done.stderr[-2000:]
    assert done.stdout == ""


@pytest.mark.parametrize("flags, phrase", [
    (["--threads", "0"], "invalid thread list '0'"), (["--min-time", "x"], "invalid number of seconds 'x'"),
    (["--batch", "0"], "invalid count '0'"),
])
def test_bad_flags(small_artifacts, flags, phrase):
    done = run(small_artifacts["tflite"], *flags)
    assert done.returncode == 2 and phrase in done.stderr and "--help" in done.stderr


def test_missing_runtime_names_the_pip_command(small_artifacts):
    done = run(small_artifacts["tflite"], *FAST, blocked=["ai_edge_litert", "tflite_runtime", "tensorflow"])
    assert done.returncode == 1
    assert done.stderr.strip().endswith("install it with: pip install ai-edge-litert"), done.stderr[-2000:]
    done = run(small_artifacts["onnx"], *FAST, blocked=["onnxruntime"])
    assert done.returncode == 1 and "pip install onnxruntime" in done.stderr


def test_runs_end_to_end_with_tensorflow_unimportable(small_artifacts, tmp_path):
    """The deploy side never needs TensorFlow (or Keras): the whole benchmark runs with both blocked."""
    done = run(small_artifacts["tflite"], small_artifacts["onnx"], "--json", tmp_path / "r.json", *FAST,
               blocked=["tensorflow", "keras", "tf_keras"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["runtime"].split()[0] for c in report["cases"]] == ["ai-edge-litert", "onnxruntime"], \
        "LiteRT itself, not TensorFlow's interpreter"



def test_help_is_instant():
    done = subprocess.run([BENCH, "--help"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONWARNINGS="error"))
    assert done.returncode == 0 and "--threads" in done.stdout and "--json" in done.stdout

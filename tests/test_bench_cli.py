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
    (lambda t, a: [t / "no\nsuch.tflite"], "no\\nsuch.tflite"),  # a newline in a path stays one line
    # issue 27: string pixels, a 0-d y, one-hot labels narrower than the output, classes past it: one line each
    (lambda t, a: [a["tflite"], "--input", save_npz(t / "d.npz", x=np.full((3, 12, 12, 3), "7"))], "not numbers"),
    (lambda t, a: [a["tflite"], "--input", save_npz(t / "d.npz", x=a["x"], y=np.array(3))], "one class index per"),
    (lambda t, a: [a["tflite"], "--input", save_npz(t / "d.npz", x=a["x"][:3], y=np.eye(3))],
     "one-hot rows of 3 classes, the model's output has 4"),
    (lambda t, a: [a["tflite"], "--input", save_npz(t / "d.npz", x=a["x"][:4], y=np.array([0, 1, 2, 99]))],
     "classes 0..99"),
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
    (["--batch", "0"], "invalid count '0'"), (["--seed", "-1"], "invalid seed '-1'"),
])
def test_bad_flags(small_artifacts, flags, phrase):
    done = run(small_artifacts["tflite"], *flags)
    assert done.returncode == 2 and phrase in done.stderr and "--help" in done.stderr


def test_missing_runtime_names_the_pip_command(small_artifacts):
    done = run(small_artifacts["tflite"], *FAST, blocked=["ai_edge_litert", "tflite_runtime", "tensorflow"])
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "needs LiteRT" in last and "pip install 'sepconv[edge]'" in last, done.stderr[-2000:]
    done = run(small_artifacts["onnx"], *FAST, blocked=["onnxruntime"])
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "needs ONNX Runtime" in last and "pip install 'sepconv[edge]'" in last


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


@pytest.mark.parametrize("tool", ["bench-model", "deploy-model", "convert-model", "sepconv-demo"])
def test_every_tool_has_version(tool):
    done = subprocess.run([str(Path(sys.executable).parent / tool), "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"{tool} (sepconv) 0.1.0", done.stderr[-2000:]


@pytest.mark.parametrize("make, phrase", [
    (lambda t, a: [a["tflite"], "--json", a["onnx"]], "a report would replace a .onnx file"),
    (lambda t, a: [a["tflite"], "--csv", a["tflite"]], "a report would replace a .tflite file"),
    (lambda t, a: [a["tflite"], "--input", save_npz(t / "d.npz", x=a["x"]), "--json", t / "d.npz"],
     "a report would replace a .npz file"),
    (lambda t, a: [a["tflite"], "--json", write_file(t / "old.json", b"keep")], "old.json: exists; pass --overwrite"),
    (lambda t, a: [a["tflite"], "--json", t / "no" / "r.json"], "the folder"),
    (lambda t, a: [a["tflite"], "--csv", t], "is a directory"),
])
def test_reports_never_replace_inputs_and_are_checked_before_the_benchmark(tmp_path, small_artifacts, make, phrase):
    before = {p: p.read_bytes() for p in (small_artifacts["tflite"], small_artifacts["onnx"])}
    done = run(*make(tmp_path, small_artifacts), *FAST)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench-model: error: ") and phrase in lines[0], done.stderr
    assert "loaded in" not in done.stderr, "refused before anything was benchmarked"
    assert all(p.read_bytes() == data for p, data in before.items()), "the artifacts are untouched"
    if (tmp_path / "old.json").exists():
        assert (tmp_path / "old.json").read_bytes() == b"keep"


def test_overwrite_replaces_an_existing_report(tmp_path, small_artifacts):
    write_file(tmp_path / "r.json", b"old")
    done = run(small_artifacts["tflite"], "--json", tmp_path / "r.json", "--overwrite", *FAST, "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["cases"][0]["model"] == "float.tflite"


@pytest.fixture
def mounted(tmp_path):
    """Mount a 64 KiB tmpfs at tmp_path/DIR (read-only with ro=True); unmounted after the test."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI and scripts/test run as root)")
    points = []

    def mount(name, *options):
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=64k", *options]), "tmpfs", str(point)],
                       check=True)
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=True)


def test_unwritable_report_folder_is_refused_before_the_benchmark(mounted, small_artifacts):
    readonly = mounted("readonly", "ro")
    done = run(small_artifacts["tflite"], "--json", readonly / "r.json", *FAST)
    assert done.returncode == 1 and "is not writable" in done.stderr.strip().splitlines()[-1], done.stderr
    assert "loaded in" not in done.stderr


def test_disk_full_while_writing_the_report_is_one_line_and_leaves_nothing(mounted, small_artifacts):
    full = mounted("full")
    with open(full / "filler", "wb", buffering=0) as filler:  # fill the tmpfs, leaving no room for the report
        with pytest.raises(OSError, match="No space left"):
            while True:
                filler.write(b"\0" * 4096)
    done = run(small_artifacts["tflite"], "--json", full / "r.json", "--csv", full / "r.csv", *FAST)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bench-model: error: ") and "No space left on device" in last and \
        "nothing half-written" in last, done.stderr[-2000:]
    assert sorted(p.name for p in full.iterdir()) == ["filler"], "no report, no .partial"


def test_a_failure_is_json_too(tmp_path, small_artifacts):
    done = run(tmp_path / "missing.tflite", "--json", *FAST)
    assert done.returncode == 1
    failure = json.loads(done.stdout)
    assert failure["error"]["type"] == "ArtifactError" and "no such file" in failure["error"]["message"]
    assert failure["exit_status"] == 1 and failure["tool"] == "bench-model"
    done = run(tmp_path / "missing.tflite", "--json", tmp_path / "failure.json", *FAST)
    assert done.returncode == 1 and done.stdout == ""
    assert json.loads((tmp_path / "failure.json").read_text())["error"]["type"] == "ArtifactError"


@pytest.mark.parametrize("json_target, phrase", [
    ("m.h5", "a report would replace a .h5 file"),
    ("out.tflite.json", "is also an input of this run"),  # the manifest convert-model writes beside out.tflite
    ("old.json", "old.json: exists; pass --overwrite"),
])
def test_convert_model_json_follows_the_same_convention(tmp_path, json_target, phrase):
    """convert-model's --json [FILE]: the same checks as bench-model's and deploy-model's, before any work."""
    model = write_file(tmp_path / "m.h5", b"not read: the output check comes first")
    write_file(tmp_path / "old.json", b"keep")
    convert = str(Path(sys.executable).parent / "convert-model")
    done = subprocess.run([convert, str(model), str(tmp_path / "out.tflite"), "--json", str(tmp_path / json_target)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("convert-model: error: --json ") and \
        phrase in done.stderr, done.stderr[-2000:]
    assert model.read_bytes().startswith(b"not read") and (tmp_path / "old.json").read_bytes() == b"keep"
    assert not (tmp_path / "out.tflite").exists()


def test_convert_model_failure_is_json_too(tmp_path):
    convert = str(Path(sys.executable).parent / "convert-model")
    done = subprocess.run([convert, str(tmp_path / "missing.h5"), str(tmp_path / "out.tflite"), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    failure = json.loads(done.stdout)
    assert failure["tool"] == "convert-model" and failure["exit_status"] == 1
    assert "missing.h5" in failure["error"]["message"] and failure["error"]["type"].endswith("Error")


def test_json_onto_a_full_disk_leaves_nothing_under_that_name(small_artifacts, tiny_disk):
    """Issue 27: bench-model --json onto a full disk said "nothing half-written was left" and then wrote its 202-byte
    failure record under the name asked for. Now the one line is true: the folder stays empty."""
    disk = tiny_disk("disk", 4)  # one page: the report does not fit
    done = run(small_artifacts["tflite"], "--json", disk / "r.json", *FAST)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "r.json: could not be written" in last and "nothing half-written was left" in last, last
    assert list(disk.iterdir()) == [], "no failure record, no partial file"

"""The demo command end to end, as a user runs it (a subprocess), on the bundled digits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sepconv.convert.demo import model_file

DEMO = [sys.executable, "-m", "sepconv.convert.cli", "sepconv-demo"]


def run(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_demo_separates_converts_benchmarks_and_reports(tmp_path, trained_demo):
    """The demo end to end, once, at its quick setting (every step of the full demo, on the tutorial network at a
    quarter of the width, the speed table at 1 thread): tables on stdout and the JSON summary in a file (--json FILE).
    Its model is the session's trained_demo (demo.demo_model with the quick filters, 4 epochs, seed 0: what --quick
    trains), copied in as the demo's cache, so the run takes the "loading" path; the training itself is
    demo.demo_model, which trained_demo runs."""
    shutil.copy(trained_demo["h5"], tmp_path / model_file(quick=True))
    done = run("--quick", "--out", str(tmp_path), "--json", str(tmp_path / "summary.json"), "--bench-time", "0.1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] is True and summary["original"]["params"] == 82_330, "filters 16, 32, 64"
    k1, default = summary["separations"]
    assert k1["report"]["totals"]["model_params_after"] == 19_925
    assert all(row["rank"] == 1 for row in k1["report"]["layers"])
    assert 0.0 <= k1["test_accuracy"] <= 1.0
    assert summary["original"]["test_accuracy"] > 0.5, "four epochs on digits must learn something"
    assert json.loads((tmp_path / "report_k1.json").read_text())["totals"]["separated"] == 6
    conversion = summary["conversion"]
    assert [Path(a["path"]).name for a in conversion["artifacts"]] == ["digits_int8.tflite", "digits_int8.onnx"]
    assert all(a["verification"]["passed"] for a in conversion["artifacts"])
    assert conversion["plan"]["max_accuracy_drop"] == 1.0 and conversion["quantize"] == "int8"
    assert conversion["recovery"]["budget"]["held"] and conversion["recovery"]["budget"]["measured_drop"] <= 1.0
    assert all(a["verification"]["budget"]["held"] for a in conversion["artifacts"]), "the budget covers what ships"
    assert (tmp_path / "digits_int8.tflite.json").exists()
    speed = summary["speed"]["cases"]
    assert [(c["model"], c["threads"]) for c in speed[:2]] == [("original_fp32.tflite", 1), ("original_int8.tflite", 1)]
    assert len(speed) == 8 and all(c["accuracy"]["samples"] == 450 for c in speed), "8 artifacts at 1 thread"
    assert sorted(p.name for p in (tmp_path / "speed_quick").glob("*.tflite")) == [
        "original_fp32.tflite", "original_int8.tflite", "separated_k1_fp32.tflite", "separated_k1_int8.tflite"]
    page = (tmp_path / "report.html").read_text()
    assert summary["report"] == str(tmp_path / "report.html")
    for chart in ("convert1_sensitivity", "convert1_stages", "convert1_finetune", "latency", "speedup",
                  "tradeoff_size"):
        assert f'<figure id="{chart}">' in page and (tmp_path / "report" / f"{chart}.png").stat().st_size > 1000

    shown = done.stdout  # the tables, beside the JSON file
    assert "loading the demo model" in shown and "(quick: filters 16, 32, 64)" in shown
    assert "block3_conv2" in shown and "test accuracy" in shown
    assert "drop K=1" in shown and "fine-tuned" in shown and "digits_int8.onnx" in shown
    assert "separated_k1_int8.tflite" in shown and "speed-up" in shown
    assert f"{summary['original']['test_accuracy']:.2%}" in shown, "the tables and the JSON tell the same figures"


def test_demo_json_file_is_checked_before_any_work(tmp_path):
    (tmp_path / "taken.json").write_text("{}")
    done = run("--out", str(tmp_path / "out"), "--json", str(tmp_path / "taken.json"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "--json" in done.stderr and "exists; pass --overwrite" in done.stderr, done.stderr
    assert (tmp_path / "taken.json").read_text() == "{}" and not (tmp_path / "out").exists()


def test_demo_help_is_instant_and_imports_no_tensorflow():
    probe = "import sys; from sepconv.convert import cli; cli.demo_parser().format_help(); print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    assert run("--help").returncode == 0


def test_demo_with_corrupt_cached_model(tmp_path):
    (tmp_path / "digits_tutorial.h5").write_bytes(b"garbage")
    done = run("--out", str(tmp_path))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "sepconv-demo: error:" in done.stderr and "damaged or truncated" in done.stderr
    assert (tmp_path / "digits_tutorial.h5").read_bytes() == b"garbage", "the input file must be left untouched"


@pytest.mark.parametrize("seed", ["-1", "4294967296", "x"])
def test_bad_seed_is_one_line(tmp_path, seed):
    done = run("--out", str(tmp_path), "--seed", seed)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip() == (f"sepconv-demo: error: argument --seed: invalid seed {seed!r}: use a whole number "
                                   f"in [0, 2**32) (see sepconv-demo --help)"), done.stderr
    assert list(tmp_path.iterdir()) == []

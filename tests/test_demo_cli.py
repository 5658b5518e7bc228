"""The demo command end to end, as a user runs it (a subprocess), on the bundled digits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = [sys.executable, "-m", "sepconv.convert.cli", "sepconv-demo"]


def run(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_demo_trains_separates_and_reports(tmp_path):
    done = run("--out", str(tmp_path), "--epochs", "4", "--json", "--bench-time", "0.1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["original"]["params"] == 1_186_378
    k1, default = summary["separations"]
    assert k1["report"]["totals"]["model_params_after"] == 174_821
    assert all(row["rank"] == 1 for row in k1["report"]["layers"])
    assert 0.0 <= k1["test_accuracy"] <= 1.0
    assert summary["original"]["test_accuracy"] > 0.5, "four epochs on digits must learn something"
    assert (tmp_path / "digits_tutorial.h5").exists()
    assert json.loads((tmp_path / "report_k1.json").read_text())["totals"]["separated"] == 6
    conversion = summary["conversion"]
    assert [Path(a["path"]).name for a in conversion["artifacts"]] == ["digits_int8.tflite", "digits_int8.onnx"]
    assert all(a["verification"]["passed"] for a in conversion["artifacts"])
    assert conversion["plan"]["max_accuracy_drop"] == 1.0 and conversion["quantize"] == "int8"
    assert conversion["recovery"]["budget"]["held"] and conversion["recovery"]["budget"]["measured_drop"] <= 1.0
    assert (tmp_path / "digits_int8.tflite.json").exists()
    speed = summary["speed"]["cases"]
    assert [(c["model"], c["threads"]) for c in speed[:2]] == [("original_fp32.tflite", 1), ("original_fp32.tflite", 2)]
    assert len(speed) == 16 and all(c["accuracy"]["samples"] == 450 for c in speed)
    page = (tmp_path / "report.html").read_text()
    assert summary["report"] == str(tmp_path / "report.html")
    for chart in ("convert1_sensitivity", "convert1_stages", "latency", "speedup", "tradeoff_size"):
        assert f'<figure id="{chart}">' in page and (tmp_path / "report" / f"{chart}.png").stat().st_size > 1000

    again = run("--out", str(tmp_path), "--bench-time", "0.1")  # reuses the cached model and prints tables
    assert again.returncode == 0, again.stderr[-3000:]
    assert "loading the demo model" in again.stdout
    assert "block3_conv2" in again.stdout and "test accuracy" in again.stdout
    assert "K chosen" in again.stdout and "fine-tuned" in again.stdout and "digits_int8.onnx" in again.stdout
    assert "separated_k1_int8.tflite" in again.stdout and "speed-up" in again.stdout


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

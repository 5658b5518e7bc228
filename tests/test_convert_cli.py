"""convert-model as a user runs it: success paths and every bad-input path, in a subprocess."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import png_claiming, save_npz, write_file, zip_bomb

HERE = Path(__file__).parent
CONVERT = [str(Path(sys.executable).parent / "convert-model")]


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(HERE))
    return subprocess.run([*CONVERT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def process_tree(pid):
    """`pid` and its descendants (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    return [pid] + [p for kid in kids for p in process_tree(kid)]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def runtime_settings_here():
    from sepconv.deploy.runtime import X64_QUANT_PRECISION, int8_kernels_saturate

    return {X64_QUANT_PRECISION: "1"} if int8_kernels_saturate() else {}


@pytest.fixture()
def small_h5(tmp_path):
    keras.utils.set_random_seed(0)
    x_in = keras.Input((12, 12, 3), name="pixels")
    x = keras.layers.Conv2D(16, 3, activation="relu", name="c1")(x_in)
    x = keras.layers.Conv2D(16, 3, strides=2, name="c2")(x)
    model = keras.Model(x_in, keras.layers.Dense(5, activation="softmax")(keras.layers.Flatten()(x)))
    path = tmp_path / "in" / "small.h5"
    path.parent.mkdir()
    model.save(path)
    return path


def assert_clean_failure(done, source, out_dir, before, phrase, code=1):
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    error_lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and phrase in error_lines[0], done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == error_lines[0], "the error is the last and only line that matters"
    assert listing(out_dir) == before, "no partial or temporary file may be left"
    if source is not None and Path(source).is_file():
        assert digest(source) == source_digest[str(source)], "the input must be left untouched"


source_digest = {}


def test_without_data_dynamic_and_manifests(tmp_path, small_h5):
    source_digest[str(small_h5)] = digest(small_h5)
    out = tmp_path / "out"
    out.mkdir()
    done = run(small_h5, out / "m.tflite", out / "m.onnx", out / "m.keras", "--rank", "1", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["quantize"] == "dynamic" and "no data given" in summary["quantize_reason"]
    plan = next(line for line in done.stderr.splitlines() if "] plan: " in line)
    assert "quantize dynamic (defaults without --data: refine, recalibrate_bn, epochs, quantize, latency)" in plan, plan
    assert "separation K=1, artifacts timed against the original, no refine" in plan, plan
    assert "hint: pass --data (your images) to choose the rank for an accuracy budget" in plan
    assert listing(out) == ["m.keras", "m.keras.json", "m.onnx", "m.onnx.json", "m.tflite", "m.tflite.json"]
    for artifact in summary["artifacts"]:
        manifest = json.loads(Path(artifact["manifest"]).read_text())
        assert manifest["sha256"] == digest(artifact["path"]) and manifest["bytes"] == os.path.getsize(artifact["path"])
        assert manifest["verification"]["passed"] is True
        assert manifest["separation"]["totals"]["separated"] == 2
        assert manifest["source"]["sha256"] == source_digest[str(small_h5)]
        assert manifest["libraries"]["tensorflow"] and manifest["libraries"]["keras"]
    tflite = json.loads((out / "m.tflite.json").read_text())
    assert tflite["quantize"] == "dynamic" and tflite["inputs"][0]["shape"] == [-1, 12, 12, 3]
    assert tflite["ops"]["DEPTHWISE_CONV_2D"] == 2
    onnx_manifest = json.loads((out / "m.onnx.json").read_text())
    assert onnx_manifest["opset"] == 17 and onnx_manifest["inputs"][0]["name"] == "pixels"
    # what ONNX Runtime was told to verify it with: exact int8 kernels where its default ones saturate (x86, no VNNI)
    assert onnx_manifest["runtime_settings"] == runtime_settings_here() and tflite["runtime_settings"] == {}
    assert digest(small_h5) == source_digest[str(small_h5)]


@pytest.mark.slow
def test_trained_demo_int8_with_data(tmp_path, trained_demo):
    out = tmp_path / "out"
    out.mkdir()
    done = run(trained_demo["h5"], out / "d.tflite", out / "d.onnx", "--data", trained_demo["npz"], "--rank", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = next(line for line in done.stderr.splitlines() if "] plan: " in line)
    assert ("separation K=4, artifacts timed against the original, refine, BatchNorm recalibration, fine-tune up to 10 "
            "epochs, quantize int8 (defaults with --data: refine, recalibrate_bn, epochs, quantize, "
            "latency)") in plan, plan
    assert "hint" not in plan
    for name, fmt in (("d.tflite", "tflite"), ("d.onnx", "onnx")):
        manifest = json.loads((out / f"{name}.json").read_text())
        # --quantize auto ships float32 where int8 runs over 10% slower than the original in float32 (ONNX Runtime's
        # int8 on x86 did for this model: 0.42x); LiteRT's int8 is the faster here
        mode, fallback = manifest["quantize"], manifest["quantize_fallback"]
        assert mode == "int8" or (fmt == "onnx" and mode == "none" and fallback["slower"] == "int8"), (mode, fallback)
        if mode == "int8":
            assert manifest["speed_float32"]["speedup_ci95"][1] >= 0.9, manifest["speed_float32"]
        verification = manifest["verification"]
        check = verification["outputs"][0]
        assert verification["passed"] and check["agreement"] >= 0.98, check
        assert verification["samples"] == 112 and check["accuracy"] > 0.8, "a quarter of the 450 images held out"
        # K=4 everywhere: every separable layer's two forms were timed, and the faster one is what was verified
        forms = manifest["forms"]
        assert set(forms["forms"]) == {row["path"] for row in manifest["separation"]["layers"]
                                       if row["status"] == "separated"}, forms
        for path, form in forms["forms"].items():
            assert forms["ms"][path][form] == min(forms["ms"][path].values()), (path, forms["ms"][path])
        assert forms["format"] == fmt and forms["quantize"] == mode
        speed = manifest["speed"]  # --rank forced the separation: shipped as asked, whatever the speed
        assert speed["format"] == fmt and speed["quantize"] == mode and speed["shipped"] == "separated"
        assert f"{name}: {speed['speedup']:.2f}x" in done.stderr
        assert speed["verdict"] != "slower" or "shipped as --rank / --energy asked" in done.stderr
    assert "d.tflite" in done.stdout and "agrees w/ original" in done.stdout and "faster (95% CI)" in done.stdout


def test_refine_is_recorded(tmp_path, small_h5):
    out = tmp_path / "out"
    out.mkdir()
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(2).random((64, 12, 12, 3)).astype(np.float32))
    done = run(small_h5, out / "m.tflite", "--data", tmp_path / "data.npz", "--rank", "1", "--refine",
               "--quantize", "none", "--epochs", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refine: 2 of 2 separated layers refit on 38 images" in done.stderr, \
        "64 images: a quarter held out to test, a fifth of the rest to validate"
    refinement = json.loads((out / "m.tflite.json").read_text())["recovery"]["refinement"]
    assert [layer["status"] for layer in refinement["layers"]] == ["refined", "refined"]
    assert all(layer["error_after"] < layer["error_before"] for layer in refinement["layers"])


def test_verification_failure_writes_nothing(tmp_path, small_h5):
    source_digest[str(small_h5)] = digest(small_h5)
    out = tmp_path / "out"
    out.mkdir()
    x = np.random.default_rng(1).random((300, 12, 12, 3)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    done = run(small_h5, out / "m.tflite", "--data", tmp_path / "data.npz", "--rank", "1", "--min-agreement", "1.0",
               "--epochs", "0",
               "--quantize", "int8")
    assert_clean_failure(done, small_h5, out, [], "failed verification")
    assert "nothing was written" in done.stderr


BAD_INPUTS = {
    "missing input": (lambda t, h5: [t / "nope.h5", t / "out" / "m.tflite"], "no such file"),
    "empty input": (lambda t, h5: [write_file(t / "empty.h5", b""), t / "out" / "m.tflite"], "empty"),
    "corrupt input": (lambda t, h5: [write_file(t / "bad.h5", b"x" * 64), t / "out" / "m.tflite"], "damaged"),
    "tflite as input": (lambda t, h5: [write_file(t / "m.tflite", b"\0\0\0\0TFL3" + b"\0" * 32), t / "out" / "x.onnx"],
                        "TFLite model"),
    "unknown extension": (lambda t, h5: [h5, t / "out" / "m.pt"], "unknown extension '.pt'"),
    "missing folder": (lambda t, h5: [h5, t / "out" / "sub" / "m.tflite"], "does not exist"),
    "unwritable folder": (lambda t, h5: [h5, "/proc/m.tflite"], "not writable"),
    "same as input": (lambda t, h5: [h5, h5.with_suffix(".keras"), h5], "unknown extension '.h5'"),
    "wrong data": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data", save_npz(t / "d.npz", y=np.arange(3))],
                   "no array 'x'"),
    "data of wrong shape": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data",
                                           save_npz(t / "d.npz", x=np.zeros((4, 12, 12, 2)))], "2 channels"),
    "int8 without data": (lambda t, h5: [h5, t / "out" / "m.tflite", "--quantize", "int8"], "--data"),
    "float16 onnx": (lambda t, h5: [h5, t / "out" / "m.onnx", "--quantize", "float16"], "not available for ONNX"),
    "refine without data": (lambda t, h5: [h5, t / "out" / "m.tflite", "--refine"], "--refine"),
    "custom object unknown": (lambda t, h5: [h5, t / "out" / "m.tflite", "--custom-objects", "no_such_mod:X"],
                              "Cannot import module"),
    "epochs without data": (lambda t, h5: [h5, t / "out" / "m.tflite", "--epochs", "3"], "--epochs fine-tunes"),
    "budget without data": (lambda t, h5: [h5, t / "out" / "m.tflite", "--max-accuracy-drop", "1"],
                            "--max-accuracy-drop measures"),
    "resume without checkpoints": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data", save_npz(t / "d.npz", x=np.random.default_rng(0).random(
        (24, 12, 12, 3), dtype=np.float32)), "--resume", "--rank", "1"], "no checkpoints in"),
    "latency target without a budget": (lambda t, h5: [h5, t / "out" / "m.tflite", "--rank", "1", "--data", save_npz(
        t / "d.npz", x=with_value(0.5)), "--target-speedup", "2"], "--target-latency / --target-speedup choose each "
                                                                   "layer's K with the accuracy budget"),
    "latency with --no-separate": (lambda t, h5: [h5, t / "out" / "m.tflite", "--no-separate", "--latency-on",
                                                  "local"], "time the separated model against the original"),
    "no-latency with latency options": (lambda t, h5: [h5, t / "out" / "m.tflite", "--no-latency", "--latency-threads",
                                                       "2"], "with measure_latency=False (--no-latency)"),
    "resume without training": (lambda t, h5: [h5, t / "out" / "m.tflite", "--resume"], "--resume continues"),
    "NaN in data": (lambda t, h5: [h5, t / "out" / "m.tflite", "--rank", "1", "--data", save_npz(
        t / "nan.npz", x=with_value(np.nan))], "nan.npz: 1 non-finite values (NaN or infinity) in 1 of 24 samples"),
    "infinity in test data": (lambda t, h5: [h5, t / "out" / "m.tflite", "--rank", "1", "--data", save_npz(
        t / "d.npz", x=with_value(0.5)), "--test-data", save_npz(t / "t.npz", x=with_value(np.inf))],
        "t.npz: 1 non-finite values"),
    "mean of the wrong length": (lambda t, h5: [h5, t / "out" / "m.tflite", "--rank", "1", "--data", save_npz(
        t / "d.npz", x=with_value(0.5)), "--mean", "0.5,0.5"], "--mean has 2 values [0.5, 0.5] but the model's "
                                                              "input has 3 channels"),
    "0-d x": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data", save_npz(t / "d.npz", x=np.array(3.0)),
                             "--max-samples", "4"], "'x' must be a non-empty numeric array"),
    "string x": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data", save_npz(t / "d.npz", x=np.array("abc")),
                                "--max-samples", "4"], "got dtype <U3 and shape ()"),
    "decompression bomb": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data", bomb_folder(t)],
                           "bomb.png: refused as a possible decompression bomb"),
    "newline in a path": (lambda t, h5: [t / "no\nsuch.h5", t / "out" / "m.tflite"],
                          "no\\nsuch.h5: no such file"),
    "no separation but a rank": (lambda t, h5: [h5, t / "out" / "m.tflite", "--no-separate", "--rank", "1"],
                                 "--rank choose what to separate; they cannot be combined with --no-separate"),
    "no separation but include/exclude": (lambda t, h5: [h5, t / "out" / "m.tflite", "--no-separate", "--include",
                                                         "c*", "--exclude", "c2"], "--include / --exclude choose"),
    "zip bomb": (lambda t, h5: [zip_bomb(t / "bomb.keras", tiny_model()), t / "out" / "m.tflite"],
                 "(a possible zip bomb); only for a file you trust, raise the bound with --max-unpacked-mb"),
    "unpacked bound from the flag": (lambda t, h5: [save_model(t / "wide.keras", keras.Sequential([
        keras.Input((20, 20, 1)), keras.layers.Flatten(), keras.layers.Dense(800)])), t / "out" / "m.tflite",
        "--max-unpacked-mb", "1"], "more than the 1,048,576 allowed"),
    "input of 100000 x 100000": (lambda t, h5: [save_model(t / "huge.keras", tiny_model((100_000, 100_000, 3))),
                                                t / "out" / "m.tflite"],
                                 "has 30,000,000,000 values per sample, more than the 33,554,432"),
    "one-hot labels of another width": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data", save_npz(
        t / "d.npz", x=with_value(0.5, 40), y=np.eye(3)[np.arange(40) % 3])], "one-hot rows of 3 classes for a model "
                                                                              "with 5 outputs"),
    "unreachable latency host": (lambda t, h5: [h5, t / "out" / "m.tflite", "--data",
                                                save_npz(t / "d.npz", x=with_value(0.5)), "--latency-on",
                                                "nosuchhost.invalid"], "nosuchhost.invalid: unreachable"),
    "names TensorFlow refuses": (lambda t, h5: [save_model(t / "odd.keras", keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c<b>1")], name="m<b>x")), t / "out" / "m.tflite"],
        "the model 'm<b>x', 'c<b>1': names TensorFlow refuses"),
    "damaged state.json": (lambda t, h5: [h5, t / "out" / "m.tflite", "--rank", "1", "--epochs", "1", "--data",
                                          save_npz(t / "d.npz", x=with_value(0.5)), "--resume", "--checkpoint-dir",
                                          damaged_checkpoint(t / "ck")],
                           "--resume: the checkpoint in "),
}


def with_value(value, count=24):
    x = np.random.default_rng(0).random((count, 12, 12, 3)).astype(np.float32)
    x[count // 2, 3, 4, 1] = value
    return x


def bomb_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    for i in range(3):
        write_file(folder / "cats" / f"ok{i}.png", _png_bytes())
    png_claiming(folder / "cats" / "bomb.png", 100_000, 100_000)
    return folder


def _png_bytes():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_model(shape=(12, 12, 3)):
    x_in = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, name="c1")(x_in)
    return keras.Model(x_in, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))


def save_model(path, model):
    model.save(path)
    return path


def damaged_checkpoint(folder):
    folder.mkdir()
    (folder / "state.json").write_text('{"key": {"source_sha')  # cut off by a full disk or a kill
    return folder



@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(tmp_path, small_h5, case):
    make, phrase = BAD_INPUTS[case]
    (tmp_path / "out").mkdir()
    args = make(tmp_path, small_h5)
    source_digest[str(args[0])] = digest(args[0]) if Path(args[0]).is_file() else None
    done = run(*args)
    assert_clean_failure(done, args[0], tmp_path / "out", [], phrase)
    if case == "unreachable latency host":
        assert "sensitivity" not in done.stderr, "refused before the budget's sensitivity analysis: " + done.stderr


def test_existing_output_is_kept(tmp_path, small_h5):
    source_digest[str(small_h5)] = digest(small_h5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.tflite").write_bytes(b"precious")
    done = run(small_h5, out / "m.tflite")
    assert_clean_failure(done, small_h5, out, ["m.tflite"], "exists; pass --overwrite")
    assert (out / "m.tflite").read_bytes() == b"precious"
    assert run(small_h5, out / "m.tflite", "--overwrite", "--quiet").returncode == 0
    assert (out / "m.tflite").read_bytes()[4:8] == b"TFL3"


def test_flex_needed(tmp_path):
    from custom_layers import LogDetFeature

    x_in = keras.Input((8, 8, 3))
    model = keras.Model(x_in, LogDetFeature(name="logdet_feature")(keras.layers.Conv2D(4, 3, name="conv")(x_in)))
    source = tmp_path / "flex.keras"
    model.save(source)
    source_digest[str(source)] = digest(source)
    (tmp_path / "out").mkdir()
    done = run(source, tmp_path / "out" / "m.tflite", "--custom-objects", "custom_layers:LogDetFeature")
    assert_clean_failure(done, source, tmp_path / "out", [], "--allow-flex")
    assert "Cholesky" in done.stderr and "logdet_feature" in done.stderr
    unknown = run(source, tmp_path / "out" / "m.tflite")
    assert_clean_failure(unknown, source, tmp_path / "out", [], "'LogDetFeature'")


@pytest.mark.parametrize("flags, phrase", [
    (["--rank", "0"], "invalid rank '0'"), (["--energy", "2"], "invalid fraction '2'"),
    (["--quantize", "int4"], "invalid choice: 'int4'"), (["--rank", "1", "--energy", "0.5"], "not allowed with"),
    (["--max-samples", "-3"], "invalid count"), (["--mean", "a,b"], "invalid list"),
    (["--max-accuracy-drop", "1", "--rank", "2"], "not allowed with"),
    (["--max-accuracy-drop", "-1"], "invalid number of points '-1'"), (["--epochs", "x"], "invalid count 'x'"),
    (["--learning-rate", "0"], "invalid number '0'"), (["--strategy", "tpu"], "invalid choice: 'tpu'"),
    (["--target-latency", "inf"], "invalid number 'inf': use a finite number > 0"),
    (["--confidence", "1"], "invalid confidence '1': use a number in [0, 1)"),
    (["--form", "diagonal"], "invalid choice: 'diagonal'"),
])
def test_bad_flags(tmp_path, small_h5, flags, phrase):
    source_digest[str(small_h5)] = digest(small_h5)
    (tmp_path / "out").mkdir()
    done = run(small_h5, tmp_path / "out" / "m.tflite", *flags)
    assert_clean_failure(done, small_h5, tmp_path / "out", [], phrase, code=2)
    assert "--help" in done.stderr


def test_debug_shows_the_traceback(tmp_path):
    done = run(tmp_path / "nope.h5", tmp_path / "m.tflite", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "ModelNotFoundError" in done.stderr


@pytest.mark.parametrize("case", ["missing model", "corrupt model", "missing data", "existing output",
                                  "existing manifest", "flags that conflict", "option-like latency host",
                                  "auto form with a fixed rank", "data without x", "data of strings",
                                  "damaged data"])
def test_wrong_paths_and_flags_are_refused_before_tensorflow_starts(tmp_path, case):
    """The checks that need no model contents run in the parent, before its worker: one line, no TensorFlow."""
    (tmp_path / "bad.h5").write_bytes(b"not an hdf5 file")
    (tmp_path / "ok.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (tmp_path / "taken.tflite").write_bytes(b"mine")
    if case == "existing manifest":
        (tmp_path / "o.tflite.json").write_text("my notes")
    np.savez(tmp_path / "no_x.npz", y=np.arange(3))
    np.savez_compressed(tmp_path / "words.npz", x=np.array(["a", "b"]))
    whole = save_npz(tmp_path / "whole.npz", x=np.zeros((4, 8, 8, 3)))
    (tmp_path / "cut.npz").write_bytes(whole.read_bytes()[:90])  # a copy cut short
    argv, phrase = {
        "missing model": (["nope.h5", "o.tflite"], "nope.h5: no such file or directory"),
        "corrupt model": (["bad.h5", "o.tflite"], "the file is damaged or truncated"),
        "missing data": (["ok.h5", "o.tflite", "--data", "nope.npz"], "nope.npz: no such file or directory"),
        "existing output": (["ok.h5", "taken.tflite"], "taken.tflite: exists; pass --overwrite"),
        "existing manifest": (["ok.h5", "o.tflite"], "o.tflite.json: exists (where o.tflite's manifest goes); pass "
                                                     "--overwrite"),
        "flags that conflict": (["ok.h5", "o.tflite", "--epochs", "3"], "--epochs fine-tunes on your images; pass "
                                                                          "--data"),
        "option-like latency host": (["ok.h5", "o.tflite", "--latency-on=-oProxyCommand=x"],
                                     "Unrecognized host '-oProxyCommand=x'"),
        "auto form with a fixed rank": (["ok.h5", "o.tflite", "--form", "auto", "--rank", "2"],
                                        "with a fixed rank / energy give form 'depthwise' or 'spatial'"),
        "data without x": (["ok.h5", "o.tflite", "--data", "no_x.npz"], "no_x.npz: has no array 'x' (found: ['y'])"),
        "data of strings": (["ok.h5", "o.tflite", "--data", "words.npz"], "got dtype <U1 and shape (2,)"),
        "damaged data": (["ok.h5", "o.tflite", "--data", "whole.npz", "--test-data", "cut.npz"],
                         "cut.npz: cannot be read as .npz"),
    }[case]
    probe = ("import os, sys; from sepconv.convert import cli; os.chdir(sys.argv[1]); status = cli.convert_main("
             "sys.argv[2:]); print(status, sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path), *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "1 []", (done.stdout, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and phrase in done.stderr, done.stderr
    assert (tmp_path / "taken.tflite").read_bytes() == b"mine" and not (tmp_path / "o.tflite").exists()
    if case == "existing manifest":
        assert (tmp_path / "o.tflite.json").read_text() == "my notes", "the user's file is left as it was"


def test_help_is_instant_and_needs_no_tensorflow():
    probe = ("import sys; from sepconv.convert import cli; cli.convert_parser().format_help(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    shown = run("--help")
    assert shown.returncode == 0 and "--quantize" in shown.stdout and "--allow-flex" in shown.stdout


# Each fine-tuning epoch of the run to interrupt waits this long after its checkpoint and progress line
# (SEPCONV_TEST_EPOCH_DELAY, docs/finetune.md): the test signals as soon as it reads epoch 1's line, well inside it.
INTERRUPT_WINDOW_SECONDS = 60


def wait_until_gone(pids, seconds=60):
    """Wait (up to `seconds`) until none of `pids` is alive (zombies count as gone); return those still running."""
    deadline = time.time() + seconds
    while time.time() < deadline and alive(pids):
        time.sleep(0.1)
    return alive(pids)


def alive(pids):
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def wait_for_stderr_line(process, text):
    """Read the child's stderr line by line as it comes until a line holds `text`; return the lines read. Fails if
    the stream ends first (pytest-timeout bounds a child that hangs)."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"the run ended (status {process.wait()}) before printing {text!r}: {''.join(lines)[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "terminated", "killed"])
def test_interrupted_fine_tuning_then_resume(tmp_path, trained_demo, how):
    """Stopped after the first epoch's checkpoint (Ctrl-C: exit 130 with the resume hint; SIGKILL: no word at all),
    nothing but the checkpoints is left; a plain rerun refuses to overwrite them; --resume finishes the job."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    args = [trained_demo["h5"], out / "d.tflite", "--data", trained_demo["npz"], "--rank", "1", "--epochs", "5",
            "--patience", "5", "--quantize", "none"]
    env = dict(os.environ, PYTHONPATH=str(HERE), SEPCONV_TEST_EPOCH_DELAY=str(INTERRUPT_WINDOW_SECONDS))
    process = subprocess.Popen([*CONVERT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    before = wait_for_stderr_line(process, "finetune: epoch 1/5")  # printed after epoch 1's checkpoint
    run_and_worker = process_tree(process.pid)  # convert-model and its worker (convert/supervise.py)
    process.send_signal({"ctrl-c": signal.SIGINT, "terminated": signal.SIGTERM, "killed": signal.SIGKILL}[how])
    _, rest = process.communicate(timeout=300)
    stderr = "".join(before) + rest
    if how != "killed":  # SIGTERM as Ctrl-C: at the batch boundary, with its own exit status and words
        assert process.returncode == (130 if how == "ctrl-c" else 143), stderr[-3000:]
        assert "Traceback" not in stderr
        said = "interrupted" if how == "ctrl-c" else "terminated (SIGTERM)"
        assert stderr.strip().splitlines()[-1].startswith(f"convert-model: {said} during fine-tuning"), \
            stderr[-2000:]
        assert "run the same command with --resume to continue" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    assert wait_until_gone(run_and_worker) == [], "the interrupted run's worker does not outlive it"
    assert "finetune: epoch 2/5" not in stderr, "the signal came inside epoch 1's window: " + stderr[-2000:]
    locks = [".d.tflite.checkpoints.lock", ".d.tflite.lock"] if how == "killed" else []  # Ctrl-C, SIGTERM remove them
    assert listing(out) == locks + ["d.tflite.checkpoints"], "no artifact, only the checkpoints (and a killed run's " \
        "unlocked lock files, which the next run takes over)"

    refused = run(*args)
    assert refused.returncode == 1 and "pass --resume to continue it, or delete the folder" in refused.stderr
    done = run(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = [int(line.split("finetune: epoch ")[1].split("/")[0]) for line in done.stderr.splitlines()
              if "finetune: epoch " in line]
    assert epochs and epochs[0] > 1, f"the resumed run must start after the checkpointed epochs, got {epochs}"
    assert listing(out) == ["d.tflite", "d.tflite.json"], "checkpoints are removed once the artifact is written"
    recovery = json.loads((out / "d.tflite.json").read_text())["recovery"]
    assert recovery["resumed"] is True and recovery["finetune"]["epochs_run"] >= epochs[0]


def test_sigterm_outside_fine_tuning_cleans_up_and_says_so(tmp_path, small_h5):
    """Issue 27: SIGTERM while the latency table is timed (no fine-tuning) exited 143 without a word and left
    temporary folders in TMPDIR; a killed run's .partial files stayed beside the target for good. Now: one line, exit
    143, nothing left in the output folder or TMPDIR; and the next run removes what a killed run left."""
    import signal

    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(3).random((160, 12, 12, 3)).astype(np.float32))
    (out / ".m.tflite.k3j2x9.partial.tflite").write_bytes(b"left by a killed run")
    (out / ".m.tflite.json.k3j2x9.partial").write_bytes(b"{}")
    args = [small_h5, out / "m.tflite", "--data", tmp_path / "d.npz", "--epochs", "0", "--min-agreement", "0.5",
            "--latency-cache", tmp_path / "cache", "--latency-time", "1"]
    process = subprocess.Popen([*CONVERT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, TMPDIR=str(tmp)))
    before = wait_for_stderr_line(process, "latency: timing ")
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=300)
    stderr = "".join(before) + rest
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "convert-model: terminated (SIGTERM)", stderr[-2000:]
    assert listing(tmp) == [], "no sepconv-latency-* (or any) temporary folder is left in TMPDIR"
    assert listing(out) == [".m.tflite.json.k3j2x9.partial", ".m.tflite.k3j2x9.partial.tflite"] or \
        listing(out) == [], listing(out)
    done = run(*args[:-4], "--no-latency")
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert not [name for name in listing(out) if "partial" in name], ("the next run removes the partial files a "
                                                                       "killed run left", listing(out))


def test_default_budget_mode_with_data(tmp_path, small_h5):
    """With --data and no rank: budget 1.0, refine, fine-tuning, int8, said aloud; sensitivity in the report."""
    out = tmp_path / "out"
    out.mkdir()
    x = np.random.default_rng(3).random((160, 12, 12, 3)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    done = run(small_h5, out / "m.tflite", "--data", tmp_path / "data.npz", "--epochs", "2", "--min-agreement", "0.5")
    assert done.returncode in (0, 1), done.stderr[-3000:]
    plan = next(line for line in done.stderr.splitlines() if "] plan: " in line)
    assert ("rank per layer for --max-accuracy-drop 1.0 and latency measured on this machine, artifacts timed against "
            "the original, refine, BatchNorm recalibration, fine-tune up to 2 epochs, quantize int8 (defaults with "
            "--data: max_accuracy_drop, refine, recalibrate_bn, quantize, latency)") in plan, plan
    assert "sensitivity: [1/2] c1: drop in points K=1" in done.stderr
    if done.returncode == 1:  # the budget may not hold on a random model: then it must say so, and write nothing
        assert_clean_failure(done, None, out, [], "the budget did not hold")
        return
    manifest = json.loads((out / "m.tflite.json").read_text())
    budget = manifest["recovery"]["budget"]
    assert budget["metric"] == "agreement" and budget["held"] and budget["measured_drop"] <= 1.0
    assert [layer["path"] for layer in budget["layers"]] == ["c1", "c2"]
    assert "chosen" in done.stdout and "drop K=1" in done.stdout, done.stdout
    stages = [stage["name"] for stage in manifest["recovery"]["stages"]]
    assert stages[:2] == ["original", "separated"] and all(name in done.stdout for name in stages)
    if budget["ranks"]:
        assert stages[2:] == ["refined", "fine-tuned"], stages
    latency = budget["latency"]
    assert latency["table"]["where"] == "local" and latency["table"]["format"] == "tflite", "latency by default"
    assert latency["table"]["quantize"] == "int8" and budget["ranks"] == latency["choice"]["ranks"]
    if manifest["separation"] is not None and manifest["separation"]["totals"]["separated"]:
        speed = manifest["speed"]
        assert speed["quantize"] == "int8" and speed["shipped"] == "separated" and speed["verdict"] != "slower"
        assert f"{speed['speedup']:.2f}x" in done.stdout, "the speed-up is in the artifact table"
    elif "speed" in manifest:  # the separation was slower: the original ships, said and recorded
        assert manifest["speed"]["shipped"] == "original" and "shipping the original" in done.stderr


def test_without_data_the_default_is_conservative_and_says_so(tmp_path, small_h5):
    out = tmp_path / "out"
    out.mkdir()
    done = run(small_h5, out / "m.tflite")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = next(line for line in done.stderr.splitlines() if "] plan: " in line)
    assert plan.split("] plan: ")[1].startswith("separation energy=0.9, artifacts timed against the original, no "
                                                 "refine, no BatchNorm recalibration, no fine-tuning, quantize "
                                                 "dynamic"), plan
    assert ("hint: without data this conservative separation is checked only by its outputs' similarity on synthetic "
            "inputs - pass --data") in plan
    manifest = json.loads((out / "m.tflite.json").read_text())
    speed = manifest.get("speed")
    if speed is None:  # nothing separated at energy 0.9: the artifact is the original, nothing to time it against
        assert not manifest["separation"]["totals"]["separated"], "a separated artifact is timed"
        return
    assert speed["format"] == "tflite" and speed["quantize"] == "dynamic" and speed["where"] == "local"
    assert f"m.tflite: {speed['speedup']:.2f}x" in done.stderr and "against the original tflite dynamic" in done.stderr


def test_trusted_lambda_model_is_separated(tmp_path):
    """--unsafe-allow-lambda lets separation, fine-tuning and the .keras check rebuild the Lambda layer too."""
    x_in = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu", name="c1")(x_in)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, name="c2")(x)
    source = save_model(tmp_path / "lambda.keras", keras.Model(x_in, keras.layers.Dense(
        5, activation="softmax")(keras.layers.Flatten()(x))))
    source_digest[str(source)] = digest(source)
    out = tmp_path / "out"
    out.mkdir()
    refused = run(source, out / "m.tflite", "--rank", "1")
    assert_clean_failure(refused, source, out, [], "Lambda layer(s) ['double'] hold Python bytecode")
    done = run(source, out / "m.tflite", out / "m.keras", "--rank", "1", "--unsafe-allow-lambda", "--data",
               save_npz(tmp_path / "d.npz", x=with_value(0.5, count=24)), "--epochs", "1", "--quantize", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("m.tflite", "m.keras"):
        manifest = json.loads((out / f"{name}.json").read_text())
        assert manifest["separation"]["totals"]["separated"] == 2 and manifest["verification"]["passed"], name
    assert json.loads((out / "m.keras.json").read_text())["recovery"]["finetune"]["epochs_run"] == 1


def test_a_run_that_separates_nothing_says_so(tmp_path):
    x_in = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 1, name="pointwise")(x_in)
    source = save_model(tmp_path / "pointwise.keras", keras.Model(x_in, keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(x))))
    out = tmp_path / "out"
    out.mkdir()
    done = run(source, out / "m.tflite", "--quiet", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    warning = "warning: nothing was separated (pointwise: "
    assert [line for line in done.stderr.splitlines() if warning in line], "shown even with --quiet: " + done.stderr
    warnings = json.loads(done.stdout)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("nothing was separated (pointwise: ") and \
        "--no-separate to say so" in warnings[0], warnings
    assert listing(out) == ["m.tflite", "m.tflite.json"]


def test_a_second_run_on_the_same_output_fails_while_the_first_runs(tmp_path, small_h5):
    """The first run is paused (SIGSTOP) while it holds its lock; the second, even with --overwrite, must fail in
    one line and write nothing; the first then finishes and leaves no lock file."""
    import signal
    import time

    source_digest[str(small_h5)] = digest(small_h5)
    out = tmp_path / "out"
    out.mkdir()
    args = [small_h5, out / "m.tflite", "--rank", "1", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=str(HERE))
    first = subprocess.Popen([*CONVERT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    lock = out / ".m.tflite.lock"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not lock.exists():
        time.sleep(0.02)
    paused = process_tree(first.pid)  # convert-model and its worker (convert/supervise.py)
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert lock.exists(), "the first run must hold a lock on its output while it works"
        during = listing(out)
        second = run(*args)
        assert_clean_failure(second, small_h5, out, during, f"another convert-model run is writing {out / 'm.tflite'}")
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert listing(out) == ["m.tflite", "m.tflite.json"], "the lock file goes with the run"


def test_a_checkpoint_folder_in_use_is_refused(tmp_path, small_h5):
    """Another process holds the checkpoint folder's lock (as a run fine-tuning into it does): a run with another
    output but the same --checkpoint-dir must fail in one line and write nothing."""
    source_digest[str(small_h5)] = digest(small_h5)
    out, shared = tmp_path / "out", tmp_path / "shared.checkpoints"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from sepconv.convert.outputs import locked\n"
                               f"with locked([Path({str(shared)!r})]):\n    print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = run(small_h5, out / "m.tflite", "--data", save_npz(tmp_path / "d.npz", x=with_value(0.5)), "--rank",
                   "1", "--epochs", "1", "--checkpoint-dir", shared)
        assert_clean_failure(done, small_h5, out, [], f"another convert-model run is writing {shared}")
        assert not shared.exists()
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and listing(tmp_path).count(".shared.checkpoints.lock") == 0


@pytest.mark.parametrize("name", ["m.tflite", "m.onnx", "m.keras"])
def test_disk_full_while_exporting(tmp_path, small_h5, tiny_disk, name):
    source_digest[str(small_h5)] = digest(small_h5)
    disk = tiny_disk("disk", 4)  # one page: the lock file fits, no artifact does
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(HERE), TMPDIR=str(temp))
    done = subprocess.run([*CONVERT, str(small_h5), str(disk / name), "--rank", "1"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert_clean_failure(done, small_h5, disk, [], f"No space left on device while writing {disk / name}: free space "
                                                   f"or choose another folder")
    assert not [p for p in listing(temp) if p.startswith(("tmp", "sepconv"))], "no temporary folder may leak"


def test_disk_full_while_writing_the_manifest(tmp_path, small_h5, tiny_disk):
    """A disk with room for the artifact (measured by a first run elsewhere) but not for its manifest."""
    source_digest[str(small_h5)] = digest(small_h5)
    reference = tmp_path / "reference"
    reference.mkdir()
    assert run(small_h5, reference / "m.tflite", "--rank", "1", "--quiet").returncode == 0
    pages = -(-(reference / "m.tflite").stat().st_size // 4096)
    disk = tiny_disk("disk", 4 * pages)
    done = run(small_h5, disk / "m.tflite", "--rank", "1")
    assert_clean_failure(done, small_h5, disk, [], f"No space left on device while writing the manifest of "
                                                   f"{disk / 'm.tflite'}: free space or choose another folder")


def test_disk_full_while_checkpointing_then_resume(tmp_path, small_h5, tiny_disk):
    """No checkpoint is started that the disk cannot hold (HDF5 crashes the process when a disk fills under it);
    once there is space, --resume works from what was left."""
    disk = tiny_disk("disk", 24)
    out = tmp_path / "out"
    out.mkdir()
    args = [small_h5, out / "m.tflite", "--data", save_npz(tmp_path / "d.npz", x=with_value(0.5, count=32)), "--rank",
            "1", "--epochs", "2", "--quantize", "none", "--checkpoint-dir", disk / "checkpoints"]
    done = run(*args)
    source_digest[str(small_h5)] = digest(small_h5)
    assert_clean_failure(done, small_h5, out, [], f"No space left on device for a fine-tuning checkpoint in "
                                                  f"{disk / 'checkpoints' / 'fit'}")
    left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))
    assert left == ["checkpoints", "checkpoints/state.json"], f"nothing half-written: {left}"
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    resumed = run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert listing(out) == ["m.tflite", "m.tflite.json"] and not (disk / "checkpoints").exists()


def test_one_sepconv_command_with_the_long_names_as_aliases(tmp_path):
    """Issue 26: `sepconv convert | bench | deploy | report | demo` runs the same mains as convert-model,
    bench-model, deploy-model, sepconv-report and sepconv-demo; --help lists them, --version once, an unknown
    command is one line and exit 2."""
    sepconv = str(Path(sys.executable).parent / "sepconv")
    shown = subprocess.run([sepconv, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and all(f"  {name} " in shown.stdout for name in
                                         ("convert", "bench", "deploy", "report", "demo")), shown.stdout
    assert "also: convert-model" in shown.stdout
    version = subprocess.run([sepconv, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("sepconv ")
    unknown = subprocess.run([sepconv, "frob"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines()[-1].startswith(
        "sepconv: error: unknown command 'frob'"), unknown.stderr
    helped = subprocess.run([sepconv, "convert", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--quantize" in helped.stdout
    missing = subprocess.run([sepconv, "convert", tmp_path / "nope.h5", tmp_path / "m.tflite"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1 and "nope.h5: no such file" in missing.stderr, missing.stderr


@pytest.mark.parametrize("prog, absent, extra", [("convert-model", "h5py", "convert"),
                                                 ("sepconv-demo", "sklearn", "convert,demo"),
                                                 ("sepconv-report", "matplotlib", "report")])
def test_a_missing_extra_is_one_line_before_any_work(tmp_path, prog, absent, extra):
    """Issue 26: convert-model in an [edge] or bare install printed 20 lines ending in ModuleNotFoundError. Each
    workstation command now says which packages are missing and the pip line, before any work (here the package is
    hidden from importlib's finder, as in an install without it)."""
    args = {"convert-model": [str(tmp_path / "m.h5"), str(tmp_path / "m.tflite")],
            "sepconv-demo": ["--out", str(tmp_path / "demo")],
            "sepconv-report": [str(tmp_path / "r.json"), "-o", str(tmp_path / "r.html")]}[prog]
    main = {"convert-model": "convert_main", "sepconv-demo": "demo_main", "sepconv-report": "report_main"}[prog]
    probe = (f"import importlib.util as u, sys; real = u.find_spec; "
             f"u.find_spec = lambda name, *a: None if name == {absent!r} else real(name, *a); "
             f"from sepconv.convert import cli; sys.exit(cli.{main}(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"{prog}: error: {absent} is not installed, and {prog} needs it: pip install 'sepconv[{extra}]'" in \
        done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written"


@pytest.mark.slow
def test_each_command_in_a_bare_install_says_which_extra_in_one_line(tmp_path):
    """Issue 26: a real virtualenv with sepconv and its base dependencies only (numpy, tabulate): every command that
    needs more says which packages and the pip line, in one line, exit 1, nothing written."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(Path(__file__).parents[1])],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    (tmp_path / "m.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (tmp_path / "m.tflite").write_bytes(b"\x00" * 4 + b"TFL3" + bytes(64))
    (tmp_path / "r.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        ("convert-model", str(tmp_path / "m.h5"), str(out / "m.tflite")): "pip install 'sepconv[convert]'",
        ("sepconv", "convert", str(tmp_path / "m.h5"), str(out / "m.tflite")): "pip install 'sepconv[convert]'",
        ("sepconv-demo", "--out", str(out / "demo")): "pip install 'sepconv[convert,demo]'",
        ("sepconv-report", str(tmp_path / "r.json"), "-o", str(out / "r.html")): "pip install 'sepconv[report]'",
        ("bench-model", str(tmp_path / "m.tflite")): "pip install 'sepconv[edge]'",
    }
    for (command, *args), fix in cases.items():
        done = subprocess.run([str(venv / "bin" / command), *args], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and fix in done.stderr, (command, done.stderr)
        assert "Traceback" not in done.stderr and "not installed" in done.stderr, (command, done.stderr)
    assert list(out.iterdir()) == [], "nothing is written"

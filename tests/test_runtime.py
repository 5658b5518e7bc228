"""sepconv.deploy.runtime: the device side, which must never need TensorFlow."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sepconv.deploy import ArtifactError, InvalidOptionError, TensorSpec, open_runtime

# float32 artifacts vs Keras: relative max error, as in verification
FLOAT_RTOL = 1e-4


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_float_artifacts_match_keras(small_artifacts, kind):
    runtime = open_runtime(small_artifacts[kind], threads=1)
    (probs,) = runtime.run([small_artifacts["x"]])
    expected = small_artifacts["expected"]
    np.testing.assert_allclose(probs, expected, atol=FLOAT_RTOL * np.abs(expected).max(),
                               err_msg=f"{kind} float32 artifact vs Keras")
    assert runtime.inputs[0].shape[0] == -1, "dynamic batch dimension"
    assert runtime.inputs[0].shape[1:] == (12, 12, 3)


def test_quantized_tflite_io_is_converted(small_artifacts):
    runtime = open_runtime(small_artifacts["tflite_int8"])
    spec = runtime.inputs[0]
    assert spec.dtype == "int8" and spec.scale > 0
    (probs,) = runtime.run([small_artifacts["x"]])
    assert probs.dtype == np.float32
    agreement = np.mean(np.argmax(probs, 1) == np.argmax(small_artifacts["expected"], 1))
    assert agreement >= 0.75, f"int8 artifact agrees on {agreement:.0%} of 16 random inputs"
    assert "CONV_2D" in runtime.op_histogram() and "DEPTHWISE_CONV_2D" in runtime.op_histogram()


def test_tensor_spec_quantization_round_trip():
    spec = TensorSpec("x", (-1, 4), "int8", scale=0.5, zero_point=-3)
    values = np.array([-100.0, -1.0, 0.0, 0.26, 10.0, 1000.0], np.float32)
    q = spec.quantize(values)
    assert q.dtype == np.int8 and q.tolist() == [-128, -5, -3, -2, 17, 127], "rounded, shifted and clipped"
    np.testing.assert_allclose(spec.dequantize(q)[1:5], [-1.0, 0.0, 0.5, 10.0], err_msg="dequantize inverts")
    plain = TensorSpec("y", (-1,), "float32")
    assert plain.quantize(values).dtype == np.float32


def test_bad_artifacts(tmp_path):
    cases = {
        "missing.tflite": None,
        "empty.tflite": b"",
        "garbage.tflite": b"0123456789" * 10,
        "garbage.onnx": b"0123456789" * 10,
        "model.pb": b"abc",
    }
    messages = {}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ArtifactError) as caught:
            open_runtime(path)
        messages[name] = str(caught.value)
        assert "\n" not in messages[name]
    assert "no such file" in messages["missing.tflite"]
    assert "empty" in messages["empty.tflite"]
    assert "LiteRT cannot load it" in messages["garbage.tflite"]
    assert "ONNX Runtime cannot load it" in messages["garbage.onnx"]
    assert "unrecognized artifact extension" in messages["model.pb"]
    with pytest.raises(InvalidOptionError, match="threads=0"):
        open_runtime(tmp_path / "garbage.onnx", threads=0)


BLOCK_TENSORFLOW = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "tf_keras"):
                raise ImportError(f"{name} is blocked: the deploy side must not import it")
    sys.meta_path.insert(0, Block())
""")


def test_deploy_side_never_imports_tensorflow(small_artifacts):
    script = BLOCK_TENSORFLOW + textwrap.dedent(f"""
        import numpy as np
        import sepconv.deploy
        from sepconv.deploy import open_runtime
        x = np.random.default_rng(0).random((4, 12, 12, 3), dtype=np.float32)
        for path in ({str(small_artifacts['tflite_int8'])!r}, {str(small_artifacts['onnx_int8'])!r}):
            runtime = open_runtime(path)
            assert runtime.run([x])[0].shape == (4, 4)
            runtime.op_histogram()
        print("ok", [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok []"


def test_missing_runtime_names_the_pip_command(tmp_path, small_artifacts):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ai_edge_litert", "tflite_runtime", "tensorflow", "onnxruntime"):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import importlib.util
        importlib.util.find_spec = lambda name, *a: None
        from sepconv.deploy import open_runtime, RuntimeMissingError
        for path in ({str(small_artifacts['tflite'])!r}, {str(small_artifacts['onnx'])!r}):
            try:
                open_runtime(path)
            except RuntimeMissingError as error:
                print(error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "pip install ai-edge-litert" in lines[0] and "pip install onnxruntime" in lines[1]

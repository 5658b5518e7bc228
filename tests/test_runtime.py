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


def _qdq_conv_summing_saturating_pairs(channels=8):
    """A QDQ 1x1 Conv whose int8 input and weights are all 127 (1.0 at scale 1/127): the exact output is `channels`.
    On x86, ONNX Runtime adds 128 to the s8 activations and multiplies them (255) by the s8 weights (127) in pairs:
    2 * 255 * 127 = 64,770, past the 16 bits vpmaddubsw sums into (CPUs without VNNI)."""
    from onnx import TensorProto, helper, numpy_helper

    constants = {"s": np.array(1 / 127, np.float32), "z": np.array(0, np.int8),
                 "w": np.full((1, channels, 1, 1), 127, np.int8), "s_out": np.array(channels / 127, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "s_out", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s_out", "z"], ["out"])]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [None, channels, 1, 1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 1, 1, 1])],
                              [numpy_helper.from_array(value, name) for name, value in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_int8_is_exact_where_the_default_kernels_saturate(tmp_path):
    """What the QDQ graph says, on every CPU: 8.0 (default ONNX Runtime gives 0.063 on AVX2 without VNNI)."""
    path = tmp_path / "saturating.onnx"
    path.write_bytes(_qdq_conv_summing_saturating_pairs(8).SerializeToString())
    runtime = open_runtime(path)
    (out,) = runtime.run([np.ones((2, 8, 1, 1), np.float32)])
    np.testing.assert_allclose(out.ravel(), [8.0, 8.0], err_msg=f"int8 Conv with runtime settings {runtime.settings()}")


def test_onnx_int8_with_a_shared_weight_loads_with_the_default_kernels(tmp_path):
    """ONNX Runtime 1.32 cannot give u8 weights to a weight two Convs share (a shared Keras layer): such an artifact
    still loads, with the default kernels where they saturate, and its settings say so."""
    from onnx import TensorProto, helper

    from sepconv.deploy.runtime import X64_QUANT_PRECISION, int8_kernels_saturate

    model = _qdq_conv_summing_saturating_pairs(2)
    graph = model.graph
    graph.node.extend([helper.make_node("Conv", ["xd", "wd"], ["y2"]),
                       helper.make_node("QuantizeLinear", ["y2", "s_out", "z"], ["yq2"]),
                       helper.make_node("DequantizeLinear", ["yq2", "s_out", "z"], ["out2"])])
    graph.output.append(helper.make_tensor_value_info("out2", TensorProto.FLOAT, [None, 1, 1, 1]))
    path = tmp_path / "shared.onnx"
    path.write_bytes(model.SerializeToString())
    runtime = open_runtime(path)
    assert runtime.settings() == ({X64_QUANT_PRECISION: "0"} if int8_kernels_saturate() else {})
    # 2 channels of 1.0 x 1.0: one pair, 2 * 255 * 127 saturates where the default kernels do
    outputs = runtime.run([np.ones((1, 2, 1, 1), np.float32)])
    assert len(outputs) == 2 and outputs[0].shape == (1, 1, 1, 1)


@pytest.mark.parametrize("machine, cpuinfo, saturates", [
    ("x86_64", "flags\t\t: fpu sse4_1 avx avx2 fma", True),  # AMD EPYC (Zen 2/3), Intel Haswell..Coffee Lake
    ("x86_64", "flags\t\t: avx2 avx512f avx512bw", True),  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", "flags\t\t: avx2 avx512f avx512_vnni", False),  # Cascade Lake and later, Zen 4
    ("x86_64", "flags\t\t: avx2 avx_vnni", False),  # Alder Lake
    ("AMD64", None, True),  # Windows: no /proc/cpuinfo, the exact kernels
    ("aarch64", "Features\t: fp asimd", False),  # Raspberry Pi: ONNX Runtime's int8 is exact
])
def test_saturating_cpus_are_recognised(machine, cpuinfo, saturates):
    from sepconv.deploy.runtime import saturating_cpu

    assert saturating_cpu(machine, cpuinfo) is saturates

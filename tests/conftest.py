import os
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _tensorflow_with_onednn() -> None:
    """This process's TensorFlow with oneDNN on, whatever the CPU; the commands the tests start keep the default.

    TensorFlow turns oneDNN on by default only on CPUs with AVX-512, and without it its CPU kernels refuse
    channels_first convolutions and depthwise convolutions with unequal strides (two of tests/models.py's CASES), so
    the same suite passed on one machine and failed on another. TensorFlow reads the switch once, at import: the
    variable is removed again afterwards, so that convert-model's worker, started by the CLI tests, decides as it does
    for a user (off on x86, convert/supervise.py)."""
    given = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    import tensorflow  # noqa: F401

    if given is None:
        del os.environ["TF_ENABLE_ONEDNN_OPTS"]
    else:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = given


_tensorflow_with_onednn()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    """Tests that switch Keras to mixed precision must not leak it into the next test."""
    import keras

    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def digits():
    from sepconv.convert.demo import digits as demo

    return demo.digits()


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory, digits):
    """The quick demo's network (the tutorial network at a quarter of the width, sepconv-demo --quick) trained on
    digits, saved as .h5, with the test split as an .npz (read only).

    Four epochs reach ~97% test accuracy: enough for int8 agreement and recovery to mean something, in about 20 s on
    2 cores (the full-width network takes 150 s: 16x the MACs). It is the model sepconv-demo --quick trains (same
    filters, epochs and seed). Trained once per run: pytest-xdist's workers share one folder of this run, under a lock
    (the first trains, the other loads)."""
    import fcntl
    import os

    from sepconv.convert.demo import QUICK_EPOCHS, QUICK_FILTERS
    from sepconv.convert.demo import digits as demo

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained-demo"
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model = demo.demo_model(folder / "digits.h5", epochs=QUICK_EPOCHS, seed=0, filters=QUICK_FILTERS)  # or loads
        if not (folder / "digits_test.npz").exists():
            np.savez(folder / "digits_test.partial.npz", x=digits.x_test, y=digits.y_test)
            (folder / "digits_test.partial.npz").replace(folder / "digits_test.npz")
    return {"model": model, "h5": folder / "digits.h5", "npz": folder / "digits_test.npz", "folder": folder}


@pytest.fixture(scope="session")
def small_artifacts(tmp_path_factory):
    """A small separated CNN exported to float and int8 TFLite and ONNX, with inputs and the Keras outputs."""
    import keras

    from sepconv.convert import separate
    from sepconv.convert.export.onnx import export_onnx
    from sepconv.convert.export.tflite import export_tflite

    keras.utils.set_random_seed(0)
    x_in = keras.Input((12, 12, 3), name="pixels")
    x = keras.layers.Conv2D(8, 3, activation="relu")(x_in)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    model, _ = separate(keras.Model(x_in, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(x))),
                        rank=2)
    folder = tmp_path_factory.mktemp("artifacts")
    x = np.random.default_rng(0).random((16, 12, 12, 3), dtype=np.float32)
    paths = {
        "tflite": folder / "float.tflite", "tflite_int8": folder / "int8.tflite",
        "onnx": folder / "float.onnx", "onnx_int8": folder / "int8.onnx",
    }
    export_tflite(model, paths["tflite"])
    export_tflite(model, paths["tflite_int8"], quantize="int8", io_type="int8", representative_data=x)
    export_onnx(model, paths["onnx"])
    export_onnx(model, paths["onnx_int8"], quantize="int8", representative_data=x)
    expected = np.asarray(model(x, training=False))
    return {"model": model, "x": x, "expected": expected, **paths}


def pytest_collection_modifyitems(config, items):
    """The long tests first: the slow end-to-end tests and the loopback deploy group (which one worker runs whole)
    start before the many short ones, so that pytest-xdist's workers (scripts/test: --dist loadgroup hands out work in
    collection order) finish together instead of one running a long test alone at the end. A stable sort: within each
    part the order is pytest's (and pytest-randomly's, when scripts/test --repeat turns it on)."""
    def long_first(item):
        return 0 if item.get_closest_marker("slow") or item.get_closest_marker("xdist_group") else 1

    items.sort(key=long_first)


@pytest.fixture()
def tiny_disk(tmp_path):
    """tiny_disk(name, kib): a folder of tmp_path that is a tmpfs of that size (root only), unmounted afterwards."""
    mounted = []

    def mount(name, kib):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (root and mount rights needed): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)

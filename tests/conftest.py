import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    """Tests that switch Keras to mixed precision must not leak it into the next test."""
    import keras

    yield
    keras.config.set_dtype_policy("float32")

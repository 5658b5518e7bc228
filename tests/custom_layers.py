"""Custom layers for the CLI tests, importable with --custom-objects custom_layers:NAME (tests/ on PYTHONPATH)."""

import keras


class LogDetFeature(keras.layers.Layer):
    """log det(A A^T + I) of a 4x4 corner of the first channel: lowers to Cholesky, which TFLite has only as Flex."""

    def call(self, x):
        a = x[:, :4, :4, 0]
        gram = a @ keras.ops.transpose(a, (0, 2, 1)) + keras.ops.eye(4)
        return keras.ops.expand_dims(keras.ops.logdet(gram), -1)

"""Hand-made models covering every structure and Conv2D option that separation must handle.

Each builder returns a built model with random (seeded) weights. BatchNormalization statistics are randomised too,
so that copied non-trainable weights matter.
"""

import keras
import numpy as np

L = keras.layers


def _randomise(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
        elif layer.weights and not isinstance(layer, keras.Model):
            layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()])
    return model


def sequential_options():
    """Sequential; strides, valid padding, dilation, activations, no bias, non-square kernels."""
    return _randomise(keras.Sequential([
        keras.Input((24, 24, 3)),
        L.Conv2D(8, 3, strides=2, padding="valid", activation="relu", name="stride2"),
        L.Conv2D(12, (3, 5), padding="same", dilation_rate=2, use_bias=False, name="dilated_nobias"),
        L.BatchNormalization(name="bn"),
        L.Conv2D(10, (5, 3), strides=(2, 1), padding="same", activation="tanh", name="rect_strided"),
        L.Dropout(0.3, name="drop"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(4, name="head"),
    ], name="seq"))


def functional_branches():
    """Residual Add, Concatenate, a 1x1 shortcut (kept), several convs on one tensor."""
    x_in = keras.Input((16, 16, 4), name="img")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(x_in)
    a = L.Conv2D(8, 3, padding="same", name="res_a")(x)
    a = L.BatchNormalization(name="res_bn")(a)
    shortcut = L.Conv2D(8, 1, name="shortcut_1x1")(x)
    x = L.Add(name="add")([a, shortcut])
    x = L.Activation("relu", name="relu")(x)
    left = L.Conv2D(6, 3, padding="same", name="left")(x)
    right = L.Conv2D(10, 5, padding="same", name="right")(x)
    x = L.Concatenate(name="concat")([left, right])
    x = L.Conv2D(12, 3, strides=2, name="tail")(x)
    out = L.Dense(3, name="logits")(L.Flatten(name="flat")(x))
    return _randomise(keras.Model(x_in, out, name="branches"))


def multi_io():
    """Two inputs, two outputs."""
    a_in, b_in = keras.Input((12, 12, 3), name="a"), keras.Input((12, 12, 2), name="b")
    a = L.Conv2D(8, 3, padding="same", name="conv_a")(a_in)
    b = L.Conv2D(8, 3, padding="same", name="conv_b")(b_in)
    merged = L.Concatenate(name="cat")([a, b])
    out1 = L.Conv2D(5, 3, name="out_map")(merged)
    out2 = L.Dense(2, name="out_vec")(L.GlobalMaxPooling2D(name="gmp")(merged))
    return _randomise(keras.Model([a_in, b_in], [out1, out2], name="multi_io"))


def nested():
    """A Functional inside a Functional inside the top model, plus a nested Sequential, convs at every level."""
    deep_in = keras.Input((8, 8, 6))
    deep = keras.Model(deep_in, L.Conv2D(6, 3, padding="same", name="deep_conv")(deep_in), name="deep")
    mid_in = keras.Input((8, 8, 6))
    m = L.Conv2D(6, 3, padding="same", name="mid_conv")(mid_in)
    mid = keras.Model(mid_in, deep(m), name="mid")
    seq = keras.Sequential([keras.Input((8, 8, 6)), L.Conv2D(7, 3, padding="same", name="seq_conv"),
                            L.BatchNormalization(name="seq_bn")], name="inner_seq")
    x_in = keras.Input((16, 16, 3))
    x = L.Conv2D(6, 3, strides=2, padding="same", name="top_conv")(x_in)
    x = mid(x)
    x = seq(x)
    return _randomise(keras.Model(x_in, L.Flatten()(x), name="outer"))


def shared():
    """One Conv2D layer object called three times (two inputs and once more on its own output)."""
    conv = L.Conv2D(4, 3, padding="same", name="shared_conv")
    a_in, b_in = keras.Input((10, 10, 4), name="a"), keras.Input((10, 10, 4), name="b")
    a, b = conv(a_in), conv(b_in)
    c = conv(L.Add(name="sum")([a, b]))
    return _randomise(keras.Model([a_in, b_in], c, name="shared"))


def conv_options():
    """Regularizers, constraints, activity regularizer, a frozen layer, a custom activation by name."""
    x_in = keras.Input((12, 12, 3))
    x = L.Conv2D(16, 3, kernel_regularizer=keras.regularizers.L2(1e-3), bias_regularizer=keras.regularizers.L1(1e-4),
                 activity_regularizer=keras.regularizers.L2(1e-5), kernel_constraint=keras.constraints.MaxNorm(3.0),
                 bias_constraint=keras.constraints.NonNeg(), activation="gelu", name="regularised")(x_in)
    frozen = L.Conv2D(16, 3, name="frozen", trainable=False)
    x = frozen(x)
    return _randomise(keras.Model(x_in, x, name="options"))


def channels_first():
    x_in = keras.Input((3, 12, 12))
    x = L.Conv2D(8, 3, padding="same", data_format="channels_first", activation="relu", name="cf1")(x_in)
    x = L.Conv2D(8, 3, strides=2, data_format="channels_first", name="cf2")(x)
    return _randomise(keras.Model(x_in, x, name="channels_first"))


def mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x_in = keras.Input((12, 12, 3))
        x = L.Conv2D(8, 3, padding="same", activation="relu", name="mp1")(x_in)
        x = L.Conv2D(8, 3, name="mp2")(x)
        x = L.Activation("linear", dtype="float32", name="to_float32")(x)
        return _randomise(keras.Model(x_in, x, name="mixed"))
    finally:
        keras.config.set_dtype_policy("float32")


CASES = {
    "sequential_options": sequential_options,
    "functional_branches": functional_branches,
    "multi_io": multi_io,
    "nested": nested,
    "shared": shared,
    "conv_options": conv_options,
    "channels_first": channels_first,
    "mixed_precision": mixed_precision,
}

"""Run in a subprocess: write Keras 2 (tf.keras / tf-keras) .h5 files the way TF 2.x before Keras 3 did.

usage: python keras2_writer.py OUT_DIR
Writes model.h5 (a small CNN with BatchNorm, a residual Add and Dropout), inputs/expected outputs in
expected.npz, separable.h5 (SeparableConv2D, DepthwiseConv2D, a strided 1x1 shortcut) with separable_expected.npz, weights.h5 (weights only) and lambda.h5 (a model with a Python lambda).
"""

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN crashes training strided 1x1 convolutions (AVX-512)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tf_keras as k2  # noqa: E402

out = sys.argv[1]
k2.utils.set_random_seed(0)
inputs = k2.Input((16, 16, 3), name="pixels")
x = k2.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
y = k2.layers.Conv2D(8, 3, padding="same", kernel_regularizer=k2.regularizers.l2(1e-4), name="c2")(x)
y = k2.layers.BatchNormalization(name="bn")(y)
x = k2.layers.Add(name="add")([x, y])
x = k2.layers.Conv2D(16, 3, strides=2, activation="relu", name="c3")(x)
x = k2.layers.Dropout(0.2)(x)
x = k2.layers.GlobalAveragePooling2D()(x)
outputs = k2.layers.Dense(5, activation="softmax", name="probs")(x)
model = k2.Model(inputs, outputs, name="keras2_cnn")
model.compile("adam", "sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
data = rng.random((64, 16, 16, 3), dtype=np.float32)
model.fit(data, rng.integers(0, 5, 64), epochs=1, verbose=0)  # moves BatchNorm statistics off their defaults
model.save(os.path.join(out, "model.h5"))
np.savez(os.path.join(out, "expected.npz"), x=data[:4], y=model.predict(data[:4], verbose=0))
model.save_weights(os.path.join(out, "weights.h5"))
# SeparableConv2D and DepthwiseConv2D: tf.keras wrote Conv2D-only keys (groups, kernel_initializer, ...) in their
# configs, which Keras 3's constructors refuse
sep_in = k2.Input((16, 16, 3), name="gray")
s = k2.layers.Conv2D(8, 1, strides=2, use_bias=False, name="proj")(sep_in)
t = k2.layers.SeparableConv2D(8, 3, padding="same", use_bias=False, depthwise_regularizer=k2.regularizers.l2(0.01),
                              name="sep")(sep_in)
t = k2.layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(k2.layers.BatchNormalization(name="sep_bn")(t))
sep = k2.Model(sep_in, k2.layers.Dense(3, activation="softmax")(k2.layers.GlobalAveragePooling2D()(
    k2.layers.add([s, t]))), name="keras2_separable")
sep.compile("adam", "sparse_categorical_crossentropy")
sep.fit(data, rng.integers(0, 3, 64), epochs=1, verbose=0)
sep.save(os.path.join(out, "separable.h5"))
np.savez(os.path.join(out, "separable_expected.npz"), x=data[:4], y=sep.predict(data[:4], verbose=0))
lam = k2.Sequential([k2.Input((4,)), k2.layers.Lambda(lambda t: t * 2.0, name="doubler")])
lam.save(os.path.join(out, "lambda.h5"))
print("ok")

"""Equivalent graph forms of a separable layer, for export: the same function, another set of runtime kernels.

A SeparableConv2D with depth multiplier K > 1 is exported by TFLite and ONNX as one depthwise convolution with
multiplier K, and XNNPACK's int8 kernel for that is slow: on the digits demo's layers (AMD EPYC, 1 thread) K=2 ran
4-8x slower than K=1, though it has twice the depthwise work. The "tiled" form computes the same function with the
kernels that are fast: the input is repeated K times along the channels (one concatenation), one depthwise
convolution with multiplier 1 runs over the K*C channels, and the pointwise convolution reads its rows in that order:

    separable:  y[c*K + k] = dw[:, :, c, k] * x[c]          (TensorFlow's depthwise channel order)
    tiled:      y[k*C + c] = dw[:, :, c, k] * tile(x)[k*C + c],  pointwise rows permuted to match

The latency table (recovery/latency_table.py) times both forms of every K > 1 where the model will run and keeps the
faster; the run exports that form (`with_forms`, applied to the graph the exporters trace, never to the Keras
model that is fine-tuned, equalized or saved) and verifies the artifact against the Keras model like every export.
"""

from __future__ import annotations

import keras
import numpy as np

from sepconv.convert.graph import leaf_layers
from sepconv.convert.separation.rewrites import Plan
from sepconv.convert.separation.walk import rebuild

STANDARD, TILED = "separable", "tiled"
FORMS = (STANDARD, TILED)


@keras.saving.register_keras_serializable(package="sepconv")
class TiledSeparableConv2D(keras.layers.Layer):
    """SeparableConv2D(depth_multiplier=K) computed as tile (K copies of the input's channels) -> DepthwiseConv2D
    (multiplier 1) -> 1x1 convolution. Weights: depthwise (kh, kw, K*C, 1), pointwise (1, 1, K*C, filters), bias."""

    def __init__(self, filters, kernel_size, depth_multiplier, strides=(1, 1), padding="valid",
                 data_format="channels_last", dilation_rate=(1, 1), activation=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.depth_multiplier = int(filters), int(depth_multiplier)
        self.kernel_size, self.strides = tuple(kernel_size), tuple(strides)
        self.dilation_rate = tuple(dilation_rate)
        self.padding, self.data_format, self.use_bias = padding, data_format, bool(use_bias)
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        axis = 1 if self.data_format == "channels_first" else -1
        channels = int(input_shape[axis]) * self.depth_multiplier
        self.depthwise_kernel = self.add_weight(name="depthwise_kernel", shape=(*self.kernel_size, channels, 1))
        self.pointwise_kernel = self.add_weight(name="pointwise_kernel", shape=(1, 1, channels, self.filters))
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros") if self.use_bias \
            else None

    def call(self, inputs):
        axis = 1 if self.data_format == "channels_first" else -1
        tiled = keras.ops.concatenate([inputs] * self.depth_multiplier, axis=axis)
        y = keras.ops.depthwise_conv(tiled, self.depthwise_kernel, strides=self.strides, padding=self.padding,
                                     data_format=self.data_format, dilation_rate=self.dilation_rate)
        y = keras.ops.conv(y, self.pointwise_kernel, strides=1, padding="valid", data_format=self.data_format)
        if self.bias is not None:
            shape = (1, -1, 1, 1) if self.data_format == "channels_first" else (1, 1, 1, -1)
            y = y + keras.ops.reshape(self.bias, shape)
        return self.activation(y) if self.activation is not None else y

    def compute_output_spec(self, inputs):
        separable = keras.layers.SeparableConv2D(self.filters, self.kernel_size, strides=self.strides,
                                                 padding=self.padding, data_format=self.data_format,
                                                 dilation_rate=self.dilation_rate)
        return separable.compute_output_spec(inputs)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "depth_multiplier": self.depth_multiplier, "strides": self.strides, "padding": self.padding,
                "data_format": self.data_format, "dilation_rate": self.dilation_rate,
                "activation": keras.activations.serialize(self.activation) if self.activation else None,
                "use_bias": self.use_bias}


def tiled_plan(layer: keras.layers.SeparableConv2D) -> Plan:
    """The tiled form of `layer` with its weights, as the walk's rebuild takes it."""
    multiplier = layer.depth_multiplier
    depthwise, pointwise = layer.depthwise_kernel.numpy(), layer.pointwise_kernel.numpy()
    kh, kw, channels, _ = depthwise.shape
    # tiled channel k*C + c carries separable channel c*K + k
    order = np.array([c * multiplier + k for k in range(multiplier) for c in range(channels)])
    tiled_depthwise = np.transpose(depthwise, (0, 1, 3, 2)).reshape(kh, kw, multiplier * channels, 1)
    weights = (tiled_depthwise, pointwise[:, :, order, :])
    if layer.use_bias:
        weights += (layer.bias.numpy(),)
    config = {"name": layer.name, "dtype": layer.dtype_policy.name, "filters": layer.filters,
              "kernel_size": layer.kernel_size, "depth_multiplier": multiplier, "strides": layer.strides,
              "padding": layer.padding, "data_format": layer.data_format, "dilation_rate": layer.dilation_rate,
              "activation": keras.activations.serialize(layer.activation), "use_bias": layer.use_bias}
    return Plan(row=None, layer_class=TiledSeparableConv2D, config=config, weights=weights)


def with_forms(model, forms) -> keras.Model:
    """`model` rebuilt with the separable layers named in `forms` ((path, form) pairs, or a dict) in that form;
    `model` itself when none is in another form than STANDARD. trace.frozen_function calls it once per model,
    weights and forms."""
    wanted = normalized(forms)
    if not wanted:
        return model
    layers = dict(leaf_layers(model))
    plans = {}
    for path, _ in wanted:
        layer = layers.get(path)
        if not isinstance(layer, keras.layers.SeparableConv2D) or layer.depth_multiplier < 2:
            raise ValueError(f"{path}: the tiled form is for a SeparableConv2D with depth multiplier > 1, got "
                             f"{type(layer).__name__ if layer is not None else 'no such layer'}")
        plans[id(layer)] = tiled_plan(layer)
    return rebuild(model, plans)


def normalized(forms) -> tuple[tuple[str, str], ...]:
    """`forms` as sorted (path, form) pairs without the STANDARD ones (what changes the graph); checked."""
    pairs = tuple(sorted((dict(forms) if forms else {}).items()))
    unknown = sorted({form for _, form in pairs} - set(FORMS))
    if unknown:
        raise ValueError(f"unknown separable form(s) {unknown}; known: {list(FORMS)}")
    return tuple((path, form) for path, form in pairs if form != STANDARD)

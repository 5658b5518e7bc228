"""Fine-tuning that makes the model robust to int8: uniform noise of half an int8 step on every tensor int8 rounds.

A post-training int8 export rounds every activation tensor between ops to 256 levels over its calibrated range. A
model whose decisions move under that rounding cannot be agreed with by any post-training repair (the zoo's rescaling
CNN at K=1: 82% top-1 agreement as requested, 97.8% after every repair step). Training with additive uniform noise
of +-half an int8 step on those tensors, the rounding's own error distribution, teaches the weights to tolerate it:
the noise-injection form of quantization-aware training (Baskin et al., "UNIQ", 2018; Fan et al., "Training with
Quantization Noise for Extreme Model Compression", 2020), which needs no fake-quant ops, no straight-through
estimator and nothing in the exported graph. Measured on that model (docs/benchmarks.md, a training loop of its own
with ten epochs either way): int8 as requested 90.2% with the noise against 84.0% without, and weight rounding then
passes (98.2%) where it failed (94.7%). convert-model runs it as a pass of its own after fine-tuning, for a model
whose int8 stability (`int8_stability`) is under STABILITY_BAR (recovery/steps.py).

The step is each batch's own range of the tensor / 255 (no state: the copy trained has exactly the student's
weights). The copy adds the noise in evaluation too, so that early stopping keeps the epoch that scores best on the
validation data under int8's rounding error (the starting weights included: an epoch is kept only if it beats them
there); the student receives the chosen weights and carries no noise. The tensors: each layer's output, except where
int8 does not round it anew: a layer whose every consumer is fused into it by the converters, layers that keep their
input's scale (pooling by max, reshapes, padding, dropout), the model's inputs and outputs; and inside a
SeparableConv2D, the depthwise step's output, which the converters keep as its own int8 tensor. Fused, as the TFLite
converter emits them (measured: docs/benchmarks.md, ninth session): a BatchNormalization into the convolution or Dense
layer without activation before it, and a ReLU / ReLU6 into such a layer, an Add, Subtract or Multiply, or a
BatchNormalization; not a ReLU after a Concatenate, a leaky ReLU, nor a ReLU clipped at another value than 6 (each
its own op, after a rounded tensor).
"""

from __future__ import annotations

import functools

from sepconv.convert.graph import leaf_layers, predict_keras
from sepconv.convert.keras_compat import is_graph_model, readers_of
from sepconv.deploy.scores import hit_rate, top1

LEVELS = 255  # an int8 tensor's steps over its range
DEPTHWISE = "depthwise"
# convert-model fine-tunes again under the noise when fewer of the validation images than this keep their top-1 class
# under it after fine-tuning: half of the default int8 bar's 2% allowance (--min-agreement 0.98), the rest left to
# what the noise does not model (weights, calibrated rather than per-batch ranges)
STABILITY_BAR = 0.99

_CONVOLUTIONS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
                 "SeparableConv2D", "Dense")  # a BatchNormalization after one (without activation) is folded into it
_TAKE_ACTIVATION = _CONVOLUTIONS + ("Add", "Subtract", "Multiply", "BatchNormalization")  # a ReLU after one is fused
_FUSED_ACTIVATIONS = ("relu", "relu6")
_SAME_SCALE = ("InputLayer", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "GlobalMaxPooling1D",
               "GlobalMaxPooling2D", "Reshape", "Flatten", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
               "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D", "Permute")


def noise_points(model) -> tuple[str, ...]:
    """The tensors that get the noise (module doc): the paths of the layers whose output does
    ("backbone/block_1_conv"), and "path:depthwise" for a SeparableConv2D's depthwise step."""
    import keras

    outputs = {id(layer) for layer in _output_layers(model)}
    points = []
    for path, layer in leaf_layers(model):
        if type(layer) is keras.layers.SeparableConv2D:
            points.append(f"{path}:{DEPTHWISE}")
        if id(layer) not in outputs and type(layer).__name__ not in _SAME_SCALE and not _fused_into_consumers(layer):
            points.append(path)
    return tuple(points)


def noisy_copy(model):
    """A copy of `model` (same layers, same weights, same order; nested models copied too) whose layers at
    `noise_points` add the noise to their output, in training and in inference alike (its validation scores are
    then those of a model with int8's rounding error). Call it where the copy's variables must live (a
    tf.distribute scope)."""
    import keras

    points = set(noise_points(model))
    layers = list(leaf_layers(model))  # the layers themselves: a nested model may reuse a name its parent has
    outputs = {id(layer) for path, layer in layers if path in points}
    depthwise = {id(layer) for path, layer in layers if f"{path}:{DEPTHWISE}" in points}

    def clone(layer):
        kind = type(layer)
        if id(layer) in outputs or id(layer) in depthwise:
            kind = _noisy_class(kind, id(layer) in outputs, id(layer) in depthwise)
        return kind.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def int8_stability(model, x) -> float | None:
    """The share of the images `x` whose top-1 class `model` keeps when every tensor int8 rounds gets the noise (one
    draw, seeded); None when the first output is not a classifier's."""
    import keras

    clean = predict_keras(model, x)[0]
    if clean.ndim != 2 or clean.shape[-1] < 2:
        return None
    keras.utils.set_random_seed(0)
    noisy = predict_keras(noisy_copy(model), x)[0]
    return hit_rate(top1(noisy), top1(clean))


def _output_layers(model):
    """The layers that produce `model`'s outputs (a nested model's own outputs are its parent's business)."""
    layers = []
    for tensor in model.outputs:
        layer = tensor._keras_history.operation
        while is_graph_model(layer):
            inner = layer.outputs[tensor._keras_history.tensor_index if len(layer.outputs) > 1 else 0]
            layer = inner._keras_history.operation
        layers.append(layer)
    return layers


def _fused_into_consumers(layer) -> bool:
    consumers = readers_of(layer)
    return bool(consumers) and all(_fuses(consumer, layer) for consumer in consumers)


def _fuses(consumer, producer) -> bool:
    """The converters fuse `consumer` into `producer`, which then has no int8 tensor of its own (module doc)."""
    kind, made_by = type(consumer).__name__, type(producer).__name__
    linear = getattr(getattr(producer, "activation", None), "__name__", "linear") == "linear"
    if kind == "BatchNormalization":
        return made_by in _CONVOLUTIONS and linear
    return _fused_activation(consumer) and made_by in _TAKE_ACTIVATION and linear


def _fused_activation(layer) -> bool:
    """A plain ReLU or ReLU6: what the converters fuse into the op before it."""
    kind = type(layer).__name__
    if kind == "ReLU":
        return not layer.negative_slope and not layer.threshold and layer.max_value in (None, 6)
    activation = getattr(layer, "activation", None)
    return kind == "Activation" and getattr(activation, "__name__", "") in _FUSED_ACTIVATIONS


def with_noise(x):
    """x plus uniform noise of +-half an int8 step of its range (0 included)."""
    if not hasattr(x, "shape"):
        return x
    import tensorflow as tf

    span = tf.maximum(tf.reduce_max(x), 0.0) - tf.minimum(tf.reduce_min(x), 0.0)
    half = tf.stop_gradient(span) / (2 * LEVELS)
    return x + tf.random.uniform(tf.shape(x), -1.0, 1.0, dtype=x.dtype) * half


@functools.cache
def _noisy_class(kind, output: bool, depthwise: bool):
    """A subclass of the layer class `kind` whose call adds the noise to its output (output=True) and, for a
    SeparableConv2D (depthwise=True), to its depthwise step's output, which the converters keep as its own int8
    tensor. Same weights, built the same way, in the same order."""
    import inspect

    passes_training = "training" in inspect.signature(kind.call).parameters

    def call(self, inputs, *args, training=None, **kwargs):
        if depthwise:
            outputs = _separable(self, inputs)
        else:
            outputs = kind.call(self, inputs, *args, **({"training": training} if passes_training else {}), **kwargs)
        return with_noise(outputs) if output else outputs

    return type(f"Int8Noisy{kind.__name__}", (kind,), {"call": call})


def _separable(layer, inputs):
    """SeparableConv2D's call as its two steps, the noise between them."""
    from keras import ops

    depthwise = ops.depthwise_conv(inputs, layer.depthwise_kernel, strides=layer.strides, padding=layer.padding,
                                   dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    outputs = ops.conv(with_noise(depthwise), layer.pointwise_kernel, strides=1, padding="valid",
                       data_format=layer.data_format)
    if layer.use_bias:
        shape = (1,) * (layer.rank + 1) + (layer.filters,) if layer.data_format == "channels_last" \
            else (1, layer.filters) + (1,) * layer.rank
        outputs = ops.add(outputs, ops.reshape(layer.bias, shape))
    return layer.activation(outputs) if layer.activation is not None else outputs

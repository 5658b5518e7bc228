"""Cross-layer equalization of separable convolutions, so that their int8 versions hold (Nagel et al., ICCV 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction").

A SeparableConv2D is a depthwise step, then a pointwise step, with nothing in between (no bias, no nonlinearity).
Scaling depthwise output channel j by 1/s_j and pointwise input row j by s_j (s_j > 0) therefore computes exactly
the same function in float. In int8 it does not: the tensor between the two steps is quantized per tensor, so one
channel with a wide range sets the step for all of them, and a narrow channel that the pointwise multiplies by large
weights comes out as mostly rounding noise, amplified (what broke mini_xception at K=1: docs/benchmarks.md).

The scales follow Nagel et al.'s balance s_j = sqrt(r_j / w_j), with r_j the channel's activation range on
calibration images (the data-driven form of their depthwise weight range: the per-tensor activation is what loses
precision here) and w_j the range of pointwise row j as int8 sees it: relative to the largest weight of each output
channel when weights are quantized per channel, the raw maximum when per tensor. A BatchNormalization right after the
layer is folded into the pointwise by both converters; it multiplies whole output channels, which per-channel
quantization normalises away, so it is folded here (for the ranges) only when weights are per tensor. After the
rescaling, r_j / s_j and w_j * s_j both equal sqrt(r_j * w_j): neither side keeps a channel that is tiny next to the
others. Channels that never activate, or whose pointwise row is zero, keep s_j = 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.graph import called_once, layer_at, layer_inputs, leaf_layers
from sepconv.convert.keras_compat import readers_of


@dataclass(frozen=True)
class LayerEqualization:
    path: str
    channels: int  # depthwise output channels (cin * depth multiplier)
    spread_before: float  # max / median of the per-channel activation ranges between depthwise and pointwise
    spread_after: float
    scale_min: float  # the smallest and largest s_j applied
    scale_max: float


@dataclass(frozen=True)
class EqualizationReport:
    samples: int
    per_channel: bool
    layers: tuple[LayerEqualization, ...]

    def to_dict(self) -> dict:
        return {"samples": self.samples, "per_channel": self.per_channel,
                "layers": [asdict(layer) for layer in self.layers]}


def balance_scales(activation_range: np.ndarray, weight_range: np.ndarray) -> np.ndarray:
    """s_j = sqrt(r_j / w_j), normalised to a geometric mean of 1; 1 where either range is 0."""
    r, w = np.asarray(activation_range, np.float64), np.asarray(weight_range, np.float64)
    live = (r > 0) & (w > 0)
    scales = np.ones_like(r)
    scales[live] = np.sqrt(r[live] / w[live])
    if live.any():
        scales[live] /= np.exp(np.mean(np.log(scales[live])))
    return scales


def rescale(depthwise: np.ndarray, pointwise: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(depthwise / s, pointwise * s) with s over the depthwise output channels (c*K + j, Keras' order): the same
    function in exact arithmetic."""
    kh, kw, cin, rank = depthwise.shape
    s = np.asarray(scales, np.float64)
    return ((depthwise / s.reshape(cin, rank)).astype(depthwise.dtype),
            (pointwise * s.reshape(1, 1, -1, 1)).astype(pointwise.dtype))


def pointwise_row_range(pointwise: np.ndarray, per_channel: bool, column_scale: np.ndarray | None = None) -> np.ndarray:
    """w_j: each input row's largest magnitude as int8 weights see it (relative to its output channel's largest weight
    when per channel; after the folded BatchNorm's `column_scale` when per tensor)."""
    matrix = np.abs(pointwise.reshape(-1, pointwise.shape[-1]).astype(np.float64))
    if per_channel:
        return np.max(matrix / np.maximum(matrix.max(axis=0, keepdims=True), 1e-30), axis=1)
    if column_scale is not None:
        matrix = matrix * np.abs(column_scale)[None, :]
    return matrix.max(axis=1)


def equalize(model, x: np.ndarray, *, per_channel: bool = True):
    """A copy of `model` with every SeparableConv2D (called once, channels last) equalized on images `x`, and the
    report. The input model is left as it is; the copy computes the same function in float. A layer with a single
depthwise channel has nothing to balance and is left out."""
    import keras


    if len(x) == 0:
        raise InvalidOptionError("equalization needs calibration images (x is empty)")
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    done = []
    layers = {path: layer for path, layer in leaf_layers(copy)
              if isinstance(layer, keras.layers.SeparableConv2D) and layer.data_format == "channels_last"
              and int(np.prod(layer.depthwise_kernel.shape[2:])) > 1 and called_once(copy, path)}
    for path, inputs in layer_inputs(copy, x, list(layers)):  # the copy runs once, each layer after its equalization
        layer = layers[path]
        inner = keras.ops.depthwise_conv(inputs, layer.depthwise_kernel, strides=layer.strides,
                                         padding=layer.padding, dilation_rate=layer.dilation_rate)
        inner = np.asarray(keras.ops.convert_to_numpy(inner), np.float64)
        ranges = np.max(np.abs(inner.reshape(-1, inner.shape[-1])), axis=0)
        depthwise, pointwise = layer.depthwise_kernel.numpy(), layer.pointwise_kernel.numpy()
        column_scale = None if per_channel else _folded_batchnorm_scale(copy, path)
        scales = balance_scales(ranges, pointwise_row_range(pointwise, per_channel, column_scale))
        depthwise, pointwise = rescale(depthwise, pointwise, scales)
        layer.depthwise_kernel.assign(depthwise)
        layer.pointwise_kernel.assign(pointwise)
        done.append(LayerEqualization(path, len(ranges), _spread(ranges), _spread(ranges / scales),
                                      float(scales.min()), float(scales.max())))
    return copy, EqualizationReport(samples=len(x), per_channel=per_channel, layers=tuple(done))


def _spread(ranges: np.ndarray) -> float:
    live = ranges[ranges > 0]
    return float(live.max() / np.median(live)) if live.size else 1.0


def _folded_batchnorm_scale(model, path: str) -> np.ndarray | None:
    """gamma / sqrt(var + eps) of the BatchNormalization that alone reads the layer at `path`'s output, if any."""
    import keras


    layer = layer_at(model, path)
    readers = readers_of(layer)
    if len(readers) != 1 or not isinstance(readers[0], keras.layers.BatchNormalization):
        return None
    bn = readers[0]
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    return gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)

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

The same holds across a ReLU: a BatchNormalization, then ReLU (or ReLU6), then (through zero padding) a convolution
that reads it alone - MobileNetV2's expand -> depthwise and depthwise -> project pairs, a separated model's
SeparableConv2D -> BatchNorm -> ReLU -> SeparableConv2D. Scaling the BatchNorm's gamma and beta of channel j by 1/s_j
scales the ReLU's output channel j by 1/s_j (relu(y / s) = relu(y) / s for s > 0), and the reader's kernel slice for
input channel j times s_j undoes it. ReLU6's clip at 6 stays exact while no scaled channel passes it: the scales are
normalised so that no channel's range exceeds T, the widest one's (R) or, under a clip, half the clip if less
(`stretch_scales`), and a channel already past T keeps s_j = 1. When the reader is depthwise with per-channel weights,
the weight side costs nothing (each channel's weights have their own int8 scale), so every channel is stretched to T
(s_j = r_j / T). Measured on the zoo's nested MobileNetV2 (docs/benchmarks.md): a small gain, not the repair it
needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.graph import called_once, layer_at, layer_inputs, leaf_layers
from sepconv.convert.keras_compat import readers_of


CLIP_HEADROOM = 2.0  # across ReLU6, no channel is stretched past clip / CLIP_HEADROOM (stretch_scales)


@dataclass(frozen=True)
class LayerEqualization:
    path: str  # the SeparableConv2D equalized inside, or the layer that reads the equalized activation
    channels: int  # depthwise output channels (cin * depth multiplier), or the activation's channels
    spread_before: float  # max / median of the per-channel ranges of the equalized tensor
    spread_after: float
    scale_min: float  # the smallest and largest s_j applied
    scale_max: float
    across: str = ""  # "": inside a SeparableConv2D; else the BatchNormalization whose channels were scaled


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
    """A copy of `model` with every BatchNorm -> ReLU -> convolution chain (`activation_pairs`) equalized on images
    `x`, then every SeparableConv2D (called once, channels last), and the report. The input model is left as it is; the
    copy computes the same function in float (across ReLU6, on the images `x`). A layer with a single depthwise
    channel has nothing to balance and is left out."""
    import keras


    if len(x) == 0:
        raise InvalidOptionError("equalization needs calibration images (x is empty)")
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    done = _equalize_across_activations(copy, x, per_channel)  # first: it changes what a separable layer reads
    done += _equalize_separable(copy, x, per_channel)
    return copy, EqualizationReport(samples=len(x), per_channel=per_channel, layers=tuple(done))


def _equalize_separable(copy, x: np.ndarray, per_channel: bool) -> list[LayerEqualization]:
    import keras

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
    return done


def activation_pairs(model) -> list[tuple[str, str, float]]:
    """(BatchNormalization path, reader path, the ReLU's clip: inf or its max_value) for each BatchNormalization
    (channels last, with gamma, called once) read only by a ReLU (no slope, no threshold) read only by a convolution
    (DepthwiseConv2D, SeparableConv2D, or Conv2D without groups; channels last, called once), zero padding between
    them allowed, all in one (nested) model."""
    import keras

    pairs = []
    for path, layer in leaf_layers(model):
        if not (isinstance(layer, keras.layers.BatchNormalization) and layer.scale and layer.axis in (-1, 3)
                and called_once(model, path)):
            continue
        relu = _only_reader(layer)
        clip = _relu_clip(relu)
        reader = _only_reader(relu) if clip is not None else None
        if isinstance(reader, keras.layers.ZeroPadding2D):
            reader = _only_reader(reader)
        if not _scalable_reader(reader):
            continue
        reader_path = path.rsplit("/", 1)[0] + "/" + reader.name if "/" in path else reader.name
        if layer_at(model, reader_path) is reader and called_once(model, reader_path):
            pairs.append((path, reader_path, clip))
    return pairs


def _only_reader(layer):
    readers = readers_of(layer) if layer is not None else []
    return readers[0] if len(readers) == 1 else None


def _relu_clip(layer) -> float | None:
    """inf for a plain ReLU, its max_value for a clipped one (ReLU6: 6), None for anything else."""
    import keras

    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0 or float(layer.threshold) != 0:
            return None
        return np.inf if layer.max_value is None else float(layer.max_value)
    if isinstance(layer, keras.layers.Activation):
        return {"relu": np.inf, "relu6": 6.0}.get(getattr(layer.activation, "__name__", ""))
    return None


def _scalable_reader(layer) -> bool:
    import keras

    if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
        return layer.data_format == "channels_last"
    return (isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D
            and layer.data_format == "channels_last" and layer.groups == 1)


def _reader_kernel(layer):
    """The reader's kernel whose axis 2 is its input channels (the depthwise kernel of a SeparableConv2D)."""
    return layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel


def _reader_weight_range(layer, kernel: np.ndarray, per_channel: bool, model, path: str) -> np.ndarray | None:
    """w_j of the reader's input channel j as int8 sees it; None when its weights are quantized per depthwise channel
    (each input channel has its own scale: the weight side costs nothing)."""
    import keras

    if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
        if per_channel:
            return None
        return np.abs(kernel.astype(np.float64)).max(axis=(0, 1, 3))
    kh, kw, cin, _ = kernel.shape
    column_scale = None if per_channel else _folded_batchnorm_scale(model, path)
    return pointwise_row_range(kernel, per_channel, column_scale).reshape(kh, kw, cin).max(axis=(0, 1))


def stretch_scales(ranges: np.ndarray, weight_range: np.ndarray | None, clip: float) -> np.ndarray:
    """s_j across a ReLU (module doc): balanced as balance_scales does (or r_j / T when weight_range is None), then
    normalised so that max_j r_j / s_j = T. T is the widest range R; under a clip, at most clip / CLIP_HEADROOM, and
    channels past T keep s_j = 1: a channel stretched right up to the clip on the calibration images would be
    cut on an image that drives it a little further (measured on the zoo's MobileNetV2: stretched to 6, the float
    model's top-1 moved on 0.7% of the held-out digits; with the headroom its outputs stay within 2e-4). Channels
    below T / 10^4 (never active: nothing to stretch) keep 1 too."""
    r = np.asarray(ranges, np.float64)
    target = min(float(r.max()) if r.size else 0.0, clip / CLIP_HEADROOM)
    scales = np.ones_like(r)
    live = (r > target * 1e-4) & (r <= target)
    if weight_range is not None:
        live &= np.asarray(weight_range) > 0
    if target <= 0 or not live.any():
        return scales
    if weight_range is None:
        scales[live] = r[live] / target
    else:
        balanced = np.sqrt(r[live] / np.asarray(weight_range, np.float64)[live])
        scales[live] = balanced * np.max(r[live] / (target * balanced))
    return scales


def _equalize_across_activations(copy, x: np.ndarray, per_channel: bool) -> list[LayerEqualization]:
    """Every pair of activation_pairs(copy) equalized on images x. The rescaling leaves the float function as it is,
    so one walk of the model measures every pair's activation before any is changed."""
    pairs = activation_pairs(copy)
    ranges = {}
    for path, inputs in layer_inputs(copy, x, [reader for _, reader, _ in pairs]):
        ranges[path] = np.max(np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1]), axis=0)
    done = []
    for bn_path, reader_path, clip in pairs:
        batchnorm, reader = layer_at(copy, bn_path), layer_at(copy, reader_path)
        kernel = _reader_kernel(reader)
        values = kernel.numpy()
        r = np.maximum(ranges[reader_path], 0.0)
        if r.size < 2:
            continue
        scales = stretch_scales(r, _reader_weight_range(reader, values, per_channel, copy, reader_path), clip)
        if np.all(scales == 1.0):
            continue
        batchnorm.gamma.assign((batchnorm.gamma.numpy() / scales).astype(batchnorm.gamma.dtype))
        if batchnorm.center:
            batchnorm.beta.assign((batchnorm.beta.numpy() / scales).astype(batchnorm.beta.dtype))
        kernel.assign((values * scales.reshape(1, 1, -1, 1)).astype(values.dtype))
        done.append(LayerEqualization(reader_path, len(r), _spread(r), _spread(r / scales), float(scales.min()),
                                      float(scales.max()), across=bn_path))
    return done


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

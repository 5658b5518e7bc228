"""Weight rounding for int8 that keeps each layer's output, and bias correction of what rounding still shifts.

Both converters quantize a kernel per output channel and symmetric: q = clip(round(w / s), -127, 127) with
s = max|w| / 127 of the channel (TFLite's per-channel int8; ONNX Runtime's symmetric QDQ weights). Each weight goes
to its nearest step, each on its own. On a network whose layers are many and thin, the errors add up: the zoo's
nested MobileNetV2 agrees with its float self on 93.8% of the validation digits with int8 weights and float
activations (int16 activations: the same), where int8 must reach 98% (docs/benchmarks.md).

**Rounding** (`round_weights`) follows GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023; the Optimal Brain Quantization update of Frantar and Alistarh 2022):
a kernel, as a (inputs x outputs) matrix W, is rounded one input row at a time, and each row's rounding error is
spread over the rows not yet rounded through the inverse of the layer's input second moment H = E[x x^T] on the
calibration images, which minimises the layer's output error ||(Q - W)^T x||^2 on them. We chose it over AdaRound
(Nagel et al. 2020: the same layer-output objective, a learned up-or-down choice per weight) because it is closed form:
no learning rate, no iteration count or annealing schedule to tune, one Cholesky factor per layer, seconds on a CPU;
and over AdaQuant (free weights fitted by gradient descent with the rounding in the loop) for the same reason. Each
layer sees the inputs that the copy, with every earlier layer already rounded, gives it.

**The target is the float model** (asymmetric calibration, as GPTAQ, Li et al. 2025, puts it): GPTQ as published
keeps the layer's float weights on the inputs the rounded copy gives it, ||(Q - W)^T q||, so the drift those inputs
already carry passes on untouched and adds up over a deep net. Here the layer aims at the float model's own output,
||Q^T q - W^T f|| with f the float model's input to the layer on the same images: the float weights are first moved
to W* = (H + lI)^-1 (E[q f^T] W + l W), the least-squares fit of the float outputs from the copy's inputs pulled
towards W (l = DAMPING of H's mean diagonal), and W* is rounded. The fit is made only where the layer has at least
ROWS_PER_INPUT input rows per weight row on the calibration images (every depthwise kernel, most convolutions; not a
classifier's Dense layer on 200 images, whose fit would learn the calibration images by heart).

The rounded kernel is written back as float weights that lie on each channel's int8 grid, with each channel's largest
weight kept as it was: the converter computes the same scale and its nearest rounding reproduces the choice exactly.
Per-channel quantization is blind to the BatchNorm folding that scales whole output channels, so the kernel is
rounded before folding. Per-tensor weights do not keep a grid through folding: rounding is for per-channel exports.

**Bias correction** (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV
2019, in its empirical form): what the rounded layer still shifts the mean output by, Q^T E[q] - W^T E[f] per output
channel (the copy's drift included), is taken off its bias (or added to the moving mean of a BatchNormalization that
alone reads a layer without bias).

Layers: Conv2D (groups 1), DepthwiseConv2D, SeparableConv2D (its depthwise kernel, then its pointwise kernel on what
the rounded depthwise step gives) and Dense; channels last, called once. Others are left as they are.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.graph import called_once, layer_inputs, leaf_layers
from sepconv.convert.keras_compat import readers_of

LEVELS = 127  # symmetric int8 weights: -127..127
DAMPING = 0.01  # added to H's diagonal, as a share of its mean: keeps the inverse stable where inputs are collinear
ROWS_PER_INPUT = 10  # the asymmetric fit moves the weights only with this many input rows per weight row
CHUNK = 16  # images per step when collecting a layer's input moments (patches of a large layer take memory)


@dataclass(frozen=True)
class LayerRounding:
    path: str
    kernels: int  # kernels rounded (2 for a SeparableConv2D)
    error_nearest: float  # the layer's output error on the calibration images, relative to its output's spread, against
    # its float output on the float model's inputs (asymmetric) or on the copy's
    error_rounded: float  # the same after rounding (and bias correction, when asked)
    bias_corrected: bool


@dataclass(frozen=True)
class RoundingReport:
    samples: int
    bias_correction: bool
    layers: tuple[LayerRounding, ...]
    asymmetric: bool = True

    def to_dict(self) -> dict:
        return {"samples": self.samples, "bias_correction": self.bias_correction, "asymmetric": self.asymmetric,
                "layers": [asdict(layer) for layer in self.layers]}


def nearest(kernel: np.ndarray) -> np.ndarray:
    """`kernel` (inputs x outputs) rounded to the nearest step of each output column's symmetric int8 grid: what the
    converters do."""
    return _on_grid(kernel, _scales(kernel))


def gptq(kernel: np.ndarray, moment: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """`kernel` (inputs x outputs) on each output column's int8 grid (its largest weight kept as it is, so that the
    grid is unchanged), rounded row by row with each row's error spread over the later rows through the inverse of
    `moment` (inputs x inputs: E[x x^T] of the layer's inputs). A stack of kernels (..., inputs, outputs) with a
    moment each (..., inputs, inputs) is rounded as that many problems at once (a depthwise layer's channels: one
    row loop for all of them instead of one Python loop per channel)."""
    work = np.array(kernel, np.float64)
    rows, columns = work.shape[-2:]
    work = work.reshape(-1, rows, columns)  # (problems, rows, columns)
    scale = np.abs(work).max(axis=1) / LEVELS  # (problems, columns)
    pinned = np.abs(work).argmax(axis=1)  # each column's largest weight: it sets the scale, so it stays
    pinned_values = np.take_along_axis(work, pinned[:, None, :], axis=1)[:, 0]
    h = np.array(moment, np.float64).reshape(-1, rows, rows)
    diagonal = np.arange(rows)
    h[:, diagonal, diagonal] = np.where(h[:, diagonal, diagonal] <= 0, 1.0, h[:, diagonal, diagonal])  # dead inputs
    h[:, diagonal, diagonal] += damping * h[:, diagonal, diagonal].mean(axis=1, keepdims=True)
    upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)
    rounded = np.zeros_like(work)
    for row in range(rows):
        values = work[:, row]
        chosen = _on_grid(values, scale)
        rounded[:, row] = chosen
        error = (values - chosen) / upper[:, row, row, None]
        work[:, row + 1:] -= upper[:, row, row + 1:, None] * error[:, None, :]
        problem, column = np.nonzero(pinned > row)
        work[problem, pinned[problem, column], column] = pinned_values[problem, column]
    return rounded.reshape(np.shape(kernel)).astype(np.asarray(kernel).dtype)


def round_weights(model, x: np.ndarray, *, bias_correction: bool = False, asymmetric: bool = True, progress=None,
                  into=None):
    """A copy of `model` with the kernels of its Conv2D, DepthwiseConv2D, SeparableConv2D and Dense layers rounded to
    their int8 grids (GPTQ) on images `x`, and (bias_correction) the mean output shift that is left taken off their
    biases; and the RoundingReport. asymmetric: each layer's target is the float model's output on the float
    model's own inputs (module doc); else its float weights on the inputs the rounded copy gives it. The input model
    is left as it is. into: a copy of `model` (keras.models.clone_model) to round in place of a new one, its weights
    overwritten (the repair rounds several variants in one copy: cloning a deep model takes seconds)."""
    import keras

    if len(x) == 0:
        raise InvalidOptionError("weight rounding needs calibration images (x is empty)")
    if into is model:
        raise ValueError("round_weights rounds a copy: `into` must not be the model itself")
    say = progress or (lambda message: None)
    copy = into if into is not None else keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    layers = {path: layer for path, layer in leaf_layers(copy) if _supported(layer) and called_once(copy, path)}
    paths = list(layers)
    walks = zip(layer_inputs(copy, x, paths), layer_inputs(model, x, paths) if asymmetric else itertools.repeat(None))
    done = []
    for (path, inputs), pair in walks:  # each layer sees the earlier ones rounded
        layer = layers[path]
        inputs = np.asarray(inputs, np.float32)
        targets = inputs if pair is None else np.asarray(pair[1], np.float32)
        reference = _output(layer, targets)
        nearest_error = _relative(_output_with(layer, inputs, _nearest_weights(layer)), reference)
        shift = _round_layer(layer, inputs, targets)
        corrected = bias_correction and _correct_bias(copy, layer, shift)
        done.append(LayerRounding(path, 2 if isinstance(layer, keras.layers.SeparableConv2D) else 1,
                                  nearest_error, _relative(_output(layer, inputs), reference), corrected))
        say(f"{path}: output error {nearest_error:.2%} rounded to nearest, {done[-1].error_rounded:.2%} now")
    return copy, RoundingReport(samples=len(x), bias_correction=bias_correction, layers=tuple(done),
                                asymmetric=asymmetric)


def _scales(kernel: np.ndarray) -> np.ndarray:
    return np.abs(kernel).max(axis=0) / LEVELS


def _on_grid(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`values` (per output column, or one row of them) at their nearest step of `scale`, clipped to -127..127; 0
    where the scale is 0."""
    return np.clip(np.round(values / np.where(scale > 0, scale, 1.0)), -LEVELS, LEVELS) * scale


def _supported(layer) -> bool:
    import keras

    if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
        return layer.data_format == "channels_last"
    if isinstance(layer, keras.layers.Conv2D):
        return layer.data_format == "channels_last" and layer.groups == 1
    return isinstance(layer, keras.layers.Dense)


def _patches(layer, x: np.ndarray, kernel_shape) -> np.ndarray:
    """(positions, kh * kw * channels) of the layer's receptive fields on `x`, in its kernel's (kh, kw, c) order.
    A 1x1 kernel's are the input's pixels at its strides (no padding either way, dilation moot): read off `x` instead of
    a TensorFlow op and its copy (most of a MobileNet's layers)."""
    kh, kw = kernel_shape[:2]
    if kh == kw == 1:
        rows, columns = layer.strides
        return np.asarray(np.asarray(x)[:, ::rows, ::columns], np.float64).reshape(-1, np.shape(x)[-1])
    import tensorflow as tf

    patches = tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1],
                                       rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())
    return np.asarray(patches, np.float64).reshape(-1, patches.shape[-1])


@dataclass
class _Moments:
    """Of a layer's input rows q (in the rounded copy) and f (in the float model, the same images): E[q q^T],
    E[q f^T], E[q], E[f] and the number of rows. Symmetric (f is q): cross is second, mean_f is mean_q."""
    second: np.ndarray
    cross: np.ndarray
    mean_q: np.ndarray
    mean_f: np.ndarray
    rows: int


def _moments(pairs) -> _Moments:
    """The _Moments of the (rows, features) array pairs (q, f) that `pairs` yields."""
    total, second, cross, first_q, first_f = 0, 0.0, 0.0, 0.0, 0.0
    symmetric = True
    for q, f in pairs:
        symmetric = symmetric and f is q
        second = second + q.T @ q
        cross = cross + (0.0 if f is q else q.T @ f)
        first_q, first_f = first_q + q.sum(axis=0), first_f + (0.0 if f is q else f.sum(axis=0))
        total += len(q)
    return _averaged(second, None if symmetric else cross, first_q, first_f, total)


def _depthwise_moments(pairs, channels: int) -> _Moments:
    """The _Moments of each input channel's k = kh * kw patch values, stacked (channels first): one batched matrix
    product per chunk for all channels."""
    total, second, cross, first_q, first_f = 0, 0.0, 0.0, 0.0, 0.0
    symmetric = True
    for q, f in pairs:
        symmetric = symmetric and f is q
        q = np.ascontiguousarray(q.reshape(len(q), -1, channels).transpose(2, 1, 0))  # (channels, kh * kw, positions)
        f = q if symmetric else np.ascontiguousarray(f.reshape(len(f), -1, channels).transpose(2, 1, 0))
        second = second + q @ q.transpose(0, 2, 1)
        cross = cross + (0.0 if symmetric else q @ f.transpose(0, 2, 1))
        first_q, first_f = first_q + q.sum(axis=2), first_f + (0.0 if symmetric else f.sum(axis=2))
        total += q.shape[2]
    return _averaged(second, None if symmetric else cross, first_q, None if symmetric else first_f, total)


def _averaged(second, cross, first_q, first_f, total: int) -> _Moments:
    """The _Moments of these sums over `total` rows; cross None: symmetric (the same array as second, which
    _rounded tells apart by identity)."""
    second, mean_q = second / total, first_q / total
    if cross is None:
        return _Moments(second, second, mean_q, mean_q, total)
    return _Moments(second, cross / total, mean_q, first_f / total, total)


def _chunked(x: np.ndarray, targets: np.ndarray, function):
    """(function(x part), function(targets part)) per CHUNK images; the same array twice where targets is x."""
    for start in range(0, len(x), CHUNK):
        q = function(x[start:start + CHUNK])
        yield q, q if targets is x else function(targets[start:start + CHUNK])


def _rounded(matrix: np.ndarray, moments: _Moments) -> tuple[np.ndarray, np.ndarray]:
    """(`matrix` (inputs x outputs) rounded to its grid by GPTQ, the mean output shift it leaves against the float
    layer on the float inputs). Asymmetric moments with enough rows per input first move the float weights to where
    they give the float outputs on the rounded copy's inputs (a ridge fit towards the weights themselves) and round
    that. A stack of matrices (..., inputs, outputs) with stacked moments is that many problems at once."""
    aim = matrix
    inputs = matrix.shape[-2]
    if moments.cross is not moments.second and moments.rows >= ROWS_PER_INPUT * inputs:
        diagonal = np.arange(inputs)
        ridge = DAMPING * moments.second[..., diagonal, diagonal].mean(axis=-1)
        ridge = np.where(ridge > 0, ridge, DAMPING)[..., None, None]
        h = moments.second + ridge * np.eye(inputs)
        aim = np.linalg.solve(h, moments.cross @ matrix + ridge * matrix)
    rounded = gptq(aim, moments.second)
    shift = (moments.mean_q[..., None, :] @ rounded)[..., 0, :] - (moments.mean_f[..., None, :] @ matrix)[..., 0, :]
    return rounded, shift


def _round_conv(layer, x, targets, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rounded kernel, the mean output shift it leaves per output channel) of a dense convolution's kernel."""
    moments = _moments(_chunked(x, targets, lambda part: _patches(layer, part, kernel.shape)))
    rounded, shift = _rounded(np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]), moments)
    return rounded.reshape(kernel.shape).astype(kernel.dtype), shift


def _round_depthwise(layer, x, targets, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same for a depthwise kernel (kh, kw, channels, multiplier): one small problem per input channel, all
    channels rounded together."""
    kh, kw, channels, multiplier = kernel.shape
    moments = _depthwise_moments(_chunked(x, targets, lambda part: _patches(layer, part, kernel.shape)), channels)
    matrices = np.asarray(kernel, np.float64).reshape(kh * kw, channels, multiplier).transpose(1, 0, 2)
    rounded, shift = _rounded(matrices, moments)  # (channels, kh * kw, multiplier), (channels, multiplier)
    return rounded.transpose(1, 0, 2).reshape(kernel.shape).astype(kernel.dtype), shift.reshape(-1)


def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1])


def _round_layer(layer, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Round `layer`'s kernels in place on its input `x` (aiming at its float output on `targets`, which may be `x`
    itself); the mean output shift per output channel they leave."""
    import keras

    if isinstance(layer, keras.layers.SeparableConv2D):
        float_depthwise = layer.depthwise_kernel.numpy()
        depthwise, depthwise_shift = _round_depthwise(layer, x, targets, float_depthwise)
        layer.depthwise_kernel.assign(depthwise)

        def inner(images, kernel):
            return np.asarray(keras.ops.convert_to_numpy(keras.ops.depthwise_conv(
                images, kernel, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate)))

        inner_x = inner(x, depthwise)
        inner_targets = inner_x if targets is x else inner(targets, float_depthwise)
        pointwise = layer.pointwise_kernel.numpy()
        rounded, shift = _rounded(np.asarray(pointwise, np.float64).reshape(-1, pointwise.shape[-1]),
                                  _moments(_chunked(inner_x, inner_targets, _rows)))
        layer.pointwise_kernel.assign(rounded.reshape(pointwise.shape).astype(pointwise.dtype))
        # asymmetric: the pointwise step's shift is against the float layer on the float inputs, the whole layer's;
        # else it is against its float weights on the rounded depthwise step's output, which shifted first
        return shift if targets is not x else depthwise_shift @ rounded + shift
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel, shift = _round_depthwise(layer, x, targets, layer.kernel.numpy())
    elif isinstance(layer, keras.layers.Conv2D):
        kernel, shift = _round_conv(layer, x, targets, layer.kernel.numpy())
    else:  # Dense: every leading axis is a batch axis
        matrix = layer.kernel.numpy()
        rounded, shift = _rounded(np.asarray(matrix, np.float64), _moments(_chunked(x, targets, _rows)))
        kernel = rounded.astype(matrix.dtype)
    layer.kernel.assign(kernel)
    return shift


def _correct_bias(model, layer, shift: np.ndarray) -> bool:
    """Take `shift` off the layer's bias, or add it to the moving mean of the BatchNormalization that alone reads a
    layer without bias; False when neither exists."""
    import keras

    if getattr(layer, "use_bias", False):
        layer.bias.assign((layer.bias.numpy() - shift).astype(layer.bias.dtype))
        return True
    readers = readers_of(layer)
    if len(readers) == 1 and isinstance(readers[0], keras.layers.BatchNormalization) and readers[0].axis in (-1, 3):
        bn = readers[0]
        bn.moving_mean.assign((bn.moving_mean.numpy() + shift).astype(bn.moving_mean.dtype))
        return True
    return False


def _kernels(layer) -> list:
    import keras

    if isinstance(layer, keras.layers.SeparableConv2D):
        return [layer.depthwise_kernel, layer.pointwise_kernel]
    return [layer.kernel]


def _nearest_weights(layer) -> list[np.ndarray]:
    """The layer's kernels rounded to nearest, each per output channel as the converters do."""
    import keras

    out = []
    for variable in _kernels(layer):
        kernel = variable.numpy()
        if isinstance(layer, keras.layers.DepthwiseConv2D) or (
                isinstance(layer, keras.layers.SeparableConv2D) and variable is layer.depthwise_kernel):
            kh, kw, channels, multiplier = kernel.shape
            out.append(nearest(kernel.reshape(kh * kw, channels * multiplier)).reshape(kernel.shape))
        else:
            out.append(nearest(kernel.reshape(-1, kernel.shape[-1])).reshape(kernel.shape))
    return out


def _output(layer, x) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(layer(x)), np.float64)


def _output_with(layer, x, kernels: list[np.ndarray]) -> np.ndarray:
    """The layer's output on `x` with `kernels` in place of its own (restored after)."""
    variables = _kernels(layer)
    saved = [variable.numpy() for variable in variables]
    try:
        for variable, kernel in zip(variables, kernels):
            variable.assign(kernel)
        return _output(layer, x)
    finally:
        for variable, kernel in zip(variables, saved):
            variable.assign(kernel)


def _relative(actual: np.ndarray, reference: np.ndarray) -> float:
    spread = float(np.std(reference))
    return float(np.sqrt(np.mean((actual - reference) ** 2)) / spread) if spread > 0 else 0.0

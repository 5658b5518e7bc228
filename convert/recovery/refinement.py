"""Data-driven refinement without back-propagation: re-solve each separated layer's second half and bias.

For each separated layer, in graph order, the first half of the *separated* model's layer (so that earlier layers'
errors are compensated) is fed calibration images, and the second half's kernel and bias are re-solved by least
squares so that the layer's pre-activation output matches the *original* Conv2D's pre-activation output on the original
model's activations. This is the idea of DAC (Li et al., WACV 2019) and of Network Decoupling's data-driven variant.
The halves: the depthwise step then the pointwise kernel (a SeparableConv2D), or the kh x 1 convolution then the
1 x kw one, whose inputs are the kw-wide rows of the first half's output (the spatial form, rewrites.SpatialPair).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.graph import called_once, layer_at, layer_inputs, leaf_layers

MAX_ROWS = 200_000  # output positions per layer used in the least-squares fit (a random subset beyond that)


@dataclass(frozen=True)
class LayerRefinement:
    path: str
    rows: int  # output positions the fit used
    error_before: float  # ||separated - original|| / ||original|| of the layer's pre-activation output
    error_after: float
    status: str  # "refined" or "skipped: <reason>"


@dataclass(frozen=True)
class RefinementReport:
    layers: tuple[LayerRefinement, ...]
    samples: int

    def to_dict(self) -> dict:
        return {"samples": self.samples, "layers": [asdict(layer) for layer in self.layers]}


def refine(original, separated, x: np.ndarray, report, *, ridge: float = 1e-6, seed: int = 0,
           progress=None) -> RefinementReport:
    """Refit, in place, the pointwise kernel and bias of every separated layer of `separated` (see module doc).

    original / separated: the model before and after `separate`; report: its SeparationReport; x: calibration
    images shaped like the model's input. Layers inside nested models or shared by several calls are skipped
    (reported), as their inputs are not one tensor of the top-level graph. progress(message): a line per layer.
    """
    if len(x) == 0:
        raise InvalidOptionError("refine needs calibration images (x is empty)")
    rng = np.random.default_rng(seed)
    paths = [row.path for row in report.separated]
    once = [path for path in paths if called_once(separated, path)]
    done = {}
    for path in paths:
        if path not in once:
            done[path] = LayerRefinement(path, 0, float("nan"), float("nan"), "skipped: shared by several calls")
            if progress:
                progress(f"[{len(done)}/{len(paths)}] {path}: {done[path].status}")
    # both models run once, layer by layer, side by side (the same graph, so the same order): each layer is refit
    # when the layers before it, refined ones included, have run
    for (path, original_input), (_, separated_input) in zip(layer_inputs(original, x, once),
                                                             layer_inputs(separated, x, once)):
        done[path] = _refine_layer(original, separated, path, original_input, separated_input, ridge, rng)
        if progress:
            progress(f"[{len(done)}/{len(paths)}] {path}: {done[path].status}")
    return RefinementReport(layers=tuple(done[path] for path in paths), samples=len(x))


def _refine_layer(original, separated, name: str, original_input: np.ndarray, separated_input: np.ndarray,
                  ridge: float, rng) -> LayerRefinement:
    """Refit the layer at `name` of `separated` from what it and the original's Conv2D receive."""
    import keras

    conv, sep = layer_at(original, name), layer_at(separated, name)
    options = dict(strides=conv.strides, padding=conv.padding, data_format=conv.data_format,
                   dilation_rate=conv.dilation_rate)
    target = np.asarray(keras.ops.convert_to_numpy(keras.ops.conv(original_input, conv.kernel, **options)), np.float64)
    if conv.data_format == "channels_first":
        target = np.moveaxis(target, 1, -1)
    if conv.use_bias:
        target = target + conv.bias.numpy()
    second, bias_of, features = _second_half(sep, conv, separated_input)
    target = target.reshape(-1, target.shape[-1])
    if len(target) > MAX_ROWS:
        keep = rng.choice(len(target), MAX_ROWS, replace=False)
        target, features = target[keep], features[keep]
    pointwise = second.numpy().reshape(features.shape[1], -1).astype(np.float64)
    use_bias = bias_of is not None
    bias = bias_of.numpy().astype(np.float64) if use_bias else np.zeros(target.shape[1])
    before = _relative(features @ pointwise + bias, target)
    design = np.hstack([features, np.ones((len(features), 1))]) if use_bias else features
    gram = design.T @ design
    gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
    solution = np.linalg.solve(gram, design.T @ target)
    new_pointwise, new_bias = (solution[:-1], solution[-1]) if use_bias else (solution, None)
    after = _relative(design @ solution, target)
    if after >= before:  # least squares cannot do worse on its own rows, unless the ridge dominates: keep the SVD
        return LayerRefinement(name, len(target), before, before, "skipped: no improvement")
    second.assign(new_pointwise.reshape(second.shape).astype(np.float32))
    if use_bias:
        bias_of.assign(new_bias.astype(np.float32))
    return LayerRefinement(name, len(target), before, after, "refined")


def _second_half(sep, conv, x):
    """(the second half's kernel, its bias or None, its inputs as (output positions, rows of the kernel)) of a
    separated layer fed `x`, channels last: a SeparableConv2D's pointwise kernel on the depthwise step's output
    channels, or the spatial form's `_h` kernel on the `_v` output's 1 x kw window of each position."""
    import keras

    if hasattr(sep, "pointwise_kernel"):
        features = keras.ops.depthwise_conv(x, sep.depthwise_kernel, strides=conv.strides, padding=conv.padding,
                                            data_format=conv.data_format, dilation_rate=conv.dilation_rate)
        features = np.asarray(keras.ops.convert_to_numpy(features), np.float64)
        if conv.data_format == "channels_first":
            features = np.moveaxis(features, 1, -1)
        return sep.pointwise_kernel, sep.bias if sep.use_bias else None, features.reshape(-1, features.shape[-1])
    import tensorflow as tf

    vertical, horizontal = sep.layers[-2], sep.layers[-1]
    inner = np.asarray(keras.ops.convert_to_numpy(vertical(x)), np.float32)
    if conv.data_format == "channels_first":
        inner = np.moveaxis(inner, 1, -1)
    patches = tf.image.extract_patches(inner, sizes=[1, 1, horizontal.kernel_size[1], 1],
                                       strides=[1, 1, horizontal.strides[1], 1],
                                       rates=[1, 1, horizontal.dilation_rate[1], 1], padding=conv.padding.upper())
    return (horizontal.kernel, horizontal.bias if horizontal.use_bias else None,
            np.asarray(patches, np.float64).reshape(-1, patches.shape[-1]))


def _relative(estimate: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - target) / max(np.linalg.norm(target), 1e-30))


@dataclass(frozen=True)
class BatchNormRecalibration:
    path: str
    mean_shift: float  # ||new - old moving mean|| / sqrt(mean old moving variance): how far the statistics moved
    variance_ratio: float  # mean new moving variance / mean old moving variance


def recalibrate_batchnorm(model, x: np.ndarray, progress=None) -> tuple[BatchNormRecalibration, ...]:
    """Re-estimate, in place, the moving mean and variance of `model`'s BatchNormalization layers on `x`, nested
    models included.

    After separation a BatchNorm layer's input statistics are no longer those it was trained on; its moving statistics
    are set, in graph order, to the mean and variance of its actual inputs (earlier layers already re-estimated), the
    way pruning and NAS tools recalibrate BatchNorm. The learned scale and offset are left as they are. Whether that
    helps is for the caller to measure (recovery.py keeps it only when the validation score does not fall).
    progress(message): a line per layer.
    """
    import keras


    if len(x) == 0:
        raise InvalidOptionError("BatchNorm recalibration needs images (x is empty)")
    done = []
    layers = {path: layer for path, layer in leaf_layers(model)
              if isinstance(layer, keras.layers.BatchNormalization) and called_once(model, path)}
    for number, (path, inputs) in enumerate(layer_inputs(model, x, list(layers)), 1):
        layer, inputs = layers[path], inputs.astype(np.float64)
        axis = layer.axis if layer.axis >= 0 else inputs.ndim + layer.axis
        reduce = tuple(i for i in range(inputs.ndim) if i != axis)
        mean, variance = inputs.mean(axis=reduce), inputs.var(axis=reduce)
        old_mean, old_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        layer.moving_mean.assign(mean.astype(old_mean.dtype))
        layer.moving_variance.assign(variance.astype(old_variance.dtype))
        scale = float(np.sqrt(max(np.mean(old_variance), 1e-12)))
        done.append(BatchNormRecalibration(path, float(np.linalg.norm(mean - old_mean) / scale / np.sqrt(len(mean))),
                                           float(np.mean(variance) / max(np.mean(old_variance), 1e-12))))
        if progress:
            progress(f"[{number}/{len(layers)}] {path}")
    return tuple(done)

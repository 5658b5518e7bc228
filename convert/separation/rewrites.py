"""Layer rewrites, registered per Keras layer class (the way tf2onnx registers op handlers).

A rewrite receives a built layer and the context of the walk and returns a `Plan`: the layer that replaces it, with
its weights, and the report row; or it raises `Keep(reason)` to leave the layer as it is. Supporting a new layer class
is one new registered function; the walk in `separation.py` does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

from sepconv.convert.keras_compat import calls_of
from sepconv.convert.separation import svd
from sepconv.convert.separation.policy import SPATIAL, Context
from sepconv.convert.separation.report import KEPT, SEPARATED, UNSUPPORTED, LayerRow

# Convolution-like layers: a row in the report whether or not a rewrite is registered for their class.
CONV_LIKE = (
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
)
ALREADY_SEPARABLE = (
    keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
)


@dataclass(frozen=True)
class Plan:
    """A decided rewrite: the replacement layer's class and config, its weights, and the report row."""

    row: LayerRow | None  # None: a layer the report does not list (not convolution-like)
    layer_class: type | None = None  # None: keep the layer (cloned with its own config and weights)
    config: dict | None = None
    weights: tuple[np.ndarray, ...] = ()

    def make_layer(self, original: keras.layers.Layer) -> keras.layers.Layer:
        if self.layer_class is None:
            return original.__class__.from_config(original.get_config())
        return self.layer_class.from_config(self.config)


class Keep(Exception):
    """Raised by a rewrite to keep its layer unchanged; carries the reason and the row's measured fields."""

    def __init__(self, reason: str, **fields):
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


Rewrite = Callable[[keras.layers.Layer, Context], Plan]
_REWRITES: dict[type, Rewrite] = {}


def register_rewrite(layer_class: type) -> Callable[[Rewrite], Rewrite]:
    """Register `fn(layer, context) -> Plan` for layers of exactly `layer_class` (subclasses are not matched)."""

    def decorator(fn: Rewrite) -> Rewrite:
        _REWRITES[layer_class] = fn
        return fn

    return decorator


def registered_rewrites() -> dict[type, Rewrite]:
    return dict(_REWRITES)


def plan_layer(layer: keras.layers.Layer, context: Context) -> Plan | None:
    """The plan for one leaf layer, or None for a layer that is neither rewritable nor convolution-like."""
    rewrite = _REWRITES.get(type(layer))
    if rewrite is not None:
        try:
            return rewrite(layer, context)
        except Keep as keep:
            return Plan(row=_row(layer, context, KEPT, keep.reason, **keep.fields))
    if isinstance(layer, ALREADY_SEPARABLE):
        return Plan(row=_row(layer, context, KEPT, "already depthwise/separable", macs_before=_separable_macs(layer)))
    if isinstance(layer, CONV_LIKE):
        return Plan(row=unsupported_row(layer, context.path, _unsupported_reason(layer)))
    return None


def unsupported_row(layer: keras.layers.Layer, path: str, reason: str) -> LayerRow:
    params = layer.count_params() if layer.built else 0
    return LayerRow(path=path, layer_class=type(layer).__name__, status=UNSUPPORTED, reason=reason,
                    params_before=params, params_after=params)


def _unsupported_reason(layer) -> str:
    for base in _REWRITES:
        if isinstance(layer, base):
            return (f"subclass of {base.__name__} (its call may differ); no rewrite registered for "
                    f"{type(layer).__name__}")
    return f"no rewrite registered for {type(layer).__name__}"


def _row(layer, context: Context, status: str, reason: str | None, **fields) -> LayerRow:
    params = layer.count_params()
    fields.setdefault("params_before", params)
    fields.setdefault("params_after", params)
    if "macs_before" in fields:
        fields.setdefault("macs_after", fields["macs_before"])
    return LayerRow(path=context.path, layer_class=type(layer).__name__, status=status, reason=reason, **fields)


def _separable_macs(layer) -> int | None:
    """Multiply-accumulates per sample of a DepthwiseConv2D or SeparableConv2D (None for other kinds or unknown
    sizes), so that the model's MAC totals count the layers that are already separable."""
    if not isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)) or not layer.built:
        return None
    pixels = output_pixels(layer, layer.data_format)
    if pixels is None:
        return None
    (kh, kw), multiplier = layer.kernel_size, layer.depth_multiplier
    cin = layer.depthwise_kernel.shape[2] if isinstance(layer, keras.layers.SeparableConv2D) else layer.kernel.shape[2]
    macs = kh * kw * cin * multiplier
    if isinstance(layer, keras.layers.SeparableConv2D):
        macs += cin * multiplier * layer.filters
    return pixels * macs


def output_pixels(layer: keras.layers.Layer, data_format: str) -> int | None:
    """Output spatial positions per sample, summed over every call of the layer; None if any size is unknown."""
    total = 0
    for node in calls_of(layer):
        shape = node.outputs[0].shape
        spatial = shape[2:] if data_format == "channels_first" else shape[1:-1]
        if any(dim is None for dim in spatial):
            return None
        total += int(np.prod(spatial))
    return total


@register_rewrite(keras.layers.Conv2D)
def separate_conv2d(layer: keras.layers.Conv2D, context: Context) -> Plan:
    """Conv2D -> SeparableConv2D(depth_multiplier=K), weights from the per-input-channel SVD of the kernel."""
    config = layer.get_config()
    kernel = layer.kernel.numpy()
    kh, kw, cin_per_group, cout = kernel.shape
    groups = config.get("groups", 1)
    cin = cin_per_group * groups
    pixels = output_pixels(layer, config["data_format"])
    macs = None if pixels is None else pixels * kh * kw * cin_per_group * cout
    known = dict(kernel=(kh, kw), in_channels=cin, out_channels=cout, macs_before=macs)
    if groups > 1:
        raise Keep(f"grouped convolution (groups={groups})", **known)
    if kh * kw == 1:
        raise Keep("1x1 kernel: already pointwise", **known)
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise Keep("LoRA-enabled or quantized layer", **known)
    user_reason = context.user_skip_reason(layer.name)
    if user_reason:
        raise Keep(user_reason, **known)
    if context.policy.rank == 0:
        raise Keep("kept as it is by the per-layer ranks (K=0; e.g. the accuracy budget's choice)", **known)
    if context.policy.form == SPATIAL:
        return _spatial_plan(layer, context, kernel, known)

    spectrum = svd.spectrum(kernel)
    rank = context.policy.choose(spectrum)
    bias = config["use_bias"] * cout
    params_after = kh * kw * cin * rank + cin * rank * cout + bias
    measured = dict(known, rank=rank, full_rank=spectrum.full_rank,
                    relative_error=spectrum.relative_error(rank), retained_energy=spectrum.retained_energy(rank))
    if context.only_if_smaller and params_after >= layer.count_params():
        raise Keep(f"separable cost >= original at K={rank} ({params_after:,} >= {layer.count_params():,} params)",
                   **known)

    depthwise, pointwise = svd.factorise(spectrum, rank)
    dtype = kernel.dtype
    weights = (depthwise.astype(dtype), pointwise.astype(dtype))
    if config["use_bias"]:
        weights += (layer.bias.numpy(),)
    row = LayerRow(
        path=context.path, layer_class=type(layer).__name__, status=SEPARATED, params_before=layer.count_params(),
        params_after=params_after, macs_after=None if pixels is None else pixels * (kh * kw * cin * rank + cin * rank * cout),
        **measured,
    )
    return Plan(row=row, layer_class=keras.layers.SeparableConv2D, config=_separable_config(config, rank),
                weights=weights)


def _spatial_plan(layer, context: Context, kernel: np.ndarray, known: dict) -> Plan:
    """Conv2D -> a kh x 1 Conv2D to r channels, then a 1 x kw Conv2D (SpatialPair), from the kernel's spatial SVD."""
    config = layer.get_config()
    kh, kw, cin, cout = kernel.shape
    if kh == 1 or kw == 1:
        raise Keep(f"{kh}x{kw} kernel: already separable in space", **known)
    spectrum = svd.spatial_spectrum(kernel)
    rank = context.policy.choose(spectrum)
    params_after = rank * (kh * cin + kw * cout) + config["use_bias"] * cout
    measured = dict(known, rank=rank, full_rank=spectrum.full_rank, form=SPATIAL,
                    relative_error=spectrum.relative_error(rank), retained_energy=spectrum.retained_energy(rank))
    if context.only_if_smaller and params_after >= layer.count_params():
        raise Keep(f"spatially separable cost >= original at r={rank} ({params_after:,} >= "
                   f"{layer.count_params():,} params)", **known)
    vertical, horizontal = svd.spatial_factorise(spectrum, rank)
    weights = (vertical.astype(kernel.dtype), horizontal.astype(kernel.dtype))
    if config["use_bias"]:
        weights += (layer.bias.numpy(),)
    row = LayerRow(path=context.path, layer_class=type(layer).__name__, status=SEPARATED,
                   params_before=layer.count_params(), params_after=params_after,
                   macs_after=_spatial_macs(layer, config["data_format"], rank), **measured)
    return Plan(row=row, layer_class=SpatialPair, config=dict(config, rank=rank, in_channels=cin), weights=weights)


def _spatial_macs(layer, data_format: str, rank: int) -> int | None:
    """Multiply-accumulates per sample of the spatial pair: the vertical half runs at the output's height and the
    input's width (it does not stride across), the horizontal half at the output's size."""
    (kh, kw), total = layer.kernel_size, 0
    for node in calls_of(layer):
        inputs, outputs = node.input_tensors[0].shape, node.outputs[0].shape
        if data_format == "channels_first":
            inputs, outputs = (inputs[0], *inputs[2:], inputs[1]), (outputs[0], *outputs[2:], outputs[1])
        (_, _, width, cin), (_, height, out_width, cout) = inputs, outputs
        if None in (width, height, out_width):
            return None
        total += height * width * kh * cin * rank + height * out_width * kw * rank * cout
    return total


class SpatialPair:
    """The spatially separable form of a Conv2D, as a nested Functional model named like the layer it replaces:
    `{name}_v`, a kh x 1 Conv2D to r channels (the vertical stride and dilation, no bias, no activation), then
    `{name}_h`, a 1 x kw Conv2D (the horizontal stride and dilation, the bias and activation). Padding is the
    layer's own in both: "same" pads each axis as the original does, as each half convolves along one axis only.
    Two plain Conv2D layers: every exporter, quantizer and weight-rounding step handles them, and a saved model
    loads without sepconv. A class only for `Plan`'s from_config protocol."""

    @staticmethod
    def from_config(config: dict):
        name, rank, (kh, kw) = config["name"], config["rank"], config["kernel_size"]
        (sh, sw), (dh, dw) = config["strides"], config["dilation_rate"]
        data_format, channels = config["data_format"], config["in_channels"]
        common = dict(padding=config["padding"], data_format=data_format, dtype=config["dtype"],
                      trainable=config["trainable"])
        shape = (channels, None, None) if data_format == "channels_first" else (None, None, channels)
        inputs = keras.Input(shape, name=f"{name}_input")
        vertical = keras.layers.Conv2D(rank, (kh, 1), strides=(sh, 1), dilation_rate=(dh, 1), use_bias=False,
                                       name=f"{name}_v", **common)(inputs)
        horizontal = keras.layers.Conv2D(
            config["filters"], (1, kw), strides=(1, sw), dilation_rate=(1, dw), activation=config["activation"],
            use_bias=config["use_bias"], kernel_initializer=config["kernel_initializer"],
            bias_initializer=config["bias_initializer"], kernel_regularizer=config["kernel_regularizer"],
            bias_regularizer=config["bias_regularizer"], activity_regularizer=config["activity_regularizer"],
            kernel_constraint=config["kernel_constraint"], bias_constraint=config["bias_constraint"],
            name=f"{name}_h", **common)(vertical)
        return keras.Model(inputs, horizontal, name=name)


def _separable_config(conv: dict, rank: int) -> dict:
    """SeparableConv2D config carrying every Conv2D option; kernel-wide settings go to the pointwise kernel."""
    return {
        "name": conv["name"],
        "trainable": conv["trainable"],
        "dtype": conv["dtype"],
        "filters": conv["filters"],
        "kernel_size": conv["kernel_size"],
        "strides": conv["strides"],
        "padding": conv["padding"],
        "data_format": conv["data_format"],
        "dilation_rate": conv["dilation_rate"],
        "depth_multiplier": rank,
        "activation": conv["activation"],
        "use_bias": conv["use_bias"],
        "pointwise_initializer": conv["kernel_initializer"],
        "bias_initializer": conv["bias_initializer"],
        "pointwise_regularizer": conv["kernel_regularizer"],
        "bias_regularizer": conv["bias_regularizer"],
        "activity_regularizer": conv["activity_regularizer"],
        "pointwise_constraint": conv["kernel_constraint"],
        "bias_constraint": conv["bias_constraint"],
    }

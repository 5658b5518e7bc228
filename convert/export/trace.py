"""The Keras model as a frozen TensorFlow function: the one graph both exporters translate.

Freezing inlines variables and the tensors layers capture (e.g. Normalization statistics), so converters see
constants, never unfed inputs. The batch dimension is left dynamic; inputs keep the Keras input layers' names.
"""

from __future__ import annotations

import re
import weakref
import zlib
from dataclasses import dataclass, field

from sepconv.convert.keras_compat import freeze, producer_name, sublayers


def input_names(model) -> list[str]:
    return [producer_name(tensor) for tensor in model.inputs]


@dataclass
class _Kept:
    """What frozen_function keeps of a model while the model lives."""
    frozen: dict = field(default_factory=dict)  # forms -> {fingerprint of its weights: frozen function}, oldest first
    traced: tuple | None = None  # (its variables' identities, its traced function), in the standard forms
    count: int = 1  # how many weight sets' frozen functions are kept (per form)


_KEPT = weakref.WeakKeyDictionary()  # model -> _Kept


def keep_frozen(model, count: int) -> None:
    """Keep the frozen functions of `model`'s last `count` weight sets (in each form), not only its current one's:
    for a model that switches between a few sets of weights (the int8 repair's copy, which holds one rounded variant
    after another), each set is frozen once. Each kept function holds a copy of the weights."""
    _KEPT.setdefault(model, _Kept()).count = count


def frozen_function(model, forms=()):
    """A ConcreteFunction computing `model(inputs, training=False)` with every variable folded into a constant.

    Every export of a run (TFLite and ONNX, each int8 attempt) translates this one graph: it is traced and frozen
    once per model and kept while the model lives and its weights stay as they were (a checksum of every weight is
    compared on each call; tracing and freezing a ResNet50 takes far longer than reading its weights). When the
    weights changed, the model's trace (which reads its variables) is frozen again, not traced again (the int8
    repair's rounded variants share one copy of the model); a model in other forms is rebuilt with its weights,
    and so traced again.
    forms: separable layers to trace in another equivalent form ((path, form) pairs: forms.with_forms)."""
    from sepconv.convert.export.forms import normalized, with_forms

    fingerprint, key = _weights_fingerprint(model), normalized(forms)
    cache = _KEPT.setdefault(model, _Kept())
    kept = cache.frozen.setdefault(key, {})
    if fingerprint in kept:
        return kept[fingerprint]
    import tensorflow as tf

    variables = tuple(identity for identity, _ in fingerprint)
    known = cache.traced if not key else None
    traced = known[1] if known is not None and known[0] == variables else None  # a replaced variable: trace again
    if traced is None:
        rebuilt = with_forms(model, key)
        specs = tuple(tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name)
                      for t, name in zip(model.inputs, input_names(model)))
        # weakly: the trace kept in _KEPT must not keep its own key (the model) alive
        call = weakref.ref(rebuilt) if rebuilt is model else (lambda: rebuilt)

        def forward(*inputs):
            return call()(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

        traced = tf.function(forward, input_signature=specs).get_concrete_function()
        if not key:
            cache.traced = (variables, traced)
    frozen = freeze(traced)
    while len(kept) >= cache.count:
        del kept[next(iter(kept))]  # the oldest weight set's
    kept[fingerprint] = frozen
    return frozen


def _weights_fingerprint(model) -> tuple:
    """(variable identities, a CRC-32 of each variable's bytes): changes when any weight is set or trained."""
    import numpy as np

    return tuple((id(v), zlib.crc32(np.ascontiguousarray(v.numpy()).view(np.uint8))) for v in model.weights)


def layers_in_scopes(node_names, model) -> list[str]:
    """The model's layers named by a scope of these graph node names ('model_1/conv_2/Conv2D' -> conv)."""
    scopes = {re.sub(r"_\d+$", "", part) for name in node_names for part in name.split("/")}
    return sorted({layer.name for layer in sublayers(model) if layer.name in scopes})

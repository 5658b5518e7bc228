"""The Keras model as a frozen TensorFlow function: the one graph both exporters translate.

Freezing inlines variables and the tensors layers capture (e.g. Normalization statistics), so converters see
constants, never unfed inputs. The batch dimension is left dynamic; inputs keep the Keras input layers' names.
"""

from __future__ import annotations

import re


def input_names(model) -> list[str]:
    return [tensor._keras_history.operation.name for tensor in model.inputs]


def frozen_function(model):
    """A ConcreteFunction computing `model(inputs, training=False)` with every variable folded into a constant."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    specs = tuple(tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name)
                  for t, name in zip(model.inputs, input_names(model)))

    def forward(*inputs):
        return model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

    return convert_variables_to_constants_v2(tf.function(forward, input_signature=specs).get_concrete_function())


def layers_in_scopes(node_names, model) -> list[str]:
    """The model's layers named by a scope of these graph node names ('model_1/conv_2/Conv2D' -> conv)."""
    scopes = {re.sub(r"_\d+$", "", part) for name in node_names for part in name.split("/")}
    return sorted({layer.name for layer in model._flatten_layers(include_self=False) if layer.name in scopes})

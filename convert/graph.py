"""Running and walking a Keras model: its leaf layers and the layer at a path (through nested models), which layers
are called once, what each layer receives when the model runs (one pass, layer by layer), and batched prediction
that keeps a forward pass within a memory budget. Shared by separation, recovery and export; no sepconv stage below
it. Keras loads on first use: importing this module stays light."""

from __future__ import annotations

import collections
import itertools
from typing import TYPE_CHECKING

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.keras_compat import call_arguments, graph_nodes, graph_of, is_graph_model, takes_training

if TYPE_CHECKING:
    import keras


def leaf_layers(model: keras.Model, prefix: str = ""):
    """(path, layer) for every layer below `model` in graph order, descending into nested Functional/Sequential
    models ("backbone/block_1_conv")."""
    for layer in model.layers:
        path = prefix + layer.name
        if is_graph_model(layer):
            yield from leaf_layers(layer, prefix=path + "/")
        else:
            yield path, layer


def layer_at(model, path: str):
    """The layer at `path` ("backbone/block_1_conv": names of nested models, then the layer's)."""
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


def called_once(model, path: str) -> bool:
    """True when the layer at `path` and every nested model on the way to it are called exactly once in their parent's
    graph, so that its input is one tensor."""
    parent = model
    for name in path.split("/"):
        layer = parent.get_layer(name)
        if len(_calls(parent, layer)) != 1:
            return False
        parent = layer
    return True


def layer_output(model, name: str):
    """The symbolic output of the top-level layer `name` where `model`'s graph calls it (once; a nested model's own
    `output` is its inner graph's, not the tensor its parent computes)."""
    layer = model.get_layer(name)
    calls = _calls(model, layer)
    if len(calls) != 1:
        raise InvalidOptionError(f"{name}: is called {len(calls)} times in {model.name!r}; only a layer called once "
                                 f"has one output")
    return calls[0].outputs[0]


def _calls(model, layer) -> list:
    """The nodes of `model`'s graph where `layer` is called."""
    return [node for node in graph_nodes(model) or () if node.operation is layer]


def layer_input(model, path: str, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    """What the layer at `path` receives when `model` is fed `x` (inference mode), through nested models: the input
    of each nested model on the path is computed in its parent's graph, then fed to the nested model's own graph.
    batch: samples per forward pass (default: what keeps the probe within ACTIVATION_BUDGET)."""
    import keras

    head, _, rest = path.partition("/")
    layer = model.get_layer(head)
    calls = _calls(model, layer)
    if len(calls) != 1 or len(calls[0].input_tensors) != 1:
        raise InvalidOptionError(f"{path}: is called {len(calls)} times or takes several inputs; only layers and "
                                 f"nested models called once on one input can be probed")
    probe = keras.Model(graph_of(model).inputs, calls[0].input_tensors[0])
    step = batch or batch_size_for(probe)
    value = np.concatenate([keras.ops.convert_to_numpy(probe(x[i:i + step], training=False))
                            for i in range(0, len(x), step)])
    return layer_input(layer, rest, value, batch) if rest else value


def layer_inputs(model, x: np.ndarray, paths: list[str]):
    """Yield (path, what the layer at `path` receives when `model` is fed `x`), for each of `paths` (layers called
    once, as `called_once` says), in graph order: the model runs once, layer by layer, and each of these layers runs
    only when the caller asks for the next one, so weights the caller set meanwhile are used from there on.

    One forward pass for every layer where `layer_input` makes one per layer, whose cost grows with the square of the
    depth (ResNet50's refinement and BatchNorm recalibration took 6 minutes, docs/benchmarks.md). Each graph
    operation runs on all of `x` at once; a value is dropped when its last consumer has run; the walk ends with the
    last of `paths`."""
    import keras

    if paths:  # the walk stops at the last of them: what follows it is not needed
        yield from itertools.islice(_walk(model, [keras.ops.convert_to_tensor(np.asarray(x))], set(paths), ""),
                                    len(set(paths)))


def _walk(model, inputs: list, paths: set, prefix: str):
    """Run `model`'s graph on `inputs`, yielding the inputs of its layers in `paths`; return its outputs."""
    import keras

    graph = graph_of(model)
    values = {id(tensor): value for tensor, value in zip(graph.inputs, inputs)}
    nodes = [node for node in graph_nodes(model) if node.operation is not None and not node.is_input]
    users = collections.Counter(id(t) for node in nodes for t in node.input_tensors)
    users.update(id(t) for t in graph.outputs)
    for node in nodes:
        operation, path = node.operation, prefix + node.operation.name
        args, kwargs = call_arguments(node, values)
        if path in paths:
            yield path, keras.ops.convert_to_numpy(args[0])
        inner = {p for p in paths if p.startswith(path + "/")}
        if inner:  # a nested model called once: walk its own graph
            outputs = yield from _walk(operation, keras.tree.flatten(args), inner, path + "/")
        else:
            if takes_training(operation):
                kwargs["training"] = False
            outputs = keras.tree.flatten(operation(*args, **kwargs))
        for tensor, value in zip(node.outputs, outputs):
            values[id(tensor)] = value
        for tensor in node.input_tensors:
            users[id(tensor)] -= 1
            if not users[id(tensor)]:
                values.pop(id(tensor), None)
    return [values[id(tensor)] for tensor in graph.outputs]


MAX_BATCH = 64


# Bytes of layer outputs one forward batch may hold. Keras runs a Functional model eagerly, layer by layer, and keeps
# every layer's output until the call returns: ResNet50 at 224x224 holds 142 MiB per sample, so a batch of 64 took
# 9 GiB (docs/benchmarks.md, scripts/bench-scale). Small models still run 64 samples at a time.
ACTIVATION_BUDGET = 512 << 20


def batch_size_for(model, limit: int = MAX_BATCH) -> int:
    """The largest batch, up to `limit`, whose layer outputs fit ACTIVATION_BUDGET; `limit` when the model's layer
    shapes are not all known (a free spatial size)."""
    per_sample = activation_bytes(model)
    return limit if not per_sample else max(1, min(limit, ACTIVATION_BUDGET // per_sample))


def activation_bytes(model) -> int | None:
    """Bytes of every layer output of one sample in a forward pass of a Functional or Sequential `model` (nested
    models included); None when a shape besides the batch is unknown or the model is not a graph of layers."""
    import math

    import keras

    nodes = graph_nodes(model)
    if not nodes:
        return None
    total = 0
    for node in nodes:
        for tensor in node.outputs:
            if any(d is None for d in tensor.shape[1:]):
                return None
            total += math.prod(tensor.shape[1:]) * np.dtype(tensor.dtype).itemsize
        if isinstance(node.operation, keras.Model) and node.operation is not model:
            inner = activation_bytes(node.operation)
            if inner is None:
                return None
            total += inner
    return total


def predict_keras(model, x: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
    """The Keras model's outputs, as a list of float32 arrays, computed in batches without retracing noise (default
    batch: `batch_size_for(model)`, so that a large model's forward pass stays within ACTIVATION_BUDGET)."""
    import keras

    def run(batch):
        result = model(batch, training=False)
        return [np.asarray(keras.ops.convert_to_numpy(r), np.float32) for r in keras.tree.flatten(result)]

    return batched(run, x, batch_size or batch_size_for(model))


def batched(run, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`run` (batch -> list of output arrays) over `x` in batches, each output concatenated."""
    chunks = [run(x[start:start + batch_size]) for start in range(0, len(x), batch_size)]
    return [np.concatenate([chunk[k] for chunk in chunks]) for k in range(len(chunks[0]))]

"""Every use of Keras' and TensorFlow's private API, in one place.

Keras 3 has no public way to walk a model's graph (which node calls which layer, a tensor's producer, the layers
nested anywhere inside a layer), to lift safe mode for a block of code, or to fold a function's variables into
constants, and TensorFlow none to average a tensor over the workers of a cluster outside a strategy's own training
step; sepconv needs all of these. When a Keras or TensorFlow release moves one, this is the file to mend:
tests/test_keras_compat.py exercises each function on the installed versions. Keras and TensorFlow are imported
inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

from sepconv.convert.errors import ExportError


def graph_of(model):
    """The Functional graph of `model`: itself, or the one a Sequential keeps inside (a Sequential's layers' own node
    lists also hold nodes of earlier builds, so they cannot be trusted); None for a subclassed model."""
    import keras

    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    return graph if getattr(graph, "_nodes_by_depth", None) is not None else None


def graph_nodes(model) -> list | None:
    """Every node (one call of a layer) of `model`'s graph in an order that runs it (deepest first: inputs first,
    outputs last); None when it is not a graph of layers."""
    graph = graph_of(model)
    if graph is None:
        return None
    by_depth = graph._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def call_arguments(node, values: dict) -> tuple[list, dict]:
    """(args, kwargs) of the layer call `node` records, each symbolic tensor replaced by `values[id(tensor)]`."""
    return node.arguments.fill_in(values)


def takes_training(operation) -> bool:
    """Keras hands `operation`'s call its `training` context argument (Keras layers and models; not a bare keras.ops
    operation in a Functional graph)."""
    return "training" in getattr(operation, "_call_context_args", ())


def calls_of(layer) -> list:
    """The nodes where `layer` is called, in every graph it is part of."""
    return list(layer._inbound_nodes)


def readers_of(layer) -> list:
    """The layers (operations) that read `layer`'s outputs."""
    return [node.operation for node in layer._outbound_nodes]


def producer_name(tensor) -> str:
    """The name of the layer (or input layer) whose call produced a symbolic Keras tensor."""
    return tensor._keras_history.operation.name


def sublayers(layer) -> list:
    """Every layer nested inside `layer`, at any depth, not `layer` itself."""
    return list(layer._flatten_layers(include_self=False))


def is_graph_model(layer) -> bool:
    """A Functional or Sequential model: one whose layers and wiring Keras records as a graph."""
    import keras
    from keras.src.models.functional import Functional

    return isinstance(layer, (Functional, keras.Sequential))


@contextlib.contextmanager
def unsafe_deserialization():
    """Keras deserialization with safe mode off inside the block (a Lambda layer the user trusted may be rebuilt)."""
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(safe_mode=False):
        yield


def freeze(concrete_function):
    """`concrete_function` with every variable it reads folded into a constant."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(concrete_function)


def disable_per_channel(converter) -> None:
    """Per-tensor int8 weights from the TFLite converter (one scale per tensor: what some accelerators want). The
    converter has only a private switch for it; a release without it must fail here, not quantize per channel
    silently."""
    if not hasattr(converter, "_experimental_disable_per_channel"):
        raise ExportError("This TensorFlow's TFLite converter has no per-tensor switch; use per_channel=True (drop "
                          "--per-tensor) or TensorFlow 2.16-2.21")
    converter._experimental_disable_per_channel = True


def keras_archive(model) -> bytes:
    """The model's .keras archive, made in memory. Keras' public save takes only a path and writes the archive there
    while working in tempfile.mkdtemp() folders, which a failed write (a full disk) leaves behind; its saving library
    takes a file object."""
    import io

    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    saving_lib.save_model(model, buffer)
    return buffer.getvalue()


def atomic_backup_and_restore(backup_dir: str, before_save: Callable[[object], None]):
    """Keras' BackupAndRestore callback (a checkpoint every epoch, deleted when training ends), but each file is
    written under a temporary name and renamed into place, so a run killed (or out of disk space) in the middle of a
    save leaves the previous checkpoint whole for --resume; `before_save(model)` runs first (it may refuse, e.g. when
    the disk cannot hold the checkpoint). Keras has no public hook for where the files are written: this overrides
    the callback's private _save_model and its private file paths."""
    return _atomic_backup_class()(backup_dir, save_freq="epoch", delete_checkpoint=True, before_save=before_save)


@functools.cache
def _atomic_backup_class():
    import os

    import keras

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def __init__(self, *args, before_save, **kwargs):
            super().__init__(*args, **kwargs)
            self._before_save = before_save

        def _save_model(self):
            self._before_save(self.model)
            final = self._weights_path, self._training_metadata_path
            partial = (final[0].removesuffix(".weights.h5") + ".partial.weights.h5", final[1] + ".partial")
            self._weights_path, self._training_metadata_path = partial
            try:
                super()._save_model()
                for written, name in zip(partial, final):
                    os.replace(written, name)
            finally:
                self._weights_path, self._training_metadata_path = final
                for written in partial:
                    if os.path.exists(written):
                        os.remove(written)

    return AtomicBackupAndRestore



def all_reduce(tensors, *, workers: int, group: int, first_key: int, op: str = "Add", final: str = "Div",
               timeout: float = 0.0) -> list:
    """Each tensor combined over the `workers` of a cluster whose collective ops MultiWorkerMirroredStrategy has
    configured: TensorFlow's CollectiveReduceV2 (the op that strategy itself all-reduces with), `op` "Add" then
    `final` "Div" (the mean) or "Max" then "Id" (the largest). Every worker must make the same calls in the same order;
    each call site its own instance keys (first_key + i for the i-th tensor); timeout: seconds to wait for the others
    (0: forever). Works inside a tf.function (an optimizer's apply) as in eager code."""
    from tensorflow.python.ops import collective_ops

    return [collective_ops.all_reduce_v2(t, group_size=workers, group_key=group, instance_key=first_key + i,
                                         merge_op=op, final_op=final, timeout=timeout)
            for i, t in enumerate(tensors)]

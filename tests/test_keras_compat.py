"""Each private Keras/TensorFlow API sepconv uses (sepconv.convert.keras_compat), on the installed versions: a Keras
or TensorFlow release that moves one fails here, by name, rather than deep inside a conversion."""

import keras
import numpy as np
import pytest

from sepconv.convert import keras_compat
from sepconv.convert.errors import ExportError


def _functional():
    inputs = keras.Input((8, 8, 3), name="pixels")
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    norm = keras.layers.BatchNormalization(name="norm")(conv)
    inner = keras.Sequential([keras.Input((6, 6, 4), name="inner_input"), keras.layers.Conv2D(2, 1, name="inner_conv")],
                             name="inner")
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(inner(norm)), name="outer")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_the_graph_walk():
    model = _functional()
    nodes = keras_compat.graph_nodes(model)
    assert {node.operation.name for node in nodes} == {"pixels", "conv", "norm", "inner", "pool"}
    sequential = model.get_layer("inner")
    assert keras_compat.graph_of(sequential) is not None, "a Sequential's graph is the Functional it keeps inside"
    assert {node.operation.name for node in keras_compat.graph_nodes(sequential)} == {"inner_input", "inner_conv"}
    assert keras_compat.graph_of(_Subclassed()) is None and keras_compat.graph_nodes(_Subclassed()) is None
    assert len(keras_compat.calls_of(model.get_layer("conv"))) == 1
    assert [layer.name for layer in keras_compat.readers_of(model.get_layer("conv"))] == ["norm"]
    assert keras_compat.producer_name(model.inputs[0]) == "pixels"
    assert keras_compat.producer_name(model.outputs[0]) == "pool"
    assert {layer.name for layer in keras_compat.sublayers(model)} >= {"conv", "norm", "inner", "inner_conv", "pool"}
    assert keras_compat.is_graph_model(model) and keras_compat.is_graph_model(sequential)
    assert not keras_compat.is_graph_model(model.get_layer("conv")) and not keras_compat.is_graph_model(_Subclassed())
    order = [node.operation.name for node in nodes]
    assert order.index("pixels") < order.index("conv") < order.index("norm") < order.index("inner") < \
        order.index("pool"), f"graph_nodes runs the graph in order: {order}"
    conv_call = next(node for node in nodes if node.operation.name == "conv")
    value = np.ones((1, 8, 8, 3), np.float32)
    args, kwargs = keras_compat.call_arguments(conv_call, {id(model.inputs[0]): value})
    assert args[0] is value and kwargs == {}, "the call's symbolic input replaced by the value given for it"
    assert keras_compat.takes_training(model.get_layer("norm")) and keras_compat.takes_training(sequential)
    assert not keras_compat.takes_training(keras.ops.add), "a bare operation has no training argument"


def test_unsafe_deserialization_lifts_safe_mode_inside_the_block_only(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ValueError, match="(?i)lambda"):
        keras.models.load_model(path)  # safe mode refuses to rebuild the Lambda's Python code
    with keras_compat.unsafe_deserialization():
        loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(np.ones((1, 3), np.float32)), [[2.0, 2.0, 2.0]], err_msg="the Lambda rebuilt")
    with pytest.raises(ValueError, match="(?i)lambda"):
        keras.models.load_model(path)


def test_freeze_folds_variables_into_constants():
    import tensorflow as tf

    variable = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    frozen = keras_compat.freeze(tf.function(lambda x: tf.matmul(x, variable),
                                             input_signature=[tf.TensorSpec((None, 2))]).get_concrete_function())
    ops = {node.op for node in frozen.graph.as_graph_def().node}
    assert "ReadVariableOp" not in ops and "Const" in ops, ops
    variable.assign([[0.0, 0.0], [0.0, 0.0]])  # the frozen function keeps the values it was given
    np.testing.assert_allclose(frozen(tf.constant([[1.0, 1.0]]))[0], [[4.0, 6.0]], err_msg="the folded weights")


def test_disable_per_channel_sets_the_converters_switch():
    """The TFLite converter's private per-tensor switch exists on the installed TensorFlow and is set; a converter
    without it is refused rather than quantized per channel silently."""
    import tensorflow as tf

    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3)])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    assert getattr(converter, "_experimental_disable_per_channel", None) is False, "the switch moved: mend keras_compat"
    keras_compat.disable_per_channel(converter)
    assert converter._experimental_disable_per_channel is True
    with pytest.raises(ExportError, match="no per-tensor switch"):
        keras_compat.disable_per_channel(object())


def test_keras_archive_is_the_models_keras_file(tmp_path):
    """The archive made in memory loads back as the same model (Keras' saving library still takes a file object)."""
    model = _functional()
    path = tmp_path / "m.keras"
    path.write_bytes(keras_compat.keras_archive(model))
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).random((2, *model.input_shape[1:]), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6,
                               err_msg="the .keras archive made in memory must give the saved model back")



def test_atomic_backup_and_restore_writes_whole_checkpoints(tmp_path):
    """The callback runs before_save, then leaves Keras' checkpoint files under their own names after each epoch (no
    .partial file); it relies on BackupAndRestore's private _save_model and file paths, which this pins."""
    assert hasattr(keras.callbacks.BackupAndRestore, "_save_model"), "the private hook moved: mend keras_compat"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    saved, seen = [], []
    backup = keras_compat.atomic_backup_and_restore(str(tmp_path / "ckpt"), before_save=saved.append)

    class Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(sorted(p.name for p in (tmp_path / "ckpt").iterdir()))

    x = np.zeros((8, 4), np.float32)
    model.fit(x, np.zeros((8, 2), np.float32), epochs=2, verbose=0, callbacks=[backup, Look()])
    assert saved == [model, model], "before_save runs once per epoch, on the model"
    assert len(seen) == 2 and all(names and not any("partial" in n for n in names) for names in seen), seen
    assert all(any(n.endswith(".weights.h5") for n in names) for names in seen), seen


def test_all_reduce_runs_tensorflows_collective_op_in_a_group_of_one():
    """The op MultiWorkerMirroredStrategy all-reduces with, here in a group of one worker (the two-worker run is
    tests/test_streaming.py's): the mean and the largest of one tensor are itself, eagerly and in a tf.function."""
    import tensorflow as tf

    from sepconv.convert.keras_compat import all_reduce

    value = tf.constant([1.5, -2.0])
    mean, = all_reduce([value], workers=1, group=11, first_key=1)
    np.testing.assert_allclose(mean.numpy(), [1.5, -2.0], err_msg="the mean of one")
    largest = tf.function(lambda t: all_reduce([t], workers=1, group=11, first_key=2, op="Max", final="Id")[0])
    np.testing.assert_allclose(largest(value).numpy(), [1.5, -2.0], err_msg="the largest of one, in a tf.function")

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from sepconv.convert import separate

from sepconv.convert.demo import digits as demo
from sepconv.convert.errors import CheckpointError, InvalidOptionError
from sepconv.convert.recovery.finetuning import FinetuneOptions, finetune
from sepconv.convert.graph import predict_keras


def teacher_and_data(seed=0, n=384):
    """A small random CNN defines the task; its own predictions are the labels."""
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu", name="c1")(x_in)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="c2")(x)
    teacher = keras.Model(x_in, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(x)))
    images = np.random.default_rng(seed).uniform(0, 1, (n, 12, 12, 3)).astype(np.float32)
    return teacher, images, np.argmax(predict_keras(teacher, images)[0], 1)


def agreement(a, b, x):
    return float(np.mean(np.argmax(predict_keras(a, x)[0], 1) == np.argmax(predict_keras(b, x)[0], 1)))


@pytest.mark.parametrize("with_labels, form", [(True, "depthwise"), (False, "depthwise"), (False, "spatial")],
                         ids=["labels", "distillation", "distillation, spatial form"])
def test_finetuning_improves_agreement(with_labels, form):
    teacher, x, y = teacher_and_data()
    student, _ = separate(teacher, rank=1, form=form)
    held_out = np.random.default_rng(9).uniform(0, 1, (256, 12, 12, 3)).astype(np.float32)
    before = agreement(student, teacher, held_out)
    features = dict(feature_weight=0.1) if form == "spatial" else {}  # matches the pairs' outputs to the Conv2Ds'
    result = finetune(student, teacher, x, y if with_labels else None, epochs=6, verbose=0, patience=6, **features)
    after = agreement(student, teacher, held_out)
    assert after > before + 0.05, f"agreement {before:.2%} -> {after:.2%}"
    assert result.mode == ("labels+distillation" if with_labels else "distillation")
    assert result.monitor == ("val_accuracy" if with_labels else "val_agreement")
    assert len(result.history["loss"]) == result.epochs_run and 1 <= result.best_epoch <= result.epochs_run
    assert result.history[result.monitor][result.best_epoch - 1] == pytest.approx(result.best_value)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, after_epoch):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt


class FirstEpoch(keras.callbacks.Callback):
    first = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first is None:
            self.first = epoch


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    teacher, x, y = teacher_and_data(n=128)
    student, _ = separate(teacher, rank=1)
    backup = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        finetune(student, teacher, x, y, epochs=4, patience=4, verbose=0, checkpoint_dir=str(backup),
                 callbacks=[Interrupt(after_epoch=1)])
    assert backup.exists() and any(backup.iterdir()), "finished epochs must be saved"
    saved = sorted(path.name for path in backup.rglob("*"))
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run: pass resume=True"):
        finetune(student, teacher, x, y, epochs=4, patience=4, verbose=0, checkpoint_dir=str(backup))
    assert sorted(path.name for path in backup.rglob("*")) == saved, "without resume, the checkpoints are kept"
    seen = FirstEpoch()
    result = finetune(student, teacher, x, y, epochs=4, patience=4, verbose=0, checkpoint_dir=str(backup),
                      resume=True, callbacks=[seen])
    assert seen.first == 2, f"resumed at epoch index {seen.first}, expected 2 (after the two finished epochs)"
    assert not backup.exists() or not any(backup.iterdir()), "a finished run removes its checkpoints"
    assert result.epochs_run == 4, "epochs_run counts the interrupted run's epochs too"
    assert len(result.history["loss"]) == 2, "the history of the resumed run covers the remaining epochs"


def test_two_logical_devices_train_mirrored(tmp_path):
    """Fine-tuning on two logical CPU devices (MirroredStrategy), in a child with the environment convert-model's
    worker has (supervise.safe_environment: oneDNN off on x86): with oneDNN on, TensorFlow 2.21 killed this child with
    SIGSEGV once in a fresh-clone suite (2026-12-07, Intel Xeon; docs/benchmarks.md), the native crash supervise.py
    guards the command against."""
    from sepconv.convert.supervise import safe_environment

    script = textwrap.dedent("""
        import os, sys
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path.insert(0, sys.argv[1])
        from test_finetuning import agreement, teacher_and_data
        from sepconv.convert import separate
        from sepconv.convert.recovery.finetuning import finetune
        teacher, x, y = teacher_and_data()
        student, _ = separate(teacher, rank=1)
        before = agreement(student, teacher, x)
        result = finetune(student, teacher, x, y, epochs=4, verbose=0, patience=4)
        print(result.strategy, result.devices, before < agreement(student, teacher, x))
    """)
    import os

    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], capture_output=True, text=True,
                          timeout=600, env=safe_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "mirrored 2 True"


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs=0"), (dict(temperature=0), "temperature=0"), (dict(label_weight=2), "label_weight=2"),
    (dict(validation_split=1.0), "validation_split"), (dict(strategy="tpu"), "strategy='tpu'"),
    (dict(resume=True), "checkpoint_dir"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        FinetuneOptions(**kwargs)


@pytest.mark.slow
def test_finetuning_recovers_trained_digits_at_k1(trained_demo, digits):
    original = trained_demo["model"]
    student, _ = separate(original, rank=1)
    before = demo.accuracy(student, digits.x_test, digits.y_test)
    finetune(student, original, digits.x_train, digits.y_train, epochs=3, verbose=0)
    after = demo.accuracy(student, digits.x_test, digits.y_test)
    assert after > before + 0.3, f"K=1 test accuracy {before:.2%} -> {after:.2%} after 3 epochs"


def test_frozen_batchnorm_keeps_its_statistics_while_the_rest_trains():
    """freeze_batchnorm: BatchNorm runs on its moving statistics during training, which stay as they were (as do gamma
    and beta); the convolutions train. Without it, the moving statistics move."""
    teacher, x, y = teacher_and_data(n=128)
    keras.utils.set_random_seed(3)
    x_in = keras.Input((12, 12, 3))
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(8, 3, name="c1")(x_in))
    student = keras.Model(x_in, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(
        keras.layers.ReLU()(h))))
    for freeze in (True, False):
        trained = keras.models.clone_model(student)
        trained.set_weights(student.get_weights())
        finetune(trained, teacher, x, y, epochs=2, verbose=0, patience=2, learning_rate=0.01, freeze_batchnorm=freeze)
        bn_same = [np.array_equal(a, b) for a, b in zip(trained.get_layer("bn").get_weights(),
                                                         student.get_layer("bn").get_weights())]
        assert not np.array_equal(trained.get_layer("c1").get_weights()[0], student.get_layer("c1").get_weights()[0])
        assert all(bn_same) if freeze else not all(bn_same), (freeze, bn_same)


def test_an_error_that_follows_a_ctrl_c_during_training_is_the_ctrl_c():
    """A Ctrl-C during training is held to the next batch's end; an error raised before it (in multi-worker training:
    the collective op of a peer that stopped first) is reported as the interrupt it follows, not as a crash. Without
    a Ctrl-C the error passes unchanged."""
    import os
    import signal

    from sepconv.convert.recovery.finetuning import _ctrl_c_between_batches

    with pytest.raises(KeyboardInterrupt) as caught:
        with _ctrl_c_between_batches():
            os.kill(os.getpid(), signal.SIGINT)  # held: the handler only records it
            raise RuntimeError("a peer is gone")
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="a peer is gone"):
        with _ctrl_c_between_batches():
            raise RuntimeError("a peer is gone")


def test_a_collective_error_names_its_cause_in_one_line():
    import tensorflow as tf

    from sepconv.convert.recovery.finetuning import WorkerRole, _peers_reported
    from sepconv.convert.errors import WorkerLostError

    message = ("Graph execution error:\n\nDetected at node CollectiveReduceV2 defined at (most recent call last):\n"
               '  File "x.py", line 1, in <module>\n\nCollective ops is aborted by: failed to connect to all '
               "addresses; last error: UNKNOWN: ipv4:127.0.0.1:35565: Failed to connect to remote host: Connection "
               "refused\nThe error could be from a previous operation. Restart your program to reset.\n\t "
               "[[{{node CollectiveReduceV2}}]]")
    with pytest.raises(WorkerLostError) as caught:
        with _peers_reported(WorkerRole(index=1, workers=2, chief=False), None):
            raise tf.errors.UnavailableError(None, None, message)
    text = str(caught.value)
    assert "\n" not in text and "on worker 1: another worker ended or cannot be reached" in text, text
    assert "(UnavailableError: Collective ops is aborted by: failed to connect" in text, text
    assert text.endswith("start every worker again with the same command"), text
    with pytest.raises(tf.errors.UnavailableError):  # one process, no cluster: TensorFlow's own error
        with _peers_reported(None, None):
            raise tf.errors.UnavailableError(None, None, message)

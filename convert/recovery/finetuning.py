"""Recover accuracy by training the separated model: labels (cross-entropy), distillation from the original model
(the teacher), or both mixed; early stopping on validation accuracy (or teacher agreement without labels), the best
weights restored, per-epoch checkpoints that an interrupted run resumes from, and tf.distribute on request.

The teacher's outputs are computed once and packed with the labels into the training targets, so training is a plain
`model.fit` (progress bar, callbacks and strategies work as usual). Distillation softens the teacher's and the
student's class probabilities with a temperature T: for a softmax output p = softmax(z), softmax(z / T) equals
p^(1/T) renormalised, so models that end in a softmax need no logits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sepconv.convert.errors import CheckpointError, DataError, DiskFullError, InvalidOptionError, WorkerLostError
from sepconv.convert.files import disk_full
from sepconv.convert.graph import layer_output, leaf_layers, predict_keras
from sepconv.convert.keras_compat import all_reduce, atomic_backup_and_restore, is_graph_model
from sepconv.convert.recovery.quantization_noise import noise_points, noisy_copy
from sepconv.deploy.files import first_line
from sepconv.deploy.errors import RECEIVED, TERMINATING, Terminated

STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
MULTI_WORKER = "multi-worker"
DEFAULT_LEARNING_RATE = 1e-3
# With int8 rounding noise: a third, as quantization-aware fine-tuning is run below the float rate. Measured on the
# zoo's rescaling CNN at K=1 with the noise from the start of fine-tuning (docs/benchmarks.md): at 1e-3 the noisy
# validation peaked after one epoch and the int8 artifact failed on test (96.44%); at 3e-4 it passed (98.67%).
NOISE_LEARNING_RATE = 3e-4
# For tests only (docs/finetune.md): seconds each epoch waits after its checkpoint and progress line, so that a test can
# interrupt a run that is, by construction, still fine-tuning.
EPOCH_DELAY = "SEPCONV_TEST_EPOCH_DELAY"


@dataclass(frozen=True)
class FinetuneOptions:
    """epochs: at most this many (early stopping may end sooner). learning_rate: Adam's peak, cosine-decayed to 0.
    temperature: distillation temperature T. label_weight: share of the label loss when labels exist (the rest is
    distillation); ignored without labels (pure distillation). validation_split: held out for early stopping.
    patience: epochs without improvement before stopping. checkpoint_dir: per-epoch backups (resume=True continues
    from the last one). strategy: auto (mirrored when several devices are visible), default, mirrored, or
    multi-worker (the hosts of TF_CONFIG: `multi_worker_strategy`; every worker runs the same command and trains on
    its own shard of every epoch, the gradients averaged over the workers at each step, so all hold the same weights).
    feature_weight: weight of feature distillation, which matches each layer named in `feature_layers` (default:
    every layer that is a SeparableConv2D or a spatial pair in the student and a Conv2D in the teacher) to the
    teacher's same-named layer output (relative squared error, averaged over layers); 0 turns it off.
    freeze_batchnorm: BatchNormalization layers frozen (inference mode) during training. frozen_batchnorm_pass: read
    by convert-model's recovery (recovery.py): after fine-tuning a model with BatchNorm, a second pass with
    freeze_batchnorm, kept only if validation improves. int8_noise: train with uniform noise of half an int8 step on
    every tensor an int8 export rounds (quantization_noise.py), so that the int8 artifact agrees with the model it
    makes (its validation scores, and so early stopping, are then under the noise too); None is off here, and
    convert-model decides it when it exports int8 (steps.py: by the model's int8 stability). learning_rate None: 1e-3,
    or 3e-4 with int8_noise."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float | None = None
    temperature: float = 4.0
    label_weight: float = 0.5
    validation_split: float = 0.1
    patience: int = 3
    checkpoint_dir: str | None = None
    resume: bool = False
    strategy: str = "auto"
    seed: int = 0
    feature_weight: float = 0.0
    feature_layers: tuple[str, ...] | None = None
    freeze_batchnorm: bool = False
    frozen_batchnorm_pass: bool = True
    int8_noise: bool | None = None

    def __post_init__(self):
        checks = [
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "a whole number >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "a whole number >= 1"),
            ("learning_rate", self.learning_rate is None or isinstance(self.learning_rate, (int, float))
             and self.learning_rate > 0, "a number > 0"),
            ("temperature", isinstance(self.temperature, (int, float)) and self.temperature > 0, "a number > 0"),
            ("label_weight", isinstance(self.label_weight, (int, float)) and 0 <= self.label_weight <= 1,
             "a number in [0, 1]"),
            ("validation_split", isinstance(self.validation_split, (int, float)) and 0 < self.validation_split < 1,
             "a fraction in (0, 1)"),
            ("patience", isinstance(self.patience, int) and self.patience >= 1, "a whole number >= 1"),
            ("strategy", self.strategy in STRATEGIES, f"one of {list(STRATEGIES)}"),
            ("feature_weight", isinstance(self.feature_weight, (int, float)) and self.feature_weight >= 0,
             "a number >= 0"),
            ("int8_noise", self.int8_noise in (None, True, False), "True, False or None"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidOptionError(f"Unrecognized {name}={getattr(self, name)!r}. Use {allowed}")
        if self.resume and not self.checkpoint_dir:
            raise InvalidOptionError("resume=True continues from checkpoints; give checkpoint_dir too")


@dataclass(frozen=True)
class FinetuneResult:
    mode: str  # "labels+distillation", "distillation"
    monitor: str  # "val_accuracy" or "val_agreement"
    epochs_run: int
    best_epoch: int
    best_value: float
    history: dict  # per-epoch values of every loss and metric, as Keras recorded them
    strategy: str
    devices: int
    seconds: float
    feature_layers: tuple[str, ...] = ()
    initial_value: float | None = None  # the monitored value of the starting weights (epoch 0)
    learning_rate: float | None = None  # the peak rate used
    int8_noise_tensors: int = 0  # tensors that had int8 rounding noise in training (0: trained without)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> FinetuneResult:
        """The result as to_dict() gave it (a resumed run's checkpoint state, JSON)."""
        return cls(**{**fields, "feature_layers": tuple(fields.get("feature_layers", ()))})


def finetune(student, teacher, x: np.ndarray, y: np.ndarray | None = None, *,
             options: FinetuneOptions = FinetuneOptions(), verbose: int = 1, callbacks=(), progress=None,
             validation: tuple | None = None, **kwargs) -> FinetuneResult:
    """Train `student` in place towards `teacher` (and the labels `y`, if given) on images `x`.

    kwargs are FinetuneOptions fields; callbacks are extra Keras callbacks (after sepconv's own). `student` must end
    in a softmax classifier output, like `teacher`. progress(stage, message), if given, gets one line per epoch instead
    of Keras' progress bar. validation: (x_val, y_val or None) for early stopping; without it, validation_split of `x`
    is held out. The starting weights count as epoch 0: if no epoch beats them on the validation data, they
    are kept (best_epoch 0). Raises KeyboardInterrupt as usual on Ctrl-C; the checkpoints of finished epochs stay in
    checkpoint_dir.
    """
    import keras

    if kwargs:
        options = FinetuneOptions(**{**options.__dict__, **kwargs})
    if len(x) < 2:
        raise InvalidOptionError(f"fine-tuning needs at least 2 images; got {len(x)}")
    started = time.perf_counter()
    classes = int(student.outputs[0].shape[-1])
    if validation is None:
        targets = _targets(teacher, x, y, classes)
        train, val = _split(len(x), options)
        x_train, t_train, x_val, t_val = _rows(x, train), targets[train], _rows(x, val), targets[val]
    else:
        x_val, y_val = validation
        if len(x_val) == 0 or (y is None) != (y_val is None):
            raise InvalidOptionError("validation=(x_val, y_val) needs images, and labels exactly when y is given")
        x_train, t_train = x, _targets(teacher, x, y, classes)
        t_val = _targets(teacher, x_val, y_val, classes)
    monitor = "val_accuracy" if y is not None else "val_agreement"
    label_weight = options.label_weight if y is not None else 0.0
    strategy, name = _strategy(options.strategy)
    keras.utils.set_random_seed(options.seed)
    features = _feature_layers(student, teacher, options) if options.feature_weight > 0 else ()
    worker = worker_role() if name == MULTI_WORKER else None
    with strategy.scope():
        model = _trainable_copy(student, freeze_batchnorm=options.freeze_batchnorm, int8_noise=bool(options.int8_noise))
        trainer = _feature_trainer(model, _trainable_copy(teacher), features, options.feature_weight) if features \
            else model
        shards = worker.workers if worker else 1  # each worker's steps: its share of the rows, in batches of 1/n
        steps = int(np.ceil(len(x_train) // shards / -(-options.batch_size // shards))) * options.epochs
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate(options),
                                                          decay_steps=max(1, steps))
        trainer.compile(optimizer=_averaging_adam()(schedule, workers=shards) if worker else
                        keras.optimizers.Adam(schedule),
                      loss=_distillation_loss(classes, options.temperature, label_weight),
                      metrics=[_agreement(classes)] + ([_accuracy(classes)] if y is not None else []))
    own = [keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=options.patience,
                                         restore_best_weights=True)]
    if options.checkpoint_dir:
        backup = Path(options.checkpoint_dir)
        if worker and not worker.chief:  # its own checkpoints, beside the chief's
            backup = backup.with_name(f"{backup.name}.worker{worker.index}")
        if backup.exists() and any(backup.iterdir()) and not options.resume:
            raise CheckpointError(f"{backup} holds checkpoints of an earlier run: pass resume=True to continue it, "
                                  f"or delete the folder to start over")
        own.append(atomic_backup_and_restore(str(backup), before_save=lambda model: require_space(backup, model)))
    if worker:
        _agree_across_workers(model, worker)
    start = model.get_weights()
    log = _epoch_log_class()(monitor, options.epochs, progress)
    with _ctrl_c_between_batches() as stop, _disk_full_while_checkpointing(options.checkpoint_dir), \
            _reads_reported(), _peers_reported(worker, backup if options.checkpoint_dir else None):
        # the start's score too: Ctrl-C while it runs stops the run when it ends, not wherever TensorFlow is
        checked = feed(x_val, t_val, options.batch_size)  # every worker validates on all of it, alike
        initial = trainer.evaluate(**checked, verbose=0, return_dict=True)
        initial = float(initial[monitor.removeprefix("val_")])
        if stop.pressed:
            raise KeyboardInterrupt
        trained = feed(x_train, t_train, options.batch_size, shuffle=options.seed, worker=worker)
        history = trainer.fit(**trained,
                              validation_data=(checked["x"], checked["y"]) if "y" in checked else checked["x"],
                              epochs=options.epochs,
                              callbacks=own + [log, stop, *_epoch_delay(stop)] + list(callbacks),
                              verbose=0 if progress else verbose,  # stop after the checkpoint: a save is never cut
                              shuffle="y" in trained)  # a pipeline shuffles itself (feed)
    values = history.history.get(monitor, [])
    best = int(np.nanargmax(values)) if values else -1
    if best < 0 or not values[best] > initial:  # no epoch beat the start: keep it
        model.set_weights(start)
        best_epoch, best_value = 0, initial
    else:
        best_epoch, best_value = log.first_epoch + best + 1, float(values[best])
    student.set_weights(model.get_weights())
    return FinetuneResult(mode="labels+distillation" if y is not None else "distillation", monitor=monitor,
                          epochs_run=log.last_epoch + 1, best_epoch=best_epoch, best_value=best_value,
                          initial_value=initial, learning_rate=learning_rate(options),
                          history={k: [float(v) for v in vs] for k, vs in history.history.items()}, strategy=name,
                          devices=worker.workers if worker else int(strategy.num_replicas_in_sync),
                          seconds=round(time.perf_counter() - started, 1),
                          feature_layers=tuple(features),
                          int8_noise_tensors=len(noise_points(student)) if options.int8_noise else 0)


def learning_rate(options: FinetuneOptions) -> float:
    """The peak rate: options.learning_rate, else the default for training with or without int8 noise."""
    return options.learning_rate or (NOISE_LEARNING_RATE if options.int8_noise else DEFAULT_LEARNING_RATE)


@contextlib.contextmanager
def _ctrl_c_between_batches():
    """Ctrl-C during training raises KeyboardInterrupt at the next batch or epoch boundary (after that epoch's
    checkpoint is written) instead of wherever Python happens to be - in the middle of writing a checkpoint, a
    half-written file that a resume cannot load; SIGTERM and SIGHUP raise errors.Terminated there. Only the main
    thread can own signals; elsewhere nothing changes."""
    import keras

    pressed = []

    class StopOnCtrlC(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.pressed = pressed

        def on_train_batch_end(self, batch, logs=None):
            if pressed:
                _stop(pressed)

        on_epoch_end = on_train_batch_end

    if threading.current_thread() is not threading.main_thread():
        yield StopOnCtrlC()
        return
    deferred = [signal.SIGINT] + [getattr(signal, name) for name in TERMINATING if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, lambda signum, frame: pressed.append(signum)) for signum in deferred}
    try:
        yield StopOnCtrlC()
    except Exception as error:  # after a Ctrl-C, the error is its doing (a peer worker that stopped first, ...)
        if pressed:
            _stop(pressed, error)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pressed:
        _stop(pressed)


def _stop(received: list[int], cause: BaseException | None = None):
    """Ctrl-C's KeyboardInterrupt, or errors.Terminated after SIGTERM / SIGHUP (remembered as its handler would);
    cause: the error the signal led to, if any."""
    if received[-1] == signal.SIGINT:
        raise KeyboardInterrupt from cause
    RECEIVED.append(received[-1])
    raise Terminated(received[-1]) from cause


@contextlib.contextmanager
def _peers_reported(worker: WorkerRole | None, checkpoints: Path | None):
    """In multi-worker fine-tuning, a collective op that fails because another worker ended, crashed or cannot be
    reached (TensorFlow's UnavailableError, or DeadlineExceededError after COLLECTIVE_TIMEOUT) is one WorkerLostError
    that says how to go on, not TensorFlow's traceback."""
    try:
        yield
    except Exception as error:
        import tensorflow as tf

        lost = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)
        if worker is None or not isinstance(error, lost):
            raise
        kept = (f"finished epochs are checkpointed in {checkpoints}: start every worker again with the same command "
                f"and --resume") if checkpoints else "start every worker again with the same command"
        raise WorkerLostError(f"fine-tuning across {worker.workers} workers stopped on worker {worker.index}: another "
                              f"worker ended or cannot be reached ({type(error).__name__}: {_op_error_line(error)}); "
                              f"{kept}") from error


def _op_error_line(error) -> str:
    """TensorFlow's own line in an OpError raised from a tf.function ("Graph execution error:", then where the op was
    defined, then the cause - "Collective ops is aborted by: failed to connect to all addresses; ... 127.0.0.1:35565:
    Failed to connect to remote host: Connection refused" - then more detail): the cause, at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith((" ", "\t"))
             and not line.startswith(("Graph execution error", "Detected at node"))]
    return (lines[0] if lines else first_line(error))[:200]


@contextlib.contextmanager
def _disk_full_while_checkpointing(folder):
    """A full disk while a checkpoint is written is one DiskFullError; the last complete checkpoint stays usable."""
    try:
        yield
    except Exception as error:
        if folder is None or isinstance(error, DiskFullError) or not disk_full(error):
            raise
        raise DiskFullError(f"No space left on device while writing a fine-tuning checkpoint in {folder}: free "
                            f"space or choose another folder (--checkpoint-dir); the last complete checkpoint is "
                            f"kept") from None


def require_space(folder: Path, model) -> None:
    """Refuse a checkpoint the disk cannot hold before HDF5 starts writing it: HDF5 does not recover from a full
    disk in the middle of a file (a stream of errors, then a crash at exit). The estimate is generous (twice the
    model's and optimizer's variables, plus 1 MiB); a disk filled by someone else during the write is not covered."""
    variables = list(model.variables) + list(getattr(getattr(model, "optimizer", None), "variables", []) or [])
    need = 2 * sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables) + (1 << 20)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise DiskFullError(f"No space left on device for a fine-tuning checkpoint in {folder}: it needs about "
                            f"{need / 2 ** 20:.1f} MiB, {free / 2 ** 20:.1f} MiB are free; free space or choose another "
                            f"folder (--checkpoint-dir); the last complete checkpoint is kept")



def _epoch_delay(stop) -> list:
    """[a callback that waits SEPCONV_TEST_EPOCH_DELAY seconds at each epoch's end, or until Ctrl-C is pressed
    (`stop.pressed`)], or [] when the variable is not set."""
    value = os.environ.get(EPOCH_DELAY, "").strip()
    if not value:
        return []
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise InvalidOptionError(f"Unrecognized {EPOCH_DELAY}={value!r}. Use seconds from 0 to 3600 (tests only)")
    import keras

    class EpochDelay(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            deadline = time.monotonic() + seconds
            while not stop.pressed and time.monotonic() < deadline:
                time.sleep(min(0.1, seconds))
            if stop.pressed:  # stop here, as a Ctrl-C during a real epoch's end would: not after another batch
                _stop(stop.pressed)

    return [EpochDelay()]


@functools.cache
def _epoch_log_class():
    import keras

    class EpochLog(keras.callbacks.Callback):
        """Which epochs ran (a resumed run starts past 0) and one progress line per epoch."""

        def __init__(self, monitor: str, epochs: int, progress):
            super().__init__()
            self.monitor, self.epochs, self.progress = monitor, epochs, progress
            self.first_epoch, self.last_epoch, self._started = None, -1, 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.first_epoch = epoch if self.first_epoch is None else self.first_epoch
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.last_epoch = epoch
            if self.progress:
                logs = logs or {}
                values = ", ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()) if k != "learning_rate")
                self.progress("finetune", f"epoch {epoch + 1}/{self.epochs}: {values} "
                                          f"({time.perf_counter() - self._started:.1f} s)")

    return EpochLog


def _targets(teacher, x, y, classes: int) -> np.ndarray:
    """Per sample: the teacher's probabilities, the one-hot label (zeros without labels)."""
    soft = predict_keras(teacher, x)[0].astype(np.float32)
    if soft.shape[-1] != classes or soft.ndim != 2:
        raise InvalidOptionError(f"fine-tuning needs a classifier with one (N, {classes}) output; the teacher gives "
                                 f"{soft.shape}")
    hard = np.zeros_like(soft) if y is None else np.eye(classes, dtype=np.float32)[np.asarray(y)]
    return np.concatenate([soft, hard], axis=1)


def feed(x, targets: np.ndarray, batch_size: int, *, shuffle: int | None = None,
         worker: WorkerRole | None = None) -> dict:
    """What Keras' fit and evaluate take (x=, y=, batch_size=): arrays as they are (fit shuffles them); streamed images
    (data.Images), or a multi-worker run's training data, as a tf.data pipeline that shuffles the row numbers (with
    `shuffle` as the seed, anew each epoch), reads each batch's rows in parallel and prefetches: memory holds a few
    batches, never the set. The targets (a few floats per image) stay in memory.

    worker (training only): this worker's share of each epoch's shuffled rows (every worker shuffles alike and keeps
    every n-th row; the shares are of one size, the odd rows of an epoch, fewer than the workers, wait for the next
    shuffle) in batches of batch_size / n, so that the workers run the same number of steps on disjoint rows."""
    if isinstance(x, np.ndarray) and worker is None:
        return {"x": x, "y": targets, "batch_size": batch_size}
    import tensorflow as tf

    shape, width = (None, *x.shape[1:]), targets.shape[1]

    def read(rows):
        try:
            return x[rows], targets[rows]
        except DataError as error:  # TensorFlow re-raises it as an OpError with a traceback inside: _reads_reported
            _READ_ERRORS.append(error)
            raise

    def load(rows):
        images, wanted = tf.numpy_function(read, [rows], (tf.float32, tf.float32), stateful=False)
        images.set_shape(shape)
        wanted.set_shape((None, width))
        return images, wanted

    rows = tf.data.Dataset.range(len(x))
    if shuffle is not None:
        rows = rows.shuffle(len(x), seed=shuffle, reshuffle_each_iteration=True)  # row numbers: 8 bytes each
    if worker is not None:
        rows = rows.take(len(x) // worker.workers * worker.workers).shard(worker.workers, worker.index)
        batch_size = -(-batch_size // worker.workers)
    return {"x": rows.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)}


_READ_ERRORS = []  # a DataError a tf.data pipeline's read raised (an unreadable image met while streaming)


@contextlib.contextmanager
def _reads_reported():
    """A DataError raised while tf.data read a batch (feed), as itself: one line naming the file, not the OpError
    TensorFlow wraps it in."""
    _READ_ERRORS.clear()
    try:
        yield
    except Exception:
        if _READ_ERRORS:
            raise _READ_ERRORS[-1] from None
        raise


def _rows(x, index: np.ndarray):
    """x[index] without reading streamed images (data.Images.take)."""
    return x[index] if isinstance(x, np.ndarray) else x.take(index)


def _split(count: int, options: FinetuneOptions):
    order = np.random.default_rng(options.seed).permutation(count)
    cut = max(1, int(round(count * options.validation_split)))
    return np.sort(order[cut:]), np.sort(order[:cut])


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a multi-worker run (TF_CONFIG): its index among the workers, their number, and
    whether it is the chief (the task "chief", or worker 0 when the cluster names no chief), which writes."""

    index: int
    workers: int
    chief: bool


def worker_role(environ=None) -> WorkerRole:
    """The role TF_CONFIG gives this process (read without TensorFlow); InvalidOptionError when it is missing or
    malformed, with the form it takes."""
    import json

    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
               '"index": 0}}\' (index 1 on the second host)')
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
        hosts = {name: list(addresses) for name, addresses in cluster.items() if name in ("chief", "worker")}
        if kind not in hosts or not 0 <= index < len(hosts[kind]):
            raise ValueError(f"task {kind} {index} is not in the cluster")
    except (ValueError, KeyError, TypeError) as error:
        what = "is not set" if not text else f"cannot be read ({first_line(error, 120)})"
        raise InvalidOptionError(f"--strategy multi-worker reads the cluster from TF_CONFIG, which {what}; set it on "
                                 f"every worker, e.g. {example}") from None
    before = len(hosts.get("chief", [])) if kind == "worker" else 0
    total = sum(len(addresses) for addresses in hosts.values())
    return WorkerRole(index=before + index, workers=total, chief=before + index == 0)


_MULTI_WORKER = []  # the process's MultiWorkerMirroredStrategy, once made
COLLECTIVE_GROUP = 7289  # the group key of sepconv's collectives (any constant every worker shares)
COLLECTIVE_TIMEOUT = 600.0  # seconds a worker waits for the others at a step before it fails
CHECK_KEYS, WEIGHT_KEYS, GRADIENT_KEYS = 1, 1 << 20, 2 << 20  # instance keys: each call site its own range


def multi_worker_strategy():
    """TensorFlow's MultiWorkerMirroredStrategy over TF_CONFIG's cluster, made on first call: it starts this worker's
    server and configures the collective ops that `finetune` averages gradients with. TensorFlow configures them
    once, before anything runs: call this before any TensorFlow work (convert_model does, first thing); later,
    InvalidOptionError says so. (Keras 3's fit under that strategy fails - keras-team/keras#20585 - so training is
    Keras' plain fit on each worker's shard, with the gradients averaged by those collectives: `_averaging_adam`.)"""
    if not _MULTI_WORKER:
        worker_role()  # TF_CONFIG's errors in one line
        import tensorflow as tf

        try:
            _MULTI_WORKER.append(tf.distribute.MultiWorkerMirroredStrategy())
        except RuntimeError as error:
            raise InvalidOptionError(f"--strategy multi-worker must start before any TensorFlow work in the process "
                                     f"({first_line(error, 100)}): call sepconv.convert.recovery.finetuning."
                                     f"multi_worker_strategy() first") from None
    return _MULTI_WORKER[0]


def _across_workers(tensors, first_key: int, workers: int, op: str = "Add", final: str = "Div") -> list:
    """Each tensor's mean over the workers (op "Max", final "Id": the largest); keras_compat.all_reduce."""
    return all_reduce(tensors, workers=workers, group=COLLECTIVE_GROUP, first_key=first_key, op=op, final=final,
                      timeout=COLLECTIVE_TIMEOUT)


def _agree_across_workers(model, worker: WorkerRole) -> None:
    """Before training: every worker must train the same architecture (one whose latency measurements chose another
    plan would wait forever at the first step), so a digest of each worker's layers and weight shapes is compared
    (InvalidOptionError on every worker when any differs); then the weights are averaged over the workers, so that
    they start equal (on different hosts, float results may differ in the last bits)."""
    import hashlib

    import tensorflow as tf

    layout = repr([(w.path, tuple(w.shape)) for w in model.weights]).encode()
    mine = tf.constant(np.frombuffer(hashlib.sha256(layout).digest()[:8], np.uint16).astype(np.float32))
    mean = _across_workers([mine], CHECK_KEYS, worker.workers)[0]
    differs = tf.cast(tf.reduce_any(mean != mine), tf.float32)
    if float(_across_workers([differs], CHECK_KEYS + 1, worker.workers, op="Max", final="Id")[0]):
        raise InvalidOptionError("the workers built different models to fine-tune: every worker must run the same "
                                 "command on the same data; fix the plan with --rank, or give every worker a copy of "
                                 "the chief's --latency-cache")
    for variable, value in zip(model.weights, _across_workers([tf.convert_to_tensor(v) for v in model.weights],
                                                              WEIGHT_KEYS, worker.workers)):
        variable.assign(value)


@functools.cache
def _averaging_adam():
    import keras

    class AveragingAdam(keras.optimizers.Adam):
        """Adam whose gradients are first averaged over the workers: data-parallel training in Keras' own fit."""

        def __init__(self, *args, workers: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.workers = workers

        def apply(self, grads, trainable_variables=None):
            return super().apply(_across_workers(grads, GRADIENT_KEYS, self.workers), trainable_variables)

    return AveragingAdam


def _strategy(choice: str):
    import tensorflow as tf

    if choice == MULTI_WORKER:
        multi_worker_strategy()
        return tf.distribute.get_strategy(), MULTI_WORKER  # each worker trains alone; the optimizer averages
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if choice == "mirrored" or (choice == "auto" and len(devices) > 1):
        return tf.distribute.MirroredStrategy([d.name for d in devices]), "mirrored"
    return tf.distribute.get_strategy(), "default"


def _trainable_copy(model, freeze_batchnorm: bool = False, int8_noise: bool = False):
    """The student rebuilt in the current strategy's scope, with its weights (variables must live there); with
    freeze_batchnorm, its BatchNormalization layers frozen (Keras then runs them in inference mode: their moving
    statistics, not each batch's, normalise during training, and neither they nor gamma/beta change); with int8_noise,
    adding int8 rounding noise in training and in evaluation (quantization_noise.noisy_copy)."""
    import keras

    if int8_noise:
        copy = noisy_copy(model)
    else:
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
    if freeze_batchnorm:
        for _, layer in leaf_layers(copy):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return copy


def _feature_layers(student, teacher, options: FinetuneOptions) -> tuple[str, ...]:
    import keras

    teacher_names = {layer.name for layer in teacher.layers}
    if options.feature_layers is not None:
        missing = [n for n in options.feature_layers if n not in teacher_names
                   or n not in {layer.name for layer in student.layers}]
        if missing:
            raise InvalidOptionError(f"feature_layers {missing} are not top-level layers of both the student and the "
                                     f"teacher; name layers both models have")
        return tuple(options.feature_layers)
    names = tuple(layer.name for layer in student.layers
                  if (isinstance(layer, keras.layers.SeparableConv2D) or is_graph_model(layer))
                  and layer.name in teacher_names and type(teacher.get_layer(layer.name)) is keras.layers.Conv2D)
    if not names:
        raise InvalidOptionError("feature distillation found no separated layer (a SeparableConv2D or the spatial "
                                 "form's pair) in the student that is a Conv2D in the teacher; pass "
                                 "feature_layers=(...) or feature_weight=0")
    return names


def _feature_trainer(student, teacher, names: tuple[str, ...], weight: float):
    """The student with its class output unchanged and a feature-matching loss added against the frozen teacher."""
    import keras

    teacher_features = keras.Model(teacher.inputs, [layer_output(teacher, n) for n in names])
    teacher_features.trainable = False
    student_features = keras.Model(student.inputs, [student.outputs[0]] + [layer_output(student, n) for n in names])
    x = keras.Input(batch_shape=student.inputs[0].shape, dtype=student.inputs[0].dtype)
    probs, *mine = student_features(x)
    theirs = teacher_features(x)
    theirs = theirs if isinstance(theirs, (list, tuple)) else [theirs]
    return keras.Model(x, _feature_match_class()(weight / len(names))([probs, *mine, *theirs]))


@functools.cache
def _feature_match_class():
    """The layer class, defined on first use (this module imports Keras lazily so that option parsing stays fast)."""
    import keras

    class FeatureMatch(keras.layers.Layer):
        """Passes the class output through and adds weight x mean relative squared error of feature pairs."""

        def __init__(self, weight: float, **kwargs):
            super().__init__(**kwargs)
            self.weight = weight

        def call(self, inputs):
            probs, rest = inputs[0], inputs[1:]
            half = len(rest) // 2
            total = 0.0
            for mine, theirs in zip(rest[:half], rest[half:]):
                error = keras.ops.mean(keras.ops.square(mine - theirs))
                total = total + error / (keras.ops.mean(keras.ops.square(theirs)) + 1e-8)
            self.add_loss(self.weight * total)
            return probs

    return FeatureMatch


def _soften(p, temperature: float):
    import keras

    logp = keras.ops.log(keras.ops.clip(p, 1e-7, 1.0)) / temperature
    return keras.ops.softmax(logp, axis=-1)


def _distillation_loss(classes: int, temperature: float, label_weight: float):
    import keras

    def loss(targets, probs):
        soft, hard = targets[:, :classes], targets[:, classes:]
        teacher, student = _soften(soft, temperature), _soften(probs, temperature)
        kl = keras.ops.sum(teacher * (keras.ops.log(keras.ops.clip(teacher, 1e-7, 1.0))
                                      - keras.ops.log(keras.ops.clip(student, 1e-7, 1.0))), axis=-1)
        distill = kl * temperature ** 2
        if label_weight == 0:
            return distill
        ce = -keras.ops.sum(hard * keras.ops.log(keras.ops.clip(probs, 1e-7, 1.0)), axis=-1)
        return label_weight * ce + (1 - label_weight) * distill

    return loss


def _agreement(classes: int):
    import keras

    def agreement(targets, probs):
        return keras.ops.cast(keras.ops.argmax(targets[:, :classes], -1) == keras.ops.argmax(probs, -1), "float32")

    return agreement


def _accuracy(classes: int):
    import keras

    def accuracy(targets, probs):
        return keras.ops.cast(keras.ops.argmax(targets[:, classes:], -1) == keras.ops.argmax(probs, -1), "float32")

    return accuracy

"""Recover accuracy by training the separated model: labels (cross-entropy), distillation from the original model
(the teacher), or both mixed; early stopping on validation accuracy (or teacher agreement without labels), the best
weights restored, per-epoch checkpoints that an interrupted run resumes from, and tf.distribute on request.

The teacher's outputs are computed once and packed with the labels into the training targets, so training is a plain
`model.fit` (progress bar, callbacks and strategies work as usual). Distillation softens the teacher's and the
student's class probabilities with a temperature T: for a softmax output p = softmax(z), softmax(z / T) equals
p^(1/T) renormalised, so models that end in a softmax need no logits.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sepconv.convert.errors import InvalidOptionError

STRATEGIES = ("auto", "default", "mirrored")


@dataclass(frozen=True)
class FinetuneOptions:
    """epochs: at most this many (early stopping may end sooner). learning_rate: Adam's peak, cosine-decayed to 0.
    temperature: distillation temperature T. label_weight: share of the label loss when labels exist (the rest is
    distillation); ignored without labels (pure distillation). validation_split: held out for early stopping.
    patience: epochs without improvement before stopping. checkpoint_dir: per-epoch backups (resume=True continues
    from the last one). strategy: auto (mirrored when several devices are visible), default, or mirrored."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    temperature: float = 4.0
    label_weight: float = 0.5
    validation_split: float = 0.1
    patience: int = 3
    checkpoint_dir: str | None = None
    resume: bool = False
    strategy: str = "auto"
    seed: int = 0

    def __post_init__(self):
        checks = [
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "a whole number >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "a whole number >= 1"),
            ("learning_rate", isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0, "a number > 0"),
            ("temperature", isinstance(self.temperature, (int, float)) and self.temperature > 0, "a number > 0"),
            ("label_weight", isinstance(self.label_weight, (int, float)) and 0 <= self.label_weight <= 1,
             "a number in [0, 1]"),
            ("validation_split", isinstance(self.validation_split, (int, float)) and 0 < self.validation_split < 1,
             "a fraction in (0, 1)"),
            ("patience", isinstance(self.patience, int) and self.patience >= 1, "a whole number >= 1"),
            ("strategy", self.strategy in STRATEGIES, f"one of {list(STRATEGIES)}"),
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

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(student, teacher, x: np.ndarray, y: np.ndarray | None = None, *,
             options: FinetuneOptions = FinetuneOptions(), verbose: int = 1, callbacks=(), **kwargs) -> FinetuneResult:
    """Train `student` in place towards `teacher` (and the labels `y`, if given) on images `x`.

    kwargs are FinetuneOptions fields; callbacks are extra Keras callbacks (after sepconv's own). `student` must end in a softmax classifier output, like `teacher`.
    Raises KeyboardInterrupt as usual on Ctrl-C; the checkpoints of finished epochs stay in checkpoint_dir.
    """
    import keras

    if kwargs:
        options = FinetuneOptions(**{**options.__dict__, **kwargs})
    if len(x) < 2:
        raise InvalidOptionError(f"fine-tuning needs at least 2 images; got {len(x)}")
    started = time.perf_counter()
    classes = int(student.outputs[0].shape[-1])
    targets = _targets(teacher, x, y, classes)
    train, val = _split(len(x), options)
    monitor = "val_accuracy" if y is not None else "val_agreement"
    label_weight = options.label_weight if y is not None else 0.0
    strategy, name = _strategy(options.strategy)
    keras.utils.set_random_seed(options.seed)
    with strategy.scope():
        model = _trainable_copy(student)
        steps = int(np.ceil(len(train) / options.batch_size)) * options.epochs
        schedule = keras.optimizers.schedules.CosineDecay(options.learning_rate, decay_steps=max(1, steps))
        model.compile(optimizer=keras.optimizers.Adam(schedule),
                      loss=_distillation_loss(classes, options.temperature, label_weight),
                      metrics=[_agreement(classes)] + ([_accuracy(classes)] if y is not None else []))
    own = [keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=options.patience,
                                         restore_best_weights=True)]
    if options.checkpoint_dir:
        backup = Path(options.checkpoint_dir)
        if backup.exists() and not options.resume:
            import shutil

            shutil.rmtree(backup)
        own.append(keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch", delete_checkpoint=True))
    history = model.fit(x[train], targets[train], validation_data=(x[val], targets[val]), epochs=options.epochs,
                        batch_size=options.batch_size, callbacks=own + list(callbacks), verbose=verbose,
                        shuffle=True)
    student.set_weights(model.get_weights())
    values = history.history.get(monitor, [float("nan")])
    best = int(np.nanargmax(values)) if values else 0
    return FinetuneResult(mode="labels+distillation" if y is not None else "distillation", monitor=monitor,
                          epochs_run=len(values), best_epoch=best + 1, best_value=float(values[best]),
                          history={k: [float(v) for v in vs] for k, vs in history.history.items()}, strategy=name,
                          devices=int(strategy.num_replicas_in_sync), seconds=round(time.perf_counter() - started, 1))


def _targets(teacher, x, y, classes: int) -> np.ndarray:
    """Per sample: the teacher's probabilities, the one-hot label (zeros without labels)."""
    from sepconv.convert.verification import predict_keras

    soft = predict_keras(teacher, x)[0].astype(np.float32)
    if soft.shape[-1] != classes or soft.ndim != 2:
        raise InvalidOptionError(f"fine-tuning needs a classifier with one (N, {classes}) output; the teacher gives "
                                 f"{soft.shape}")
    hard = np.zeros_like(soft) if y is None else np.eye(classes, dtype=np.float32)[np.asarray(y)]
    return np.concatenate([soft, hard], axis=1)


def _split(count: int, options: FinetuneOptions):
    order = np.random.default_rng(options.seed).permutation(count)
    cut = max(1, int(round(count * options.validation_split)))
    return np.sort(order[cut:]), np.sort(order[:cut])


def _strategy(choice: str):
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if choice == "mirrored" or (choice == "auto" and len(devices) > 1):
        return tf.distribute.MirroredStrategy([d.name for d in devices]), "mirrored"
    return tf.distribute.get_strategy(), "default"


def _trainable_copy(model):
    """The student rebuilt in the current strategy's scope, with its weights (variables must live there)."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


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

"""Data a user brings: an .npz with x (and y), a folder of images in class sub-folders, or a flat folder of images;
and a run's data in its three roles (`datasets`).

Everything is turned into float32 arrays shaped like the model's input. Image files and integer arrays are scaled
by `DataOptions.scale` (then normalised by mean/std if given); float arrays are taken as already preprocessed, since
only the user knows how the model was trained.

A run's data plays three roles, which never share a sample: train (with a part that calibrates), validation (every
choice) and test (scores and verification only); without data, synthetic test inputs. `datasets` returns them as a
RunData, with the DataInfo that the result and the manifests report.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sepconv.convert.errors import DataError, InvalidOptionError, UnsupportedModelError
from sepconv.convert.graph import leaf_layers
from sepconv.deploy.files import first_line
from sepconv.deploy.preprocess import AUTO, SCALES  # one definition for both sides
from sepconv.deploy.scores import class_labels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SEED = 0  # of every shuffle and sample here: the same files give the same data
MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels (8192 x 8192): more than any camera image, less than PIL's bomb warning
MIN_SAMPLES = 20  # a run with data needs some samples to train on, some to validate with and some to test on
SYNTHETIC_SAMPLES = 64

if TYPE_CHECKING:  # options imports this module: the annotation only
    from sepconv.convert.options import ConvertOptions


@dataclass(frozen=True)
class DataOptions:
    """scale: how 0..255 pixels map to the model's range: 'unit' [0, 1], 'symmetric' [-1, 1] or 'raw' [0, 255];
    'auto' (the default) is 'raw' for a model with its own Rescaling layer at the input and 'unit' otherwise
    (`resolve_scale`; read without a model, 'unit').
    mean / std: per-channel normalisation applied after scaling ((x - mean) / std), e.g. ImageNet statistics.
    max_samples: read at most this many samples: a seeded random choice (classes in turn for image folders), so that
    a file sorted by label keeps its classes."""

    scale: str = AUTO
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_samples: int | None = None

    def __post_init__(self):
        if self.scale not in SCALES and self.scale != AUTO:
            raise InvalidOptionError(f"Unrecognized scale={self.scale!r}. Supported scales are: "
                                     f"{sorted(SCALES) + [AUTO]}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise InvalidOptionError(f"Unrecognized max_samples={self.max_samples!r}. Use a whole number >= 1")
        if self.std is not None and any(s == 0 for s in self.std):
            raise InvalidOptionError(f"Unrecognized std={self.std!r}. Standard deviations must be non-zero")


@dataclass(frozen=True)
class Dataset:
    """Inputs shaped like the model's (float32), optional integer labels, and where they came from."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    class_names: tuple[str, ...] | None = None
    one_hot: int | None = None  # the width of the one-hot rows the labels were given as (None: class indices)

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index) -> Dataset:
        return Dataset(self.x[index], None if self.y is None else self.y[index], self.source, self.class_names,
                       self.one_hot)


def load_data(source, input_shape, options: DataOptions = DataOptions()) -> Dataset:
    """Read `source` (.npz, or a folder of images) into a Dataset matching `input_shape` (batch dim first, ignored)."""
    path = Path(source)
    shape = tuple(input_shape[1:])
    if len(shape) != 3 or any(d is None for d in shape):
        raise DataError(f"--data needs a model with one image input of fixed size (H, W, C); this model's input is "
                        f"{tuple(input_shape)}; pass arrays through the Python API instead")
    _check_normalisation(options, shape[-1])
    check_source(path)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # overflows are counted by _check_finite
        return _check_finite(_from_folder(path, shape, options) if path.is_dir() else _from_npz(path, shape, options))


def check_source(source) -> None:
    """Raise DataError unless `source` names an existing .npz file or folder (checked before any work)."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; pass an .npz file or a folder of images")
    if not path.is_dir() and path.suffix.lower() != ".npz":
        raise DataError(f"{path}: unrecognized data file; pass an .npz with arrays 'x' (and 'y') or a folder of images")


def _check_normalisation(options: DataOptions, channels: int) -> None:
    """--mean / --std give one value per channel of the model's input (or one value for all)."""
    for name, values in (("mean", options.mean), ("std", options.std)):
        if values is not None and len(values) not in (1, channels):
            raise InvalidOptionError(f"--{name} has {len(values)} values {list(values)} but the model's input has "
                                     f"{channels} channels; give {channels} comma-separated values (or one for all)")


def _check_finite(data: Dataset) -> Dataset:
    """NaN or infinite inputs would train and calibrate a model that outputs NaN: refuse them, saying how many."""
    finite = np.isfinite(data.x)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad:
        samples = int(np.count_nonzero(~finite.reshape(len(finite), -1).all(axis=1)))
        raise DataError(f"{data.source}: {bad:,} non-finite values (NaN or infinity) in {samples:,} of {len(data):,} "
                        f"samples, after conversion to float32 and --mean/--std; remove or repair those samples")
    return data


def _check_kind(x: np.ndarray, path: Path) -> None:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or x.ndim not in (3, 4) or len(x) == 0:
        raise DataError(f"{path}: 'x' must be a non-empty numeric array of images (N, H, W[, C]); got dtype "
                        f"{x.dtype} and shape {x.shape}")


def _from_npz(path: Path, shape, options: DataOptions) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot be read as .npz ({first_line(error, 200)}); save it with "
                        f"numpy.savez(path, x=images, y=labels)") from error
    if "x" not in arrays:
        raise DataError(f"{path}: has no array 'x' (found: {sorted(arrays)}); save it with numpy.savez(path, x=images, "
                        f"y=labels)")
    _check_kind(arrays["x"], path)
    x, y = arrays["x"], arrays.get("y")
    if options.max_samples and options.max_samples < len(x):
        keep = np.sort(np.random.default_rng(SEED).choice(len(x), options.max_samples, replace=False))
        y = y[keep] if y is not None and np.ndim(y) >= 1 and len(y) == len(x) else y
        x = x[keep]
    if x.ndim == 3:
        x = x[..., None]
    scaled = np.issubdtype(x.dtype, np.integer)
    x = _fit(x.astype(np.float32), shape, str(path))
    width = int(y.shape[1]) if y is not None and np.ndim(y) == 2 and y.shape[1] > 1 else None
    return Dataset(_normalise(x, options, scale=scaled), _labels(y, len(x), path), str(path), one_hot=width)


def _from_folder(path: Path, shape, options: DataOptions) -> Dataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(f, label) for label, name in enumerate(classes) for f in _images_in(path / name)]
    else:
        files = [(f, None) for f in _images_in(path)]
    if not files:
        raise DataError(f"{path}: holds no images ({', '.join(IMAGE_SUFFIXES)}), directly or in class sub-folders")
    order = np.random.default_rng(SEED).permutation(len(files))  # read class by class, used in a random order
    files = [files[i] for i in order]
    if options.max_samples:
        files = _interleave(files, options.max_samples)
    x = np.stack([_read_image(f, shape) for f, _ in files])
    y = np.array([label for _, label in files], dtype=np.int64) if classes else None
    return Dataset(_normalise(x, options, scale=True), y, str(path), tuple(classes) or None)


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _interleave(files, limit):
    """The first `limit` files taking classes in turn, so a cap keeps every class represented."""
    by_label = {}
    for item in files:
        by_label.setdefault(item[1], []).append(item)
    queues = list(by_label.values())
    picked = []
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


def _read_image(path: Path, shape) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    height, width, channels = shape
    if channels not in (1, 3):
        raise DataError(f"The model takes {channels}-channel images; image folders can feed 1 (grayscale) or 3 (RGB) "
                        f"channels; pass an .npz instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixels(path, image.width, image.height)
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: refused as a possible decompression bomb ({error}); images may have at most "
                        f"{MAX_IMAGE_PIXELS:,} pixels: shrink or remove the file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path}: cannot be read as an image ({error}); remove or replace the file") from error
    return array[..., None] if channels == 1 else array


def _check_pixels(path: Path, width: int, height: int) -> None:
    """Judge the size the header declares before anything is decoded (a tiny PNG can claim 100000 x 100000)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: declares {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} an input "
                        f"image may have (a possible decompression bomb); shrink or remove the file")


def _fit(x: np.ndarray, shape, source: str) -> np.ndarray:
    """Match channels (1 <-> 3 by repetition) and spatial size (bilinear resize) to the model's input."""
    height, width, channels = shape
    if x.shape[-1] != channels:
        if x.shape[-1] == 1 and channels == 3:
            x = np.repeat(x, 3, axis=-1)
        else:
            raise DataError(f"{source}: images have {x.shape[-1]} channels but the model takes {channels}; convert "
                            f"them (or pass images of shape (N, {height}, {width}, {channels}))")
    if x.shape[1:3] != (height, width):
        import tensorflow as tf

        x = tf.image.resize(x, (height, width), method="bilinear").numpy()
    return x.astype(np.float32)


def _normalise(x: np.ndarray, options: DataOptions, *, scale: bool) -> np.ndarray:
    if scale:
        factor, offset = SCALES["unit" if options.scale == AUTO else options.scale]
        x = x * factor + offset
    if options.mean is not None:
        x = x - np.asarray(options.mean, dtype=np.float32)
    if options.std is not None:
        x = x / np.asarray(options.std, dtype=np.float32)
    return x.astype(np.float32)


def _labels(y, count: int, path: Path):
    if y is None:
        return None
    y = class_labels(y)
    if len(y) != count or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{path}: 'y' must hold {count} non-negative integer class labels (or one-hot rows); got "
                        f"dtype {y.dtype} and {len(y)} values")
    return y.astype(np.int64)


def check_labels(data: Dataset, classes: int) -> None:
    """Labels must index the model's output classes (and one-hot rows be as wide as its output)."""
    if data.one_hot is not None and data.one_hot != classes:
        raise DataError(f"{data.source}: 'y' has one-hot rows of {data.one_hot} classes for a model with {classes} "
                        f"outputs; save labels for this model")
    if data.y is not None and len(data.y) and int(data.y.max()) >= classes:
        raise DataError(f"{data.source}: label {int(data.y.max())} is out of range for a model with {classes} outputs")


def resolve_scale(model, options: DataOptions) -> tuple[DataOptions, str]:
    """(options with scale 'auto' resolved for `model`, a note saying what was chosen and why)."""
    if options.scale != AUTO:
        return options, f"scale {options.scale}"
    layer = _input_rescaling(model)
    if layer is not None:
        return replace(options, scale="raw"), (f"scale auto -> raw: the model rescales its input itself in layer "
                                                f"{layer!r}, so pixels are fed as 0..255")
    return replace(options, scale="unit"), "scale auto -> unit: integer 0..255 pixels become [0, 1]"


def _input_rescaling(model) -> str | None:
    """The path of a Rescaling layer met before any layer with weights, walking the model in graph order."""
    import keras


    for path, layer in leaf_layers(model):
        if isinstance(layer, keras.layers.Rescaling):
            return path
        if layer.weights and not isinstance(layer, keras.layers.Normalization):
            return None
    return None


def check_usable(data: Dataset, minimum: int) -> None:
    """Refuse data that cannot carry a run: too few samples for its three roles, or images that are all the same."""
    if len(data) < minimum:
        raise DataError(f"{data.source}: only {len(data)} samples; a run needs at least {minimum} (some to train and "
                        f"calibrate on, some to validate, some to test); pass more images")
    if float(np.ptp(data.x)) == 0.0:
        raise DataError(f"{data.source}: all {len(data)} images are the same constant value {float(data.x.flat[0]):g}; "
                        f"this is not image data: pass the real images")


def split(data: Dataset, heldout: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out): a seeded shuffle; `heldout` of the samples (at least one each side) are held out."""
    if len(data) < 2:
        raise DataError(f"{data.source}: needs at least 2 samples (some to calibrate or train on, some held out); "
                        f"got {len(data)}")
    order = np.random.default_rng(seed).permutation(len(data))
    cut = min(len(data) - 1, max(1, int(round(len(data) * heldout))))
    return data.take(order[cut:]), data.take(order[:cut])


@dataclass(frozen=True)
class DataInfo:
    """The data of a run and its three roles: train (a part of it calibrates), validation (every choice), test
    (scores and verification only); without data, the synthetic inputs verification ran on."""

    source: str | None  # --data; None: synthetic inputs
    test_source: str | None  # --test-data; None: held out from --data
    validation_source: str | None  # --validation-data; None: held out from --data
    samples: int
    labelled: bool
    scale: str | None
    preprocessing: dict  # scale, mean, std and the reason (what the manifest records for the device)
    train_samples: int
    calibration_samples: int
    validation_samples: int
    heldout_samples: int
    heldout_labelled: bool
    description: str

    def to_dict(self) -> dict:
        fields = asdict(self)
        if self.source is None:  # a run without data has no validation set: the key is absent from its JSON
            del fields["validation_source"]
        return fields


@dataclass(frozen=True)
class RunData:
    """A run's data in its three roles (module doc): train, calibration (its inputs, a part of train), validation,
    test, and their DataInfo. Without data, train, calibration and validation are None and test holds synthetic
    inputs."""

    train: Dataset | None
    calibration: np.ndarray | None
    validation: Dataset | None
    test: Dataset
    info: DataInfo


def datasets(model, options: ConvertOptions) -> RunData:
    """The run's data in its three roles, which never share a sample (recovery/steps.py says who uses what); without
    data, synthetic test inputs."""
    if len(model.inputs) != 1:
        raise UnsupportedModelError(f"convert-model handles single-input models; this one has {len(model.inputs)} "
                                    f"inputs: use export_tflite / export_onnx from the Python API")
    data_options, scale_note = resolve_scale(model, options.data_options)
    preprocessing = {"scale": data_options.scale, "mean": data_options.mean, "std": data_options.std,
                     "reason": scale_note}
    if options.data:
        return _split_roles(model, options, data_options, preprocessing, scale_note)
    return _synthetic(model, preprocessing)


def _split_roles(model, options: ConvertOptions, data_options: DataOptions, preprocessing: dict,
                 scale_note: str) -> RunData:
    data = _labelled_data(options.data, model, data_options)
    if options.test_data:
        rest, test = data, _labelled_data(options.test_data, model, data_options)
    else:
        rest, test = split(data, heldout=options.heldout_fraction)
    if options.validation_data:
        train = rest.take(np.random.default_rng(1).permutation(len(rest)))  # all of it, shuffled
        validation = _labelled_data(options.validation_data, model, data_options)
    else:
        train, validation = split(rest, heldout=options.validation_fraction, seed=1)
    calibration = train.take(np.arange(min(options.calibration_samples, len(train))))
    labels = "labelled" if data.y is not None else "unlabelled"
    held = f"{len(test)} from {test.source}" if options.test_data else f"{len(test)} held out"
    info = DataInfo(
        source=data.source, test_source=test.source if options.test_data else None,
        validation_source=validation.source if options.validation_data else None,
        samples=len(data), labelled=data.y is not None, scale=data_options.scale, preprocessing=preprocessing,
        train_samples=len(train), calibration_samples=len(calibration), validation_samples=len(validation),
        heldout_samples=len(test), heldout_labelled=test.y is not None,
        description=f"{len(data)} {labels} samples from {data.source} ({scale_note}): {len(train)} to train on (a "
                    f"random {len(calibration)} of them also calibrate), {len(validation)} to validate (every "
                    f"choice), {held} to test (scoring and verification only)")
    return RunData(train, calibration.x, validation, test, info)


def _synthetic(model, preprocessing: dict) -> RunData:
    """Without data: SYNTHETIC_SAMPLES uniform [0, 1) test inputs, nothing to train, calibrate or validate on."""
    shape = tuple(model.inputs[0].shape)
    if any(d is None for d in shape[1:]):
        raise UnsupportedModelError(f"The model's input {shape} has a free size besides the batch; pass --data so "
                                    f"that sepconv knows what to feed it")
    x = np.random.default_rng(0).random((SYNTHETIC_SAMPLES, *shape[1:]), dtype=np.float32)
    info = DataInfo(
        source=None, test_source=None, validation_source=None, samples=SYNTHETIC_SAMPLES, labelled=False, scale=None,
        preprocessing=preprocessing, train_samples=0, calibration_samples=0, validation_samples=0,
        heldout_samples=SYNTHETIC_SAMPLES, heldout_labelled=False,
        description=f"no --data: verifying on {SYNTHETIC_SAMPLES} synthetic uniform [0, 1) inputs, judged by output "
                    f"similarity (pass --data for accuracy and a top-1 agreement check)")
    return RunData(None, None, None, Dataset(x, None, "synthetic uniform [0, 1) inputs"), info)


def _labelled_data(source, model, data_options: DataOptions) -> Dataset:
    """A data set read for `model`, its labels checked against the model's classes, and usable for a run."""
    data = load_data(source, model.input_shape, data_options)
    check_labels(data, int(model.outputs[0].shape[-1]))
    check_usable(data, MIN_SAMPLES)
    return data

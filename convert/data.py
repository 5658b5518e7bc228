"""Data a user brings: an .npz with x (and y), a folder of images in class sub-folders, or a flat folder of images;
and a run's data in its three roles (`datasets`).

Everything is turned into float32 images shaped like the model's input. Image files and integer arrays are scaled
by `DataOptions.scale` (then normalised by mean/std if given); float arrays are taken as already preprocessed, since
only the user knows how the model was trained.

Data up to `DataOptions.cache_mb` of decoded float32 images is read once into memory (a numpy array); larger data
streams: `Dataset.x` is then an `Images`, an array-like that reads the rows it is indexed with from disk (image files
decoded one by one, an .npz's rows by file offset, never memory-mapped: mapped pages would count as the process's
memory). Every stage takes its inputs in batches (graph.predict_keras, verification.run_artifact, fine-tuning's
tf.data pipeline), so a streamed run holds a few batches, the small calibration sample and the models, whatever the
number of images.

A run's data plays three roles, which never share a sample: train (with a part that calibrates), validation (every
choice) and test (scores and verification only); without data, synthetic test inputs. `datasets` returns them as a
RunData, with the DataInfo that the result and the manifests report.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import warnings
import weakref
import zipfile
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
CACHE_MB = 1024  # DataOptions.cache_mb's default: decoded data up to this size is kept in memory, larger data streams
READ_CHUNK = 256  # images per read when a streamed set is checked or read whole
CHECKED_SAMPLES = 256  # a streamed folder's constant-image check looks at this many images (an .npz: every row)
SPLIT_SEEDS = (0, 1)  # test held out of --data, then validation out of the rest

log = logging.getLogger("sepconv.convert")

if TYPE_CHECKING:  # options imports this module: the annotation only
    from sepconv.convert.options import ConvertOptions


@dataclass(frozen=True)
class DataOptions:
    """scale: how 0..255 pixels map to the model's range: 'unit' [0, 1], 'symmetric' [-1, 1] or 'raw' [0, 255];
    'auto' (the default) is 'raw' for a model with its own Rescaling layer at the input and 'unit' otherwise
    (`resolve_scale`; read without a model, 'unit').
    mean / std: per-channel normalisation applied after scaling ((x - mean) / std), e.g. ImageNet statistics.
    max_samples: read at most this many samples: a seeded random choice (classes in turn for image folders), so that
    a file sorted by label keeps its classes.
    cache_mb: a data file whose decoded float32 images take at most this many MiB is read once into memory; a larger
    one streams from disk (module doc); 0 streams everything."""

    scale: str = AUTO
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_samples: int | None = None
    cache_mb: int = CACHE_MB

    def __post_init__(self):
        if self.scale not in SCALES and self.scale != AUTO:
            raise InvalidOptionError(f"Unrecognized scale={self.scale!r}. Supported scales are: "
                                     f"{sorted(SCALES) + [AUTO]}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise InvalidOptionError(f"Unrecognized max_samples={self.max_samples!r}. Use a whole number >= 1")
        if not isinstance(self.cache_mb, int) or isinstance(self.cache_mb, bool) or self.cache_mb < 0:
            raise InvalidOptionError(f"Unrecognized cache_mb={self.cache_mb!r}. Use a whole number of MiB >= 0 (0: "
                                     f"stream every data file from disk)")
        if self.std is not None and any(s == 0 for s in self.std):
            raise InvalidOptionError(f"Unrecognized std={self.std!r}. Standard deviations must be non-zero")


@dataclass(frozen=True)
class Dataset:
    """Inputs shaped like the model's (float32: an array, or `Images` streamed from disk), optional integer labels,
    and where they came from."""

    x: np.ndarray | Images
    y: np.ndarray | None
    source: str
    class_names: tuple[str, ...] | None = None
    one_hot: int | None = None  # the width of the one-hot rows the labels were given as (None: class indices)
    origin: Images | None = None  # in memory, read from a file: where each row came from (its members)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, Images)

    def take(self, index) -> Dataset:
        x = self.x.take(index) if self.streamed else self.x[index]
        return Dataset(x, None if self.y is None else self.y[index], self.source, self.class_names, self.one_hot,
                       None if self.origin is None else self.origin.take(index))

    def members(self) -> list[str]:
        """What each sample is, in order: its file (folder-relative) or its row in the .npz it was read from; for
        arrays given to the API, its row."""
        if self.streamed or self.origin is not None:
            return (self.x if self.streamed else self.origin).members()
        return [str(i) for i in range(len(self.x))]

    def fingerprint(self) -> str:
        """sha256 of what the set holds: its members' identities and labels when streamed (a file's path, size and
        modification time; an .npz's rows and the file's), its values when in memory."""
        digest = hashlib.sha256()
        if self.streamed:
            digest.update("\n".join([*self.x.members(), self.x.identity()]).encode())
            arrays = (self.y,)
        else:
            arrays = (self.x, self.y)
        for array in arrays:
            if array is not None:
                array = np.ascontiguousarray(array)
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()


class Images:
    """A data file's images read on demand, shaped, scaled and normalised like the model's input: an array-like
    (len, shape, dtype, x[i], x[a:b], x[rows], np.asarray) over rows of a reader (_FolderReader, _ArrayReader).
    `take` gives a subset without reading anything; indexing reads and returns a float32 numpy array. np.asarray
    reads the whole set (with a warning when it is larger than the cache that decides streaming)."""

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, reader, rows: np.ndarray, options: DataOptions):
        self.reader, self.rows, self.options = reader, np.asarray(rows, np.int64), options

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.reader.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return self._read(self.rows[[key]])[0]
        return self._read(self.rows[key])

    def take(self, index) -> Images:
        return Images(self.reader, self.rows[index], self.options)

    def read(self) -> np.ndarray:
        """Every image, read in chunks into one array."""
        out = np.empty(self.shape, np.float32)
        for start in range(0, len(self), READ_CHUNK):
            out[start:start + READ_CHUNK] = self[start:start + READ_CHUNK]
        return out

    def __array__(self, dtype=None, copy=None):
        if self.nbytes > self.options.cache_mb << 20:
            log.warning(f"reading all {len(self):,} streamed images of {self.reader.source} into memory "
                        f"({self.nbytes / 2 ** 20:,.0f} MiB)", extra={"stage": "data"})
        x = self.read()
        return x if dtype is None else x.astype(dtype)

    def members(self) -> list[str]:
        return [self.reader.member(row) for row in self.rows]

    def identity(self) -> str:
        return self.reader.identity()

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return _normalise(self.reader.read(rows), self.options, scale=self.reader.scaled)


def load_data(source, input_shape, options: DataOptions = DataOptions()) -> Dataset:
    """Read `source` (.npz, or a folder of images) into a Dataset matching `input_shape` (batch dim first, ignored):
    in memory up to `options.cache_mb`, else streamed (module doc)."""
    path = Path(source)
    shape = tuple(input_shape[1:])
    if len(shape) != 3 or any(d is None for d in shape):
        raise DataError(f"--data needs a model with one image input of fixed size (H, W, C); this model's input is "
                        f"{tuple(input_shape)}; pass arrays through the Python API instead")
    _check_normalisation(options, shape[-1])
    check_source(path)
    lazy = _from_folder(path, shape, options) if path.is_dir() else _from_npz(path, shape, options)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # overflows are counted by _check_finite
        if lazy.x.nbytes <= options.cache_mb << 20:
            return _check_finite(replace(lazy, x=lazy.x.read(), origin=lazy.x))
        _check_streamed(lazy)
    return lazy


def check_source(source) -> None:
    """Raise DataError unless `source` names an existing folder or an .npz file whose array 'x' is a non-empty
    numeric array of images by its header (checked before any work: the CLI's parent runs it before TensorFlow
    starts, so that a wrong file costs no start-up; the pixels are checked when they are read)."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; pass an .npz file or a folder of images")
    if not path.is_dir() and path.suffix.lower() != ".npz":
        raise DataError(f"{path}: unrecognized data file; pass an .npz with arrays 'x' (and 'y') or a folder of images")
    if not path.is_dir():
        with _npz_member(path) as (archive, info):
            with archive.open(info) as member:
                shape, _, dtype = _npy_header(member)
        _check_kind(dtype, shape, path)


@contextlib.contextmanager
def _npz_member(path: Path):
    """(the open archive, its 'x.npy' member's info); DataError for a file that is not a readable .npz with 'x'."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "x.npy" not in archive.namelist():
                found = sorted(name.removesuffix(".npy") for name in archive.namelist())
                raise DataError(f"{path}: has no array 'x' (found: {found}); save it with numpy.savez(path, "
                                f"x=images, y=labels)")
            yield archive, archive.getinfo("x.npy")
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, struct.error) as error:
        raise DataError(f"{path}: cannot be read as .npz ({first_line(error, 200)}); save it with "
                        f"numpy.savez(path, x=images, y=labels)") from error


def _npy_header(stream) -> tuple[tuple, bool, np.dtype]:
    """(shape, Fortran order, dtype) from an .npy stream at its start; the stream is left after the header."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_2_0 if version == (2, 0) else np.lib.format.read_array_header_1_0
    return read_header(stream)


def _check_normalisation(options: DataOptions, channels: int) -> None:
    """--mean / --std give one value per channel of the model's input (or one value for all)."""
    for name, values in (("mean", options.mean), ("std", options.std)):
        if values is not None and len(values) not in (1, channels):
            raise InvalidOptionError(f"--{name} has {len(values)} values {list(values)} but the model's input has "
                                     f"{channels} channels; give {channels} comma-separated values (or one for all)")


def _check_finite(data: Dataset) -> Dataset:
    """NaN or infinite inputs would train and calibrate a model that outputs NaN: refuse them, saying how many."""
    bad = samples = 0
    for start in range(0, len(data), READ_CHUNK):
        chunk = np.asarray(data.x[start:start + READ_CHUNK])
        finite = np.isfinite(chunk)
        bad += int(finite.size - np.count_nonzero(finite))
        samples += int(np.count_nonzero(~finite.reshape(len(finite), -1).all(axis=1)))
    if bad:
        raise DataError(f"{data.source}: {bad:,} non-finite values (NaN or infinity) in {samples:,} of {len(data):,} "
                        f"samples, after conversion to float32 and --mean/--std; remove or repair those samples")
    return data


def _check_streamed(data: Dataset) -> None:
    """A streamed set's checks without holding it: an .npz of floats is read through once for non-finite values; a
    folder's every file is opened as an image (its header: the kind and the declared size, not its pixels, which a
    stage decodes when it reads them); images that are all one constant value are looked for in every row of an .npz
    and in the first CHECKED_SAMPLES (seeded order) of a folder."""
    if isinstance(data.x.reader, _ArrayReader) and not data.x.reader.scaled:
        _check_finite(data)
    if isinstance(data.x.reader, _FolderReader):  # every file's header now; its pixels when a stage reads it
        for path in data.x.reader.files:
            _check_header(path)
    rows = len(data) if isinstance(data.x.reader, _ArrayReader) else min(len(data), CHECKED_SAMPLES)
    low, high = np.inf, -np.inf
    for start in range(0, rows, READ_CHUNK):
        chunk = data.x[start:min(rows, start + READ_CHUNK)]
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if low == high:
        raise DataError(f"{data.source}: all {rows:,} images read are the same constant value {low:g}; this is not "
                        f"image data: pass the real images")


def _check_kind(dtype: np.dtype, shape: tuple, path: Path) -> None:
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or len(shape) not in (3, 4) or shape[0] == 0:
        raise DataError(f"{path}: 'x' must be a non-empty numeric array of images (N, H, W[, C]); got dtype "
                        f"{dtype} and shape {shape}")


class _FolderReader:
    """Image files, decoded and resized one by one (pixels 0..255)."""

    scaled = True

    def __init__(self, root: Path, files: list[Path], shape):
        self.root, self.files, self.shape, self.source = root, files, shape, str(root)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), np.float32)
        for k, row in enumerate(rows):
            out[k] = _read_image(self.files[row], self.shape)
        return out

    def member(self, row: int) -> str:
        return self.files[row].relative_to(self.root).as_posix()

    def identity(self) -> str:
        stats = (f.stat() for f in self.files)
        return hashlib.sha256("".join(f"{s.st_size}:{s.st_mtime_ns};" for s in stats).encode()).hexdigest()


class _ArrayReader:
    """The rows of the array 'x' of an .npz, read by offset from the file (an uncompressed .npz, as numpy.savez
    writes) or from a temporary copy of the member (numpy.savez_compressed), or from memory (a Fortran-ordered
    array, which numpy can only load whole); then channels and size fitted (_fit)."""

    def __init__(self, path: Path, shape):
        self.source, self.shape, self.array = str(path), shape, None
        with _npz_member(path) as (archive, info):
            if info.compress_type == zipfile.ZIP_STORED:
                self.file, start = path, _member_start(path, info.header_offset)
            else:
                self.file, start = self._unpacked(archive), 0
            with open(self.file, "rb") as stream:
                stream.seek(start)
                self.rows_shape, fortran, self.dtype = _npy_header(stream)
                self.offset = stream.tell()
        _check_kind(self.dtype, self.rows_shape, path)
        if fortran:
            with np.load(path, allow_pickle=False) as archive:
                self.array = np.ascontiguousarray(archive["x"])
        self.scaled = bool(np.issubdtype(self.dtype, np.integer))
        self.count = self.rows_shape[0]
        self.row_bytes = int(np.prod(self.rows_shape[1:])) * self.dtype.itemsize

    def _unpacked(self, archive: zipfile.ZipFile) -> Path:
        handle, name = tempfile.mkstemp(prefix="sepconv-data-", suffix=".npy")
        weakref.finalize(self, os.unlink, name)
        with os.fdopen(handle, "wb") as target, archive.open("x.npy") as member:
            shutil.copyfileobj(member, target, 1 << 20)
        return Path(name)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self.array is not None:
            raw = self.array[rows]
        else:
            raw = np.empty((len(rows), *self.rows_shape[1:]), self.dtype)
            with open(self.file, "rb") as stream:
                handle, start = stream.fileno(), 0
                while start < len(rows):  # a run of consecutive rows is one read
                    stop = start + 1
                    while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                        stop += 1
                    data = os.pread(handle, self.row_bytes * (stop - start), self.offset + int(rows[start]) *
                                    self.row_bytes)
                    raw[start:stop] = np.frombuffer(data, self.dtype).reshape((stop - start, *self.rows_shape[1:]))
                    start = stop
        if raw.ndim == 3:
            raw = raw[..., None]
        return _fit(raw.astype(np.float32), self.shape, self.source)

    def member(self, row: int) -> str:
        return str(int(row))

    def identity(self) -> str:
        stat = Path(self.source).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"


def _member_start(path: Path, header_offset: int) -> int:
    """Where an uncompressed zip member's data starts: after its local header (30 bytes, its name and extra field)."""
    with open(path, "rb") as stream:
        stream.seek(header_offset)
        local = stream.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ValueError("bad local file header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return header_offset + 30 + name_length + extra_length


def _from_npz(path: Path, shape, options: DataOptions) -> Dataset:
    reader = _ArrayReader(path, shape)
    y = _npz_labels(path)
    count = reader.count
    rows = np.arange(count)
    if options.max_samples and options.max_samples < count:
        rows = np.sort(np.random.default_rng(SEED).choice(count, options.max_samples, replace=False))
        y = y[rows] if y is not None and np.ndim(y) >= 1 and len(y) == count else y
    width = int(y.shape[1]) if y is not None and np.ndim(y) == 2 and y.shape[1] > 1 else None
    if reader.rows_shape[-1] not in (1, shape[-1]) and len(reader.rows_shape) == 4:
        reader.read(rows[:1])  # the channel check's error, before anything else
    return Dataset(Images(reader, rows, options), _labels(y, len(rows), path), str(path), one_hot=width)


def _npz_labels(path: Path):
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["y"] if "y" in archive.files else None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: 'y' cannot be read ({first_line(error, 200)}); save it with numpy.savez(path, "
                        f"x=images, y=labels)") from error


def _from_folder(path: Path, shape, options: DataOptions) -> Dataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(f, label) for label, name in enumerate(classes) for f in _images_in(path / name)]
    else:
        files = [(f, None) for f in _images_in(path)]
    if not files:
        raise DataError(f"{path}: holds no images ({', '.join(IMAGE_SUFFIXES)}), directly or in class sub-folders")
    if shape[-1] not in (1, 3):
        raise DataError(f"The model takes {shape[-1]}-channel images; image folders can feed 1 (grayscale) or 3 (RGB) "
                        f"channels; pass an .npz instead")
    order = np.random.default_rng(SEED).permutation(len(files))  # read class by class, used in a random order
    files = [files[i] for i in order]
    if options.max_samples:
        files = _interleave(files, options.max_samples)
    y = np.array([label for _, label in files], dtype=np.int64) if classes else None
    reader = _FolderReader(path, [f for f, _ in files], shape)
    return Dataset(Images(reader, np.arange(len(files)), options), y, str(path), tuple(classes) or None)


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
    from PIL import Image

    height, width, channels = shape
    if channels not in (1, 3):
        raise DataError(f"The model takes {channels}-channel images; image folders can feed 1 (grayscale) or 3 (RGB) "
                        f"channels; pass an .npz instead")
    with _opened(path) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32)
    return array[..., None] if channels == 1 else array


def _check_header(path: Path) -> None:
    """`path` opens as an image of at most MAX_IMAGE_PIXELS (its header only; _opened)."""
    with _opened(path):
        pass


@contextlib.contextmanager
def _opened(path: Path):
    """PIL's image of `path`, its declared size judged before anything is decoded, and every way the file or its
    decoding can fail in the block as one DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixels(path, image.width, image.height)
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: refused as a possible decompression bomb ({error}); images may have at most "
                        f"{MAX_IMAGE_PIXELS:,} pixels: shrink or remove the file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path}: cannot be read as an image ({error}); remove or replace the file") from error


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
    """Refuse data that cannot carry a run: too few samples for its three roles, or images that are all the same (a
    streamed set was looked at when it was opened: _check_streamed)."""
    if len(data) < minimum:
        raise DataError(f"{data.source}: only {len(data)} samples; a run needs at least {minimum} (some to train and "
                        f"calibrate on, some to validate, some to test); pass more images")
    if not data.streamed and float(np.ptp(data.x)) == 0.0:
        raise DataError(f"{data.source}: all {len(data)} images are the same constant value {float(data.x.flat[0]):g}; "
                        f"this is not image data: pass the real images")


def split(data: Dataset, heldout: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(kept, held-out): `heldout` of the samples (at least one each side), each in a seeded random order; see
    `stratified_split`."""
    if len(data) < 2:
        raise DataError(f"{data.source}: needs at least 2 samples (some to calibrate or train on, some held out); "
                        f"got {len(data)}")
    kept, held = stratified_split(data.y, len(data), heldout, seed)
    return data.take(kept), data.take(held)


def stratified_split(labels: np.ndarray | None, count: int, fraction: float, seed: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """(kept, held) sample indices: round(count * fraction) held (at least one, and one kept), each class in
    proportion to its size (the largest remainders get the odd ones), drawn with `seed`; each side in a seeded random
    order. Without labels, a seeded random choice."""
    rng = np.random.default_rng(seed)
    cut = min(count - 1, max(1, int(round(count * fraction))))
    groups = [np.arange(count)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    quotas = np.array([len(group) * cut / count for group in groups])
    take = np.floor(quotas).astype(int)
    take[np.argsort(take - quotas, kind="stable")[:cut - int(take.sum())]] += 1
    kept, held = [], []
    for group, share in zip(groups, take):
        order = rng.permutation(group)
        held.append(order[:share])
        kept.append(order[share:])
    return rng.permutation(np.concatenate(kept)), rng.permutation(np.concatenate(held))


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
    streamed: bool = False  # some role streams from disk (larger than DataOptions.cache_mb)
    roles: dict | None = None  # each role's members (role_record): the split a resumed run and the test data check

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
        rest, test = split(data, heldout=options.heldout_fraction, seed=SPLIT_SEEDS[0])
    if options.validation_data:
        train = rest.take(np.random.default_rng(SPLIT_SEEDS[1]).permutation(len(rest)))  # all of it, shuffled
        validation = _labelled_data(options.validation_data, model, data_options)
    else:
        train, validation = split(rest, heldout=options.validation_fraction, seed=SPLIT_SEEDS[1])
    calibration = train.take(np.arange(min(options.calibration_samples, len(train))))
    labels = "labelled" if data.y is not None else "unlabelled"
    held = f"{len(test)} from {test.source}" if options.test_data else f"{len(test)} held out"
    streamed = any(role.streamed for role in (train, validation, test))
    where = "streamed from disk in batches" if streamed else "held in memory"
    info = DataInfo(
        source=data.source, test_source=test.source if options.test_data else None,
        validation_source=validation.source if options.validation_data else None,
        samples=len(data), labelled=data.y is not None, scale=data_options.scale, preprocessing=preprocessing,
        train_samples=len(train), calibration_samples=len(calibration), validation_samples=len(validation),
        heldout_samples=len(test), heldout_labelled=test.y is not None, streamed=streamed,
        roles={role: role_record(each) for role, each in (("train", train), ("validation", validation),
                                                           ("test", test))},
        description=f"{len(data)} {labels} samples from {data.source} ({scale_note}; {where}): {len(train)} to train "
                    f"on (a random {len(calibration)} of them also calibrate), {len(validation)} to validate (every "
                    f"choice), {held} to test (scoring and verification only)")
    return RunData(train, calibration.x.read() if calibration.streamed else calibration.x, validation, test, info)


def sample_pool(train: Dataset, least: int):
    """The training images int8's better-calibration attempt draws its sample from (export/quantization.py): all of
    them in memory; streamed, the first of the seeded training order that fit in a quarter of the cache (at least
    `least`, the calibration sample's size), since the attempt reads its sample whole."""
    if not train.streamed:
        return train.x
    fit = (train.x.options.cache_mb << 18) // max(1, train.x.nbytes // max(1, len(train)))
    return train.x.take(np.arange(min(len(train), max(least, fit))))


def role_record(data: Dataset) -> dict:
    """A role's record in the manifest: its source, how many samples (per class when labelled), whether it streamed,
    and the sha256 of its members in order (files relative to a folder, or rows of an .npz; `Dataset.members`), so
    that a later run can check it holds the same split (the split is seeded and stratified: data.split)."""
    members = data.members()
    record = {"source": data.source, "samples": len(data), "streamed": data.streamed,
              "members_sha256": hashlib.sha256("\n".join(members).encode()).hexdigest()}
    if data.y is not None:
        names = data.class_names or tuple(str(c) for c in range(int(data.y.max()) + 1 if len(data.y) else 0))
        counts = np.bincount(data.y, minlength=len(names))
        record["per_class"] = {name: int(n) for name, n in zip(names, counts)}
    return record


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

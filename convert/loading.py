"""Loading untrusted Keras model files safely, with one clear error per way a file can be wrong.

`load` looks at the file before Keras does: what kind it is (by its first bytes, not only its name), whether it has an
architecture, whether it holds Python code (Lambda layers, refused in safe mode). Only then does Keras rebuild it,
always with `safe_mode` on unless the caller turns it off, and without compiling it (losses and optimizers of the
training run are not needed, and custom ones would fail the load).
"""

from __future__ import annotations

import importlib
import json
import re
import zipfile
from pathlib import Path
from typing import Iterable

from sepconv.convert.errors import (
    CorruptModelFileError,
    EmptyModelFileError,
    InvalidOptionError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    SavedModelError,
    UnknownObjectError,
    UnsafeModelError,
    UnsupportedModelError,
    WeightsOnlyFileError,
    WrongFileKindError,
)
from sepconv.convert.graph import leaf_layers
from sepconv.deploy.files import first_line, temporary_folder

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
GRAPH_MODEL_CLASSES = {"Functional", "Sequential", "Model"}
_RESAVE = "load it where it was made and save it with model.save('model.keras')"
# What a model file may expand to when Keras reads it (zip members, HDF5 datasets), unless the caller says otherwise:
# Keras stores .keras members and .h5 weights uncompressed (ratio ~1), so 100x the file's size is generous, with a
# floor for small files and a cap whatever the file's size. A 1 MB zip bomb declaring gigabytes is refused.
MAX_EXPANSION = 100
UNPACKED_FLOOR = 1 << 28  # 256 MiB
UNPACKED_CAP = 1 << 34  # 16 GiB


def load(path, *, custom_objects: dict | None = None, safe_mode: bool = True, max_unpacked_bytes: int | None = None):
    """Load a `.keras` or `.h5` Keras model (Keras 3 or Keras 2 / tf.keras) for reading; it is not compiled.

    custom_objects: {name: class or function} for custom layers, activations, ... the model names.
    safe_mode: leave on for files you did not make: it refuses Lambda layers holding Python bytecode.
    max_unpacked_bytes: what the file's zip members or HDF5 datasets may declare in total before anything is
    unpacked (default: `unpacked_limit(file size)`); a file declaring more is refused as a possible zip bomb.
    Raises a `ModelLoadError` subclass naming the problem and its fix.
    """
    path = Path(path)
    kind = file_kind(path)
    if max_unpacked_bytes is not None and (not isinstance(max_unpacked_bytes, int) or max_unpacked_bytes < 1):
        raise InvalidOptionError(f"Unrecognized max_unpacked_bytes={max_unpacked_bytes!r}. Use a whole number >= 1")
    limit = max_unpacked_bytes or unpacked_limit(path.stat().st_size)
    config = _read_config(path, kind, limit)
    if safe_mode:
        _refuse_lambdas(path, config)
    _check_top_level_class(path, config, custom_objects or {})
    return _check_names(path, _keras_load(path, kind, custom_objects, safe_mode))


# TensorFlow's name scope patterns (tensorflow/python/framework/ops.py): every export traces the model under its name,
# and each layer under its own; Keras accepts names these refuse ("m<b>x"), which then fail deep inside a converter
_ROOT_SCOPE = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")
_SCOPE = re.compile(r"[A-Za-z0-9_.\\/>-]*")


def _check_names(path: Path, model):
    """`model`, unless its name or a layer's is one TensorFlow cannot trace under (UnsupportedModelError, naming
    them and the fix)."""
    bad = [] if _ROOT_SCOPE.fullmatch(model.name) else [f"the model {model.name!r}"]
    seen = set()
    for layer_path, _ in leaf_layers(model):
        for part in layer_path.split("/"):
            if part not in seen and not _SCOPE.fullmatch(part):
                bad.append(repr(part))
            seen.add(part)
    if bad:
        raise UnsupportedModelError(
            f"{path}: {', '.join(bad[:3])}{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: names TensorFlow "
            f"refuses when it traces the model for export (letters, digits and . _ - / > only); rename them "
            f"(name=... when building, or layer.name / model.name) and save the model again")
    return model


def file_kind(path: Path) -> str:
    """'keras' (zip archive) or 'h5' (HDF5), judged by content; every other case raises (TensorFlow-free: the CLI
    checks the model file with it before its worker starts)."""
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory; check the path")
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            raise SavedModelError(
                f"{path}: is a TensorFlow SavedModel directory, which Keras 3 cannot rebuild layer by layer; "
                f"{_RESAVE} (or .h5)")
        raise WrongFileKindError(f"{path}: is a directory, not a model file; pass a .keras or .h5 file")
    size = path.stat().st_size
    if size == 0:
        raise EmptyModelFileError(f"{path}: the file is empty (0 bytes), probably an interrupted save or copy; "
                                  f"save the model again")
    with path.open("rb") as file:
        head = file.read(8)
    suffix = path.suffix.lower()
    if head == HDF5_SIGNATURE:
        return "h5"
    if head.startswith(ZIP_SIGNATURE):
        return "keras"
    if head[4:8] == b"TFL3":
        raise WrongFileKindError(f"{path}: is a TFLite model; sepconv needs the Keras model (.keras or .h5) it was "
                                 f"converted from")
    if suffix == ".onnx":
        raise WrongFileKindError(f"{path}: is an ONNX model; sepconv needs the Keras model (.keras or .h5) it was "
                                 f"exported from")
    if suffix == ".pb":
        raise SavedModelError(f"{path}: is a TensorFlow graph file; pass the SavedModel's Keras model instead: "
                              f"{_RESAVE}")
    if suffix in (".keras", ".h5", ".hdf5"):
        raise CorruptModelFileError(f"{path}: is not a valid {suffix} file (its first bytes are neither HDF5 nor "
                                    f"zip); the file is damaged or truncated: save or copy it again")
    raise WrongFileKindError(f"{path}: unrecognized model file; sepconv loads Keras models saved as .keras or .h5")


def unpacked_limit(file_bytes: int) -> int:
    """The default bound on what a model file of this size may expand to (see MAX_EXPANSION)."""
    return min(max(MAX_EXPANSION * file_bytes, UNPACKED_FLOOR), UNPACKED_CAP)


def _check_unpacked(path: Path, declared: int, limit: int) -> None:
    if declared > limit:
        raise ModelTooLargeError(
            f"{path}: declares {declared:,} bytes unpacked from {path.stat().st_size:,} bytes on disk, more than the "
            f"{limit:,} allowed (a possible zip bomb); only for a file you trust, raise the bound with "
            f"--max-unpacked-mb (load(..., max_unpacked_bytes=...))")


def _h5_bytes(h5) -> int:
    """Bytes the HDF5 file's datasets declare (shape x item size), read from metadata only."""
    import h5py

    total = [0]

    def add(name, node):
        if isinstance(node, h5py.Dataset):
            total[0] += int(node.size or 0) * node.dtype.itemsize

    h5.visititems(add)
    return total[0]


def _read_config(path: Path, kind: str, limit: int) -> dict:
    """The model's architecture as JSON, read without building anything (or unpacking more than `limit`)."""
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as archive:
                _check_unpacked(path, sum(info.file_size for info in archive.infolist()), limit)
                if "config.json" not in archive.namelist():
                    raise CorruptModelFileError(f"{path}: is a zip archive without config.json, not a Keras model "
                                                f"archive; save the model with model.save('model.keras')")
                text = archive.read("config.json").decode("utf-8")
        else:
            import h5py

            with h5py.File(path, "r") as h5:
                _check_unpacked(path, _h5_bytes(h5), limit)
                text = h5.attrs.get("model_config")
                if text is None:
                    raise WeightsOnlyFileError(
                        f"{path}: holds weights only, no architecture; build the model in code, call "
                        f"model.load_weights('{path.name}'), then save it whole with model.save('model.keras')")
                if isinstance(text, bytes):
                    text = text.decode("utf-8")
        config = json.loads(text)
    except ModelLoadError:
        raise
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, UnicodeDecodeError) as error:
        raise CorruptModelFileError(f"{path}: cannot be read ({first_line(error)}); the file is damaged or "
                                    f"truncated: save or copy it again") from error
    if not isinstance(config, dict) or "class_name" not in config:
        raise CorruptModelFileError(f"{path}: its model configuration is not a Keras model config; save the model "
                                    f"again with model.save('model.keras')")
    return config


def _walk_configs(node) -> Iterable[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_configs(value)


def _holds_bytecode(layer_config: dict) -> bool:
    """A Lambda whose function is Python bytecode (Keras 3: '__lambda__'; Keras 2: function_type 'lambda')."""
    inner = layer_config.get("config") or {}
    function = inner.get("function")
    if isinstance(function, dict) and function.get("class_name") == "__lambda__":
        return True
    return inner.get("function_type") == "lambda" or (
        isinstance(function, (list, tuple)) and inner.get("function_type") != "function")


def _refuse_lambdas(path: Path, config: dict) -> None:
    names = [
        (c.get("config") or {}).get("name", "?")
        for c in _walk_configs(config)
        if c.get("class_name") == "Lambda" and _holds_bytecode(c)
    ]
    if names:
        raise UnsafeModelError(
            f"{path}: Lambda layer(s) {names} hold Python bytecode, which runs arbitrary code when loaded; safe mode "
            f"refuses them. Only if you trust this file: load(..., safe_mode=False) (CLI: --unsafe-allow-lambda)")


def _check_top_level_class(path: Path, config: dict, custom_objects: dict) -> None:
    name = config.get("class_name")
    registered = config.get("registered_name") or name
    if name in GRAPH_MODEL_CLASSES or name in custom_objects or registered in custom_objects:
        return
    if config.get("module") in ("keras", "keras.models", "keras.src.models.functional"):
        return
    import keras

    if keras.saving.get_registered_object(registered) is None:
        raise UnsupportedModelError(
            f"{path}: is a subclassed model (class {name!r}) whose code is not available; sepconv rewrites Functional "
            f"and Sequential models: rebuild it as one, or pass custom_objects={{{name!r}: {name}}} to load it")


def _keras_load(path: Path, kind: str, custom_objects: dict | None, safe_mode: bool):
    import keras

    if kind == "h5":  # Keras 2 files: layers whose saved configs carry keys Keras 3 refuses
        custom_objects = {**_keras2_shims(), **(custom_objects or {})}
    try:
        if kind == "keras" and path.suffix.lower() != ".keras":
            return _load_renamed(path, ".keras", custom_objects, safe_mode)
        if kind == "h5" and path.suffix.lower() not in (".h5", ".hdf5"):
            return _load_renamed(path, ".h5", custom_objects, safe_mode)
        return keras.saving.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)
    except ModelLoadError:
        raise
    except Exception as error:  # Keras raises ValueError, TypeError, KeyError ... with long multi-line messages
        raise _translate(path, error) from error


# Keys tf.keras (Keras 2) wrote into these layers' configs that Keras 3's constructors refuse ("Unrecognized keyword
# arguments passed to SeparableConv2D: {'groups': 1, 'kernel_initializer': ...}"); they have no effect on these layers.
_KERAS2_EXTRA_KEYS = {
    "SeparableConv2D": ("groups", "kernel_initializer", "kernel_regularizer", "kernel_constraint"),
    "DepthwiseConv2D": ("groups", "kernel_initializer", "kernel_regularizer", "kernel_constraint"),
}


def _keras2_shims() -> dict:
    """{class name: an object whose from_config drops the Keras 2-only keys and builds the real Keras 3 layer}."""
    import keras

    def shim(layer_class, extra):
        class Keras2Config:
            @classmethod
            def from_config(cls, config):
                return layer_class.from_config({k: v for k, v in config.items() if k not in extra})

        Keras2Config.__name__ = layer_class.__name__
        return Keras2Config

    return {name: shim(getattr(keras.layers, name), extra) for name, extra in _KERAS2_EXTRA_KEYS.items()}


def _load_renamed(path: Path, suffix: str, custom_objects, safe_mode):
    """Keras picks the format by file name; load a misnamed file through a link with the right suffix."""
    import keras

    with temporary_folder("sepconv-load-") as tmp:
        link = Path(tmp) / (path.stem + suffix)
        link.symlink_to(path.resolve())
        return keras.saving.load_model(link, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)


def _translate(path: Path, error: Exception) -> ModelLoadError:
    text = str(error)
    missing = re.search(r"(?:Could not locate (?:class|function)|Unknown (?:layer|object|activation|function)"
                        r"[^:]*):?\s*'?([\w.>-]+)'?", text)
    if missing:
        name = missing.group(1)
        return UnknownObjectError(
            f"{path}: uses custom object {name!r} that is not registered; pass custom_objects={{'{name}': ...}} "
            f"(CLI: --custom-objects module:{name}) or decorate it with @keras.saving.register_keras_serializable()")
    if "safe_mode" in text or "unsafe" in text.lower():
        return UnsafeModelError(f"{path}: Keras refused to load it in safe mode ({first_line(error)}); only if you "
                                f"trust this file: load(..., safe_mode=False) (CLI: --unsafe-allow-lambda)")
    return ModelLoadError(f"{path}: Keras could not rebuild the model ({type(error).__name__}: {first_line(error)}); "
                          f"run with --debug for the full trace")


def parse_custom_objects(specs: Iterable[str]) -> dict:
    """Turn ['pkg.module:Name', 'pkg.module'] into a custom_objects dict.

    'module:attr' imports one object; a bare 'module' takes every public class and function the module defines.
    """
    objects = {}
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name:
            raise InvalidOptionError(f"Unrecognized custom object {spec!r}. Use 'module:Name' or 'module'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise InvalidOptionError(f"Cannot import module {module_name!r} for custom objects ({error}); check "
                                     f"the name and that it is on PYTHONPATH") from error
        if attr:
            if not hasattr(module, attr):
                raise InvalidOptionError(f"Module {module_name!r} has no attribute {attr!r}; check --custom-objects "
                                         f"{spec}")
            objects[attr] = getattr(module, attr)
        else:
            objects.update({
                name: value for name, value in vars(module).items()
                if not name.startswith("_") and callable(value) and getattr(value, "__module__", None) == module.__name__
            })
    return objects

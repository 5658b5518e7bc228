"""Assertion helpers shared by the tests. They assert; they never return a bool to be forgotten."""

import keras
import numpy as np

# Float rewrites at full rank are exact up to float32 summation order: the separable form adds the same products in
# another order (depthwise, then pointwise), so differences are ~1e-6 of the output scale. 1e-4 is the contract.
EXACT_RTOL = 1e-4


def outputs(model, inputs):
    result = model(inputs, training=False)
    return [np.asarray(keras.ops.convert_to_numpy(r), dtype=np.float64) for r in keras.tree.flatten(result)]


def assert_same_outputs(original, separated, inputs, rtol=EXACT_RTOL, what="separated model"):
    """Relative max error max|b - a| / max|a| <= rtol, per output."""
    expected, actual = outputs(original, inputs), outputs(separated, inputs)
    assert len(expected) == len(actual), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for index, (a, b) in enumerate(zip(expected, actual)):
        scale = max(float(np.max(np.abs(a))), 1e-30)
        np.testing.assert_allclose(
            b, a, rtol=0, atol=rtol * scale,
            err_msg=f"{what}: output {index} differs from the original by more than {rtol} of its max |value| {scale}")


def random_inputs(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [tuple(batch if d is None else d for d in t.shape) for t in model.inputs]
    values = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    return values[0] if len(values) == 1 else values


def count_layers(model, cls):
    """Number of distinct layers of exactly class `cls`, nested models included."""
    seen = {}
    for layer in model._flatten_layers(include_self=False):
        if type(layer) is cls:
            seen[id(layer)] = layer
    return len(seen)


def layers_by_path(model, prefix=""):
    """{path: layer} for every leaf layer, nested Functional/Sequential models expanded (their inputs left out)."""
    found = {}
    for layer in model.layers:
        if prefix and isinstance(layer, keras.layers.InputLayer):
            continue
        path = prefix + layer.name
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            found.update(layers_by_path(layer, path + "/"))
        else:
            found[path] = layer
    return found


def snapshot(model):
    return [(w.path, np.array(w.numpy())) for w in model.weights]


def assert_snapshot_equal(before, after, what="model"):
    assert [p for p, _ in before] == [p for p, _ in after], f"{what}: its variables changed"
    for (path, a), (_, b) in zip(before, after):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: variable {path} changed")


def write_file(path, data: bytes):
    """Write `data` to `path` and return the path (for bad-input cases built inline)."""
    path.write_bytes(data)
    return path


def save_npz(path, **arrays):
    """np.savez `arrays` to `path` and return the path."""
    np.savez(path, **arrays)
    return path


def zip_bomb(path, model, unpacked_mib=320):
    """`model` saved as a .keras archive whose weights member is padded with zeros: a few hundred KB on disk that
    declare `unpacked_mib` MiB (Keras reads the member; it loads, and takes that much memory, unless refused)."""
    import zipfile

    model.save(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            if name != "model.weights.h5":
                archive.writestr(name, data)
        with archive.open("model.weights.h5", "w", force_zip64=True) as member:
            member.write(members["model.weights.h5"])
            for _ in range(unpacked_mib):
                member.write(bytes(1 << 20))
    return path


def png_claiming(path, width, height):
    """A PNG of a few hundred bytes whose header claims width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(4096)))
                     + chunk(b"IEND", b""))
    return path

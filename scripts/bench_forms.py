"""The two equivalent forms of a separable layer with depth multiplier K (convert/export/forms.py), timed side by
side: for each layer shape (input size, channels in and out; 3x3, stride 1, same padding, ReLU) and K, a single-layer
model exported in the standard form and in the tiled form, with the K = 1 layer and the Conv2D it replaces beside
them; every model of one format in ONE interleaved bench-model run (sepconv.deploy.timing), 1 thread, XNNPACK on for
TFLite. Each tiled export is checked against its Keras model first (float32, np.testing.assert_allclose).

usage: scripts/bench-forms [--formats tflite,onnx] [--quantize int8] [--ks 2,4] [--min-time 1] [--out build/forms]
Prints Markdown: per format, p50 of each model and the standard/tiled ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_zoo import cpu  # noqa: E402

SHAPES = ((32, 16, 16), (16, 32, 32), (8, 64, 64), (56, 64, 64))  # (input height = width, channels in, channels out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="tflite,onnx")
    parser.add_argument("--quantize", default="int8", help="the export mode (int8, none, ...)")
    parser.add_argument("--ks", default="2,4", help="depth multipliers above 1")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per model")
    parser.add_argument("--out", type=Path, default=Path("build/forms"))
    args = parser.parse_args(argv)
    from sepconv.deploy.timing import TimingOptions, time_artifacts

    ks = [int(k) for k in args.ks.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{cpu()}; 1 thread; {args.quantize}; p50 in microseconds, every model of a format in one interleaved run\n")
    for fmt in args.formats.split(","):
        paths = {}
        for shape in SHAPES:
            for name, model, forms in models(shape, ks):
                stem = "_".join(map(str, shape)) + f"_{name}"
                paths[(shape, name)] = export(model, forms, fmt, args.quantize, args.out / f"{stem}.{fmt}")
        timing = time_artifacts(list(paths.values()), None, TimingOptions(min_seconds=args.min_time))
        us = {key: timing.p50_ms[str(path)] * 1000 for key, path in paths.items()}
        print(f"### {fmt} {args.quantize} ({timing.runtime})\n")
        print("| layer (HxW, in -> out) | Conv2D | K=1 | " + " | ".join(
            f"K={k} standard | K={k} tiled | K={k} standard / tiled" for k in ks) + " |")
        print("|---" * (3 + 3 * len(ks)) + "|")
        for shape in SHAPES:
            cells = [label(shape), f"{us[(shape, 'conv')]:.1f}", f"{us[(shape, 'K1')]:.1f}"]
            for k in ks:
                standard, tiled = us[(shape, f"K{k}_standard")], us[(shape, f"K{k}_tiled")]
                cells += [f"{standard:.1f}", f"{tiled:.1f}", f"{standard / tiled:.2f}x"]
            print("| " + " | ".join(cells) + " |")
        print()
    return 0


def models(shape, ks):
    """(name, Keras model, forms) per model timed for one layer shape."""
    import keras

    from sepconv.convert.export.forms import TILED

    size, cin, cout = shape

    def one(layer):
        x_in = keras.Input((size, size, cin))
        return keras.Model(x_in, layer(x_in))

    yield "conv", one(keras.layers.Conv2D(cout, 3, padding="same", activation="relu")), ()
    yield "K1", one(keras.layers.SeparableConv2D(cout, 3, padding="same", activation="relu")), ()
    for k in ks:
        model = one(keras.layers.SeparableConv2D(cout, 3, depth_multiplier=k, padding="same", activation="relu",
                                                 name="s"))
        yield f"K{k}_standard", model, ()
        yield f"K{k}_tiled", model, (("s", TILED),)


def export(model, forms, fmt: str, quantize: str, path: Path) -> Path:
    from sepconv.convert.export.onnx import OnnxOptions, export_onnx
    from sepconv.convert.export.tflite import TFLiteOptions, export_tflite
    from sepconv.convert.graph import predict_keras
    from sepconv.deploy.runtime import open_runtime

    rng = np.random.default_rng(0)
    samples = rng.uniform(0, 1, (16, *model.inputs[0].shape[1:])).astype(np.float32)
    if fmt == "tflite":
        data = export_tflite(model, representative_data=samples, options=TFLiteOptions(quantize=quantize, forms=forms))
        check = export_tflite(model, options=TFLiteOptions(forms=forms))
    else:
        data = export_onnx(model, representative_data=samples, options=OnnxOptions(quantize=quantize, forms=forms))
        check = export_onnx(model, options=OnnxOptions(forms=forms))
    if forms:  # the float32 export of the form computes the Keras model's function
        float_path = path.with_name(path.stem + "_float" + path.suffix)
        float_path.write_bytes(check)
        expected = predict_keras(model, samples[:2])[0]
        got = np.concatenate([open_runtime(float_path).run([samples[i:i + 1]])[0] for i in range(2)])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=f"{path.name}: the tiled form must compute the standard one's function")
        float_path.unlink()
    path.write_bytes(data)
    return path


def label(shape) -> str:
    size, cin, cout = shape
    return f"{size}x{size}, {cin} -> {cout}"


if __name__ == "__main__":
    raise SystemExit(main())

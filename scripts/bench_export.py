"""Every export mode on the digits demo model, with and without separation: size, accuracy, agreement.

usage: scripts/bench-export [--out build/demo] [--rank 4]   (trains the demo model first if it is not cached)
Each row is a real convert_model run (no refinement or fine-tuning: export only; int8 calibrated on training
digits, verification on the 450 test digits). Prints a Markdown table.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    from tabulate import tabulate

    from sepconv.convert.demo import digits as demo
    from sepconv.convert.pipeline import ConvertOptions, convert_model
    from sepconv.convert.separation.policy import SeparationOptions

    model_path = args.out / "digits_tutorial.h5"
    demo.demo_model(model_path, verbose=2)
    train, data = demo.save_split(demo.digits(), args.out)
    source_bytes = model_path.stat().st_size
    rows = []
    modes = [("tflite", m) for m in ("none", "float16", "dynamic", "int8", "int16x8")] + [
        ("onnx", m) for m in ("none", "dynamic", "int8")]
    with tempfile.TemporaryDirectory() as tmp:
        for separate in (False, True):
            for fmt, mode in modes:
                target = Path(tmp) / f"{'k' if separate else 'orig'}_{mode}.{fmt}"
                options = ConvertOptions(quantize=mode, separate=separate, data=str(train), test_data=str(data),
                                         separation=SeparationOptions(rank=args.rank), refine=False,
                                         recalibrate_bn=False, epochs=0)
                result = convert_model(model_path, [target], options=options)
                artifact = result.artifacts[0]
                check = artifact.verification.outputs[0]
                rows.append([f"K={args.rank}" if separate else "original", f"{fmt} {mode}",
                             f"{artifact.bytes / 1024:,.0f} KiB", f"{source_bytes / artifact.bytes:.2f}x",
                             f"{check.accuracy:.2%}", f"{check.agreement:.2%}",
                             f"{artifact.verification.original_agreement or check.agreement:.2%}",
                             f"{check.max_abs_diff:.1e}"])
    headers = ["model", "artifact", "size", "smaller than .h5", "accuracy", "agrees w/ its Keras model",
               "agrees w/ original", "max abs diff"]
    print(f"source: {model_path} ({source_bytes / 1024:,.0f} KiB, float32 weights); verification on "
          f"{data} (450 test digits)")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A wheel of the device side alone (`sepconv-deploy`), built from this installation's own `sepconv.deploy` files.

A device needs only `sepconv.deploy` (numpy + a runtime), not the workstation side, and sepconv may be installed from
a checkout, a wheel or an index: so the wheel is written here, with the standard library, from the files that are
actually running (no build tool, no network). It declares numpy and tabulate and the `bench-model` command.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path

from sepconv.deploy.runtime import package_version

NAME = "sepconv_deploy"
REQUIRES = ("numpy>=1.23", "tabulate>=0.9")
ENTRY_POINTS = "[console_scripts]\nbench-model = sepconv.deploy.cli:bench_main\n"


def version() -> str:
    return package_version("sepconv") or "0.0.0"


def build(folder: Path) -> Path:
    """Write the wheel into `folder` and return its path (same content -> same bytes, so its hash names it)."""
    package = Path(__file__).parent  # sepconv/deploy, as installed
    files = {f"sepconv/deploy/{path.relative_to(package).as_posix()}": path.read_bytes()
             for path in sorted(package.rglob("*.py"))}  # the report/ subpackage too (its matplotlib is optional)
    dist_info = f"{NAME}-{version()}.dist-info"
    metadata = "".join([f"Metadata-Version: 2.1\nName: sepconv-deploy\nVersion: {version()}\n",
                        "Summary: sepconv's device side: run and benchmark .tflite / .onnx artifacts\n",
                        "Requires-Python: >=3.9\n", *(f"Requires-Dist: {r}\n" for r in REQUIRES)])
    files[f"{dist_info}/METADATA"] = metadata.encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: sepconv\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n")
    files[f"{dist_info}/entry_points.txt"] = ENTRY_POINTS.encode()
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            wheel.writestr(info, data, zipfile.ZIP_DEFLATED)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NAME}-{version()}-py3-none-any.whl"
    path.write_bytes(buffer.getvalue())
    return path


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

"""The manifest written beside every artifact (`out.tflite.json`): what it is, how it was made, how it verified.

The bench and deploy tools read it; it is plain JSON so that any other tool can too.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from sepconv.convert.files import sha256
from sepconv.deploy.runtime import package_version

MANIFEST_VERSION = 2
LIBRARIES = ("sepconv", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "numpy")


def manifest_path(artifact) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def library_versions() -> dict[str, str | None]:
    return {name: package_version(name) for name in LIBRARIES}


def build_manifest(artifact: Path, *, final_path: Path, fmt: str, quantize: str, source: dict, runtime=None,
                   layout: str = "nhwc", separation=None, recovery=None, verification=None,
                   options: dict | None = None, preprocessing: dict | None = None,
                   quantize_fallback: dict | None = None, quantization=None, extras: dict | None = None) -> dict:
    """`artifact` is the file as written (maybe still a temporary); `final_path` the name it will have; `extras`:
    what the artifact's target adds (targets.Target.manifest_extras, e.g. ONNX's opset), over the defaults here."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "artifact": final_path.name,
        "format": fmt,
        "quantize": quantize,
        "quantize_fallback": quantize_fallback,
        "bytes": artifact.stat().st_size,
        "sha256": sha256(artifact),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "layout": layout,
        "inputs": [spec.to_dict() for spec in runtime.inputs] if runtime else None,
        "outputs": [spec.to_dict() for spec in runtime.outputs] if runtime else None,
        "ops": runtime.op_histogram() if runtime else None,
        "runtime_settings": runtime.settings() if runtime else None,
        "opset": None,
        "libraries": library_versions(),
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system()},
        "options": options or {},
        "preprocessing": preprocessing,
        "separation": separation,
        "recovery": recovery,
        "verification": verification.to_dict() if verification is not None else None,
        "quantization": quantization.to_dict() if quantization is not None else None,
    }
    manifest.update(extras or {})
    return manifest


def manifest_json(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, default=str) + "\n"


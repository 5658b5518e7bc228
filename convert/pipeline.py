"""`convert_model`: the whole job behind `convert-model in.h5 out.tflite [out.onnx ...]`.

load -> separate -> export each output -> verify each artifact against the Keras model -> write artifacts and
manifests. All outputs of a run share one loaded model, one separation and one data split. Nothing is written
unless every artifact passes verification: artifacts go to temporary files beside their targets and are renamed
only at the end, so a failure leaves no partial file; the input is only read.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sepconv.convert.data import DataOptions, check_labels, load_data, split
from sepconv.convert.errors import InvalidOptionError, OutputPathError, UnsupportedModelError, VerificationError
from sepconv.convert.onnx_export import DEFAULT_OPSET, ONNX_MODES, OnnxOptions
from sepconv.convert.tflite_export import NEEDS_DATA, TFLITE_MODES, TFLiteOptions
from sepconv.convert.files import sha256
from sepconv.convert.policy import SeparationOptions
from sepconv.convert.verification import Tolerance

FORMATS = {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras"}
QUANTIZE_CHOICES = ("auto",) + TFLITE_MODES
SYNTHETIC_SAMPLES = 64


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `convert_model` can be told; validated on construction. The CLI maps its flags onto these fields.

    quantize: 'auto' (int8 with data, dynamic without) or a mode of export_tflite / export_onnx.
    separation: SeparationOptions (rank, energy, include, exclude); separate=False exports the model as it is.
    data: an .npz or image folder for calibration and verification; data_options how to read it.
    calibration_samples: samples used to calibrate int8 (the rest of the data verifies the artifacts).
    """

    quantize: str = "auto"
    separate: bool = True
    separation: SeparationOptions = field(default_factory=SeparationOptions)
    refine: bool = False  # least-squares refit of separated layers on the calibration data (refinement.py)
    data: str | None = None
    data_options: DataOptions = field(default_factory=DataOptions)
    calibration_samples: int = 200
    io_type: str = "float32"
    per_channel: bool = True
    allow_flex: bool = False
    opset: int = DEFAULT_OPSET
    layout: str = "nhwc"
    tolerance: Tolerance = field(default_factory=Tolerance)
    overwrite: bool = False
    safe_mode: bool = True
    custom_objects: dict | None = None

    def __post_init__(self):
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidOptionError(f"Unrecognized quantize={self.quantize!r}. Supported modes are: "
                                     f"{list(QUANTIZE_CHOICES)}")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 1:
            raise InvalidOptionError(f"Unrecognized calibration_samples={self.calibration_samples!r}. Use a whole "
                                     f"number >= 1")

    def resolved_quantize(self) -> str:
        if self.quantize != "auto":
            return self.quantize
        return "int8" if self.data else "dynamic"

    def describe(self) -> dict:
        described = asdict(self)
        described.pop("custom_objects")
        described["separation"] = self.separation.describe()
        described["quantize_resolved"] = self.resolved_quantize()
        return described


@dataclass(frozen=True)
class Artifact:
    path: str
    format: str
    quantize: str
    bytes: int
    sha256: str
    manifest: str
    verification: dict


@dataclass(frozen=True)
class ConvertResult:
    source: dict
    quantize: str
    quantize_reason: str
    data: dict
    separation: dict | None
    refinement: dict | None
    artifacts: tuple[Artifact, ...]
    seconds: dict

    def to_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[str, str], None]


def convert_model(source, outputs, *, options: ConvertOptions | None = None, progress: Progress | None = None,
                  **kwargs) -> ConvertResult:
    """Load `source`, separate it, export every path in `outputs` (.tflite, .onnx, .keras), verify, write.

    Options are a ConvertOptions or its fields as keyword arguments; rank, energy, include and exclude may be given
    directly too (they make the SeparationOptions). `progress(stage, message)` is called as the stages go (the CLI
    prints it). Raises a SepconvError subclass on any failure, with nothing written.
    """
    if options is None:
        separation = {key: kwargs.pop(key) for key in ("rank", "energy", "include", "exclude") if key in kwargs}
        if separation:
            kwargs["separation"] = SeparationOptions(**separation)
        options = ConvertOptions(**kwargs)
    elif kwargs:
        raise InvalidOptionError(f"Pass options=ConvertOptions(...) or keyword options, not both (got {sorted(kwargs)})")
    say = progress or (lambda stage, message: None)
    source = Path(source)
    targets = _check_outputs(source, outputs, options)
    quantize = options.resolved_quantize()
    _check_modes(targets, quantize, options)
    timer = _Timer()

    from sepconv.convert.loading import load

    with timer("load"):
        model = load(source, custom_objects=options.custom_objects, safe_mode=options.safe_mode)
    say("load", f"{source} ({model.count_params():,} parameters)")
    with timer("data"):
        calibration, heldout, data_info = _data(model, options)
    say("data", data_info["description"])
    reason = (f"quantize={quantize}" if options.quantize != "auto" else
              f"quantize=auto -> {quantize} ({'representative data given' if options.data else 'no --data given'})")
    say("quantize", reason)

    report = None
    exported = model
    if options.separate:
        from sepconv.convert.separation import separate

        with timer("separate"):
            exported, report = separate(model, **_separation_kwargs(options.separation))
        totals = report.totals
        say("separate", f"{totals['separated']} of {totals['layers']} conv layers separated; parameters "
                        f"{totals['model_params_before']:,} -> {totals['model_params_after']:,} "
                        f"({totals['params_ratio']:.2f}x smaller)")
    refinement = None
    if options.refine and report is not None:
        from sepconv.convert.refinement import refine

        with timer("refine"):
            refinement = refine(model, exported, calibration, report)
        refined = [layer for layer in refinement.layers if layer.status == "refined"]
        say("refine", f"{len(refined)} of {len(refinement.layers)} separated layers refit on {refinement.samples} "
                      f"images; layer output error " + ", ".join(
                          f"{layer.path} {layer.error_before:.2f}->{layer.error_after:.2f}" for layer in refined))

    staged = []
    try:
        for target in targets:
            with timer(f"export {target.name}"):
                staged.append(_stage(exported, model if report else None, target, quantize, calibration, heldout,
                                     data_info, options, source, report, refinement, say))
        failed = [s for s in staged if not s["verification"].passed]
        if failed:
            raise VerificationError("; ".join(_failure_line(s) for s in failed) + " - nothing was written; try "
                                    "another --quantize mode, more representative --data, or a lower --min-agreement")
        artifacts = tuple(_commit(s) for s in staged)
    finally:
        for item in staged:
            for tmp in (item["tmp"], item["tmp_manifest"]):
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
    return ConvertResult(source={"path": str(source), "sha256": sha256(source), "params": model.count_params()},
                         quantize=quantize, quantize_reason=reason, data=data_info,
                         separation=report.to_dict() if report else None,
                         refinement=refinement.to_dict() if refinement else None, artifacts=artifacts,
                         seconds=timer.seconds)


def _separation_kwargs(options: SeparationOptions) -> dict:
    return {"rank": options.rank, "energy": options.energy, "include": options.include, "exclude": options.exclude,
            "only_if_smaller": options.only_if_smaller}


def _check_outputs(source: Path, outputs, options: ConvertOptions) -> list[Path]:
    """Every output problem at once, before any work: extension, duplicate, existing file, folder."""
    if isinstance(outputs, (str, os.PathLike)):
        outputs = [outputs]
    targets = [Path(o) for o in outputs]
    if not targets:
        raise OutputPathError("No output given; name at least one .tflite, .onnx or .keras file")
    problems = []
    seen = set()
    for target in targets:
        if target.suffix.lower() not in FORMATS:
            problems.append(f"{target}: unknown extension {target.suffix!r}, use one of {sorted(FORMATS)}")
        elif target.resolve() in seen:
            problems.append(f"{target}: named twice")
        elif source.exists() and target.exists() and target.resolve() == source.resolve():
            problems.append(f"{target}: is the input model; choose another output name")
        elif target.is_dir():
            problems.append(f"{target}: is a directory")
        elif target.exists() and not options.overwrite:
            problems.append(f"{target}: exists; pass --overwrite (overwrite=True) to replace it")
        elif not target.parent.resolve().is_dir():
            problems.append(f"{target}: folder {target.parent} does not exist; create it first")
        elif not _writable(target.parent):
            problems.append(f"{target}: folder {target.parent} is not writable")
        seen.add(target.resolve())
    if problems:
        raise OutputPathError("; ".join(problems))
    return targets


def _writable(folder: Path) -> bool:
    """Try it: os.access says yes to root even on a read-only file system."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _check_modes(targets: list[Path], quantize: str, options: ConvertOptions) -> None:
    if options.refine and not options.data:
        raise InvalidOptionError("--refine refits separated layers on calibration images; pass --data")
    if options.refine and not options.separate:
        raise InvalidOptionError("--refine refits separated layers; it cannot be combined with --no-separate")
    if quantize in NEEDS_DATA and not options.data:
        raise InvalidOptionError(f"--quantize {quantize} calibrates activations on representative data; pass --data "
                                 f"(an .npz or a folder of images) or use --quantize dynamic")
    for target in targets:
        fmt = FORMATS[target.suffix.lower()]
        if fmt == "onnx":
            if quantize not in ONNX_MODES:
                raise InvalidOptionError(f"--quantize {quantize} is not available for ONNX ({target}); supported "
                                         f"modes are: {list(ONNX_MODES)}")
            OnnxOptions(quantize=quantize, opset=options.opset, layout=options.layout,
                        per_channel=options.per_channel)
        elif fmt == "tflite":
            TFLiteOptions(quantize=quantize, io_type=options.io_type, per_channel=options.per_channel,
                          allow_flex=options.allow_flex)


def _data(model, options: ConvertOptions):
    """(calibration inputs or None, held-out Dataset, description) for the run."""
    from sepconv.convert.data import Dataset

    if len(model.inputs) != 1:
        raise UnsupportedModelError(f"convert-model handles single-input models; this one has {len(model.inputs)} "
                                    f"inputs: use export_tflite / export_onnx from the Python API")
    if options.data:
        data = load_data(options.data, model.input_shape, options.data_options)
        check_labels(data, int(model.outputs[0].shape[-1]))
        calibration, heldout = split(data, calibration=options.calibration_samples)
        labels = "labelled" if data.y is not None else "unlabelled"
        info = {"source": data.source, "samples": len(data), "labelled": data.y is not None,
                "calibration_samples": len(calibration), "heldout_samples": len(heldout),
                "description": f"{len(data)} {labels} samples from {data.source}: {len(calibration)} calibrate, "
                               f"{len(heldout)} held out for verification"}
        return calibration.x, heldout, info
    shape = tuple(model.inputs[0].shape)
    if any(d is None for d in shape[1:]):
        raise UnsupportedModelError(f"The model's input {shape} has a free size besides the batch; pass --data so "
                                    f"that sepconv knows what to feed it")
    x = np.random.default_rng(0).random((SYNTHETIC_SAMPLES, *shape[1:]), dtype=np.float32)
    info = {"source": None, "samples": SYNTHETIC_SAMPLES, "labelled": False, "calibration_samples": 0,
            "heldout_samples": SYNTHETIC_SAMPLES,
            "description": f"no --data: verifying on {SYNTHETIC_SAMPLES} synthetic uniform [0, 1) inputs (pass --data "
                           f"for accuracy and a meaningful agreement check)"}
    return None, Dataset(x, None, "synthetic uniform [0, 1) inputs"), info


def _stage(model, original, target: Path, quantize: str, calibration, heldout, data_info, options: ConvertOptions,
           source: Path, report, refinement, say) -> dict:
    """Export to a temporary file beside `target`, verify it, write its manifest to another temporary file."""
    fmt = FORMATS[target.suffix.lower()]
    mode = "none" if fmt == "keras" else quantize
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{target.suffix}", dir=target.parent)
    os.close(fd)
    item = {"target": target, "tmp": tmp, "tmp_manifest": None, "format": fmt, "quantize": mode}
    try:
        return _export_and_verify(item, model, original, calibration, heldout, data_info, options, source, report,
                                  refinement, say)
    except BaseException:
        for path in (item["tmp"], item["tmp_manifest"]):
            if path is not None:
                Path(path).unlink(missing_ok=True)
        raise


def _export_and_verify(item: dict, model, original, calibration, heldout, data_info, options: ConvertOptions,
                       source: Path, report, refinement, say) -> dict:
    from sepconv.convert.manifest import build_manifest, manifest_json
    from sepconv.convert.verification import verify, verify_keras

    target, tmp, fmt, mode = item["target"], item["tmp"], item["format"], item["quantize"]
    started = time.perf_counter()
    inputs = "held-out samples" if data_info["source"] else "synthetic inputs"
    runtime = None
    if fmt == "keras":
        model.save(tmp)
        verification = verify_keras(model, tmp, heldout.x, heldout.y, tolerance=options.tolerance, inputs=inputs,
                                    original=original)
    else:
        from sepconv.deploy.runtime import open_runtime

        if fmt == "tflite":
            from sepconv.convert.tflite_export import export_tflite

            Path(tmp).write_bytes(export_tflite(model, representative_data=calibration, options=TFLiteOptions(
                quantize=mode, io_type=options.io_type if mode in NEEDS_DATA else "float32",
                per_channel=options.per_channel, allow_flex=options.allow_flex)))
        else:
            from sepconv.convert.onnx_export import export_onnx

            Path(tmp).write_bytes(export_onnx(model, representative_data=calibration, options=OnnxOptions(
                quantize=mode, opset=options.opset, layout=options.layout, per_channel=options.per_channel)))
        runtime = open_runtime(tmp)
        verification = verify(model, runtime, heldout.x, heldout.y, quantized=mode != "none", quantize=mode,
                              tolerance=options.tolerance, layout=options.layout if fmt == "onnx" else "nhwc",
                              inputs=inputs, original=original)
    verification = _named(verification, target)
    manifest = build_manifest(Path(tmp), final_path=target, fmt=fmt, quantize=mode, runtime=runtime,
                              layout=options.layout if fmt == "onnx" else "nhwc",
                              source={"path": str(source), "sha256": sha256(source)},
                              separation=report.to_dict() if report else None,
                              refinement=refinement.to_dict() if refinement else None, verification=verification,
                              options=options.describe())
    fd, item["tmp_manifest"] = tempfile.mkstemp(prefix=f".{target.name}.json.", suffix=".partial", dir=target.parent)
    with os.fdopen(fd, "w") as file:
        file.write(manifest_json(manifest))
    item.update(verification=verification, manifest=manifest)
    status = "passed" if verification.passed else "FAILED"
    say("export", f"{target} ({fmt}, {mode}): {manifest['bytes']:,} bytes, verification {status}: "
                  f"{'; '.join(c.criterion for c in verification.outputs)} ({time.perf_counter() - started:.1f} s)")
    return item


def _named(verification, target: Path):
    from dataclasses import replace

    return replace(verification, artifact=str(target))


def _failure_line(item: dict) -> str:
    return f"{item['target']} ({item['quantize']}) failed verification: {'; '.join(item['verification'].failures())}"


def _commit(item: dict) -> Artifact:
    from sepconv.convert.manifest import manifest_path

    target = item["target"]
    os.chmod(item["tmp"], 0o644)
    os.chmod(item["tmp_manifest"], 0o644)
    os.replace(item["tmp"], target)
    os.replace(item["tmp_manifest"], manifest_path(target))
    item["tmp"] = item["tmp_manifest"] = None
    manifest = item["manifest"]
    return Artifact(path=str(target), format=item["format"], quantize=item["quantize"], bytes=manifest["bytes"],
                    sha256=manifest["sha256"], manifest=str(manifest_path(target)),
                    verification=manifest["verification"])


class _Timer:
    def __init__(self):
        self.seconds = {}

    def __call__(self, stage: str):
        import contextlib

        @contextlib.contextmanager
        def timing():
            started = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[stage] = round(time.perf_counter() - started, 2)

        return timing()

import importlib

import pytest


@pytest.mark.parametrize("package", ["sepconv.convert", "sepconv.deploy"])
def test_public_names_resolve(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_no_submodule_shadows_a_public_function():
    """A submodule named like the function it exports would replace that function on the package once imported."""
    import pkgutil
    import types

    import sepconv.convert

    for info in pkgutil.iter_modules(sepconv.convert.__path__):
        importlib.import_module(f"sepconv.convert.{info.name}")
    for name in sepconv.convert.__all__:
        value = getattr(sepconv.convert, name)
        assert name == "errors" or not isinstance(value, types.ModuleType), f"sepconv.convert.{name} is a module"


def convert_result(tmp_path, *, data: bool):
    """A ConvertResult made of typed parts, as convert_model returns it (no model is converted)."""
    from sepconv.convert.recovery.steps import RecoveryReport, Stage
    from sepconv.convert.separation.report import LayerRow, SeparationReport
    from sepconv.convert.results import Artifact, ConvertResult, DataInfo, Plan, Source
    from sepconv.convert.export.verification import BudgetCheck, OutputCheck, Verification

    source = tmp_path / "m.h5"
    source.write_bytes(b"\0" * 4096)
    check = OutputCheck(name="probs", max_abs_diff=0.1, mean_abs_diff=0.01, max_relative_error=0.1, cosine=0.99,
                        agreement=0.99, accuracy=0.9 if data else None, keras_accuracy=0.91 if data else None,
                        criterion="top-1 agreement 99.00% >= 98.00%", passed=True)
    budget = BudgetCheck(metric="accuracy", original=0.92, artifact=0.915, drop=0.5, max_drop=1.0, samples=40)
    verification = Verification(artifact="m.tflite", quantize="int8", samples=40, inputs="held-out samples",
                                outputs=(check,), original_agreement=0.98, original_accuracy=0.92,
                                budget=budget if data else None)
    stages = (Stage("original", True, 0.92, 1.0, 0.92, 1.0, 500, 0.0),
              Stage("separated", True, 0.85, 0.9, 0.86, 0.9, 200, 0.1),
              Stage("refined", False, 0.84, 0.89, 0.80, 0.88, 200, 0.2, note="rejected: validation accuracy fell"))
    row = LayerRow(path="c1", layer_class="Conv2D", status="separated", rank=1, full_rank=9, params_before=300,
                   params_after=100)
    return ConvertResult(
        source=Source(path=str(source), sha256="0" * 64, params=500), quantize="int8", quantize_reason="quantize=int8",
        data=DataInfo(source="d.npz" if data else None, test_source=None, validation_source=None, samples=200,
                      labelled=data, scale="unit", preprocessing={"scale": "unit"}, train_samples=120,
                      calibration_samples=100, validation_samples=30, heldout_samples=50, heldout_labelled=data,
                      description="200 samples"),
        separation=SeparationReport(rows=(row,), model_params_before=500, model_params_after=200),
        recovery=RecoveryReport(samples=50, validation_samples=30, stages=stages, budget=None, refinement=None,
                                batchnorm=None, finetune=None, resumed=False),
        plan=Plan(max_accuracy_drop=1.0 if data else None, refine=True, recalibrate_bn=True, epochs=0,
                  quantize="int8", defaults=("refine",)),
        artifacts=(Artifact(path=str(tmp_path / "m.tflite"), format="tflite", quantize="int8", bytes=1024,
                            sha256="1" * 64, manifest=str(tmp_path / "m.tflite.json"), verification=verification),),
        seconds={"load": 0.1}, warnings=("nothing much",))


@pytest.mark.parametrize("data", [True, False])
def test_convert_result_is_typed_and_its_dict_is_the_json_summary(tmp_path, data):
    """Callers read attributes; to_dict() keeps convert-model --json's keys and their order (a run without data has
    no validation_source), JSON-ready."""
    import json

    result = convert_result(tmp_path, data=data)
    summary = json.loads(json.dumps(result.to_dict()))
    assert list(summary) == ["source", "quantize", "quantize_reason", "data", "separation", "recovery", "plan",
                             "artifacts", "seconds", "warnings", "written_by"]
    assert list(summary["data"])[:4] == (["source", "test_source", "validation_source", "samples"] if data else
                                         ["source", "test_source", "samples", "labelled"])
    assert summary["plan"] == {"max_accuracy_drop": 1.0 if data else None, "refine": True, "recalibrate_bn": True,
                               "epochs": 0, "quantize": "int8", "defaults": ["refine"], "latency": False}
    artifact = summary["artifacts"][0]
    assert list(artifact) == ["path", "format", "quantize", "bytes", "sha256", "manifest", "verification",
                              "quantize_fallback", "quantization", "speed"]
    verification = json.loads(json.dumps(result.artifacts[0].verification.to_dict()))
    assert artifact["verification"] == verification and verification["passed"] and verification["budget"] == (
        {"metric": "accuracy", "original": 0.92, "artifact": 0.915, "drop": 0.5, "max_drop": 1.0, "samples": 40,
         "least_drop": None, "confidence": 0.0, "held": True} if data else None)
    assert summary["separation"]["totals"]["separated"] == 1 and summary["recovery"]["stages"][2]["kept"] is False
    assert result.recovery.final.name == "separated", "the last kept stage"


def test_a_worker_that_writes_no_artifact_says_who_does_instead_of_an_empty_table(tmp_path):
    """A multi-worker run's other workers fine-tune and stop: no artifact table with the original alone and "verified
    on ..., manifests beside each artifact" (what they printed), but who writes the artifacts."""
    from dataclasses import replace

    said = "worker 1 of 2: fine-tuning done; the chief (worker 0) exports, verifies and writes the artifacts"
    result = replace(convert_result(tmp_path, data=True), artifacts=(), written_by=said)
    assert result.artifact_table() == f"no artifacts from this worker: {said}"
    assert result.table().endswith(result.artifact_table()) and "manifests beside" not in result.table()
    assert result.to_dict()["written_by"] == said and result.to_dict()["artifacts"] == []


def test_convert_result_table_is_what_the_terminal_shows(tmp_path):
    result = convert_result(tmp_path, data=True)
    text = result.table()
    stages, artifacts = text.split("\n\n")
    assert stages == result.recovery.table(), "no budget: the stage table, then the artifacts"
    assert "rejected: refined (rejected: validation accuracy fell)" in stages and "REJECTED" in stages
    original, artifact = [line for line in artifacts.splitlines() if line.startswith(("original", "m.tflite"))]
    assert original.split()[:5] == ["original", "m.h5", "keras", "4", "KiB"] and "92.00%" in original
    assert artifact.split() == ["m.tflite", "tflite", "int8", "1", "KiB", "4.00x", "90.00%", "99.00%", "98.00%",
                                "+0.50", "of", "1.0", "points", "passed"]
    assert artifacts.endswith("verified on 50 held-out samples of d.npz; manifests beside each artifact (.json)")

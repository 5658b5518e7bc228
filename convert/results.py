"""What `convert_model` returns: a ConvertResult of typed parts, each with `to_dict()` (the JSON of `convert-model
--json`, docs/convert.md) and, where the terminal shows it, `table()`.

    result = convert_model("in.h5", ["out.tflite"], data="images/")
    result.artifacts[0].verification.passed, result.recovery.final.accuracy, result.separation.totals["separated"]
    print(result.table())            # what convert-model prints: budget, latency, stages, artifacts
    json.dumps(result.to_dict())     # what convert-model --json writes

The parts: Source (the input model), DataInfo (how the data was split into its three roles), Plan (the effective
choices and which were defaults), separation.SeparationReport, recovery.RecoveryReport, an Artifact per output (its
verification.Verification, quantization.QuantizationReport), the seconds per stage and the warnings.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sepconv.convert.data import DataInfo
from sepconv.convert.options import Plan
from sepconv.deploy.choices import choice_columns, choice_label, choice_of_key, spatial_rank
from sepconv.deploy.scores import percent
from sepconv.deploy.timing import describe_xnnpack

if TYPE_CHECKING:
    from sepconv.convert.export.quantization import QuantizationReport
    from sepconv.convert.export.speed import Speed
    from sepconv.convert.export.verification import Verification
    from sepconv.convert.recovery.steps import RecoveryReport
    from sepconv.convert.separation.report import SeparationReport


@dataclass(frozen=True)
class Source:
    """The input model, hashed once per run."""

    path: str
    sha256: str
    params: int  # the original model's parameters
    bytes: int | None = None  # the model file's size (what "x smaller" is against)

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The input model as a manifest records it: {"path", "sha256"} (docs/manifest.md)."""
        return {"path": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class Artifact:
    path: str
    format: str
    quantize: str
    bytes: int
    sha256: str
    manifest: str
    verification: Verification  # against the Keras model on the test inputs
    quantize_fallback: dict | None = None  # {from, reasons (one per mode replaced), reason (joined)[, slower]}:
    # --quantize auto's first choice failed verification, or (slower: that mode) ran slower than the original in float32
    quantization: QuantizationReport | None = None  # the int8 repair's attempts and layers kept in float
    speed: Speed | None = None  # timed against the original converted the same way (export/speed.py)

    def to_dict(self) -> dict:
        return {**asdict(self), "verification": self.verification.to_dict(),
                "quantization": self.quantization.to_dict() if self.quantization is not None else None,
                "speed": self.speed.to_dict() if self.speed is not None else None}


@dataclass(frozen=True)
class ConvertResult:
    source: Source
    quantize: str
    quantize_reason: str
    data: DataInfo
    separation: SeparationReport | None  # None with separate=False
    recovery: RecoveryReport | None  # per-stage scores, budget, BatchNorm, fine-tuning; None with separate=False
    plan: Plan
    artifacts: tuple[Artifact, ...]
    seconds: dict  # {stage: seconds}; stages are load, data, "separate and recover", "export NAME" per output
    warnings: tuple[str, ...] = ()  # e.g. nothing was separated; the CLI prints them even with --quiet
    written_by: str | None = None  # a multi-worker run's other workers (no artifacts): who writes them, in words

    def to_dict(self) -> dict:
        """The JSON summary convert-model --json writes (docs/convert.md)."""
        return {"source": self.source.to_dict(), "quantize": self.quantize, "quantize_reason": self.quantize_reason,
                "data": self.data.to_dict(),
                "separation": self.separation.to_dict() if self.separation is not None else None,
                "recovery": self.recovery.to_dict() if self.recovery is not None else None,
                "plan": self.plan.to_dict(), "artifacts": [a.to_dict() for a in self.artifacts],
                "seconds": dict(self.seconds), "warnings": list(self.warnings), "written_by": self.written_by}

    def table(self) -> str:
        """What convert-model prints: per-layer sensitivity and K (budget mode), the latency table (when K was chosen
        for latency), each recovery stage, then the original beside each artifact."""
        parts = []
        if self.recovery is not None:
            if self.recovery.budget:
                parts += [self.recovery.budget_table(), latency_text(self.recovery.budget.plan.latency,
                                                                     self.artifacts)]
            parts.append(self.recovery.stages_table())
        return "\n\n".join(part for part in [*parts, self.artifact_table()] if part)

    def artifact_table(self) -> str:
        """The original next to each artifact: size, accuracy, agreement, budget, verdict; a worker that writes none
        says who does."""
        from tabulate import tabulate

        if not self.artifacts:
            return f"no artifacts from this worker: {self.written_by}" if self.written_by else ""

        source_bytes = os.path.getsize(self.source.path)
        first = self.artifacts[0].verification if self.artifacts else None
        rows = [["original " + Path(self.source.path).name, "keras", f"{source_bytes / 1024:,.0f} KiB", "1.00x",
                 percent(first.original_accuracy if first else None), "", "", ""]]
        for artifact in self.artifacts:
            verification = artifact.verification
            check = verification.outputs[0]
            mode = f"{artifact.format} {artifact.quantize}" + fallback_words(artifact.quantize_fallback)
            rows.append([Path(artifact.path).name, mode, f"{artifact.bytes / 1024:,.0f} KiB",
                         f"{source_bytes / artifact.bytes:.2f}x", percent(check.accuracy), percent(check.agreement),
                         percent(verification.original_agreement), "passed" if verification.passed else "FAILED"])
        headers = ["model", "format", "size", "smaller", "accuracy", "agrees w/ separated", "agrees w/ original",
                   "check"]
        speeds = [artifact.speed for artifact in self.artifacts]
        if any(speeds):  # each artifact timed against the original converted the same way (export/speed.py)
            headers.insert(4, "faster (95% CI)")
            rows[0].insert(4, "")
            for row, speed in zip(rows[1:], speeds):
                row.insert(4, "" if speed is None else speed.interval()
                           + (" (original shipped)" if speed.shipped == "original" else ""))
        budgets = [artifact.verification.budget for artifact in self.artifacts]
        if any(budgets):  # --max-accuracy-drop covers each artifact: its own drop on the validation data
            headers.insert(-1, "budget (validation)")
            rows[0].insert(-1, "")
            for row, budget in zip(rows[1:], budgets):
                row.insert(-1, f"{budget.drop:+.2f} of {budget.max_drop} points" if budget else "")
        data = self.data
        note = (f"verified on {data.heldout_samples} held-out samples of {data.test_source or data.source}"
                if data.source else f"verified on {data.heldout_samples} synthetic inputs (no --data)")
        return (tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
                + f"\n{note}; manifests beside each artifact (.json)")


def fallback_words(fallback: dict | None) -> str:
    """' (int8 failed)', ' (int8 slower)', ' (int8 failed, dynamic slower)' or '': why --quantize auto's first
    choice is not what ships (staging.py)."""
    if not fallback:
        return ""
    words = [f"{fallback['from']} failed"] if fallback.get("slower") != fallback["from"] else []
    words += [f"{fallback['slower']} slower"] if fallback.get("slower") else []
    return f" ({', '.join(words)})"


def latency_text(latency: dict | None, artifacts=()) -> str:
    """Per layer: the latency of each option where it was measured, the choice, and the whole model predicted and
    measured (each artifact's `latency`); empty when K was not chosen for latency."""
    from tabulate import tabulate


    if not latency:
        return ""
    table, choice = latency["table"], latency["choice"]
    columns = choice_columns([[choice_of_key(k) for k in row if k != "keep"] for row in table["layers"].values()])
    rows = []
    for layer in choice["layers"]:
        row = table["layers"][layer["path"]]
        cells = []
        for _, pick in columns:
            found = pick([choice_of_key(k) for k in row if k != "keep"])
            r = None if found is None else spatial_rank(found)
            cells.append("" if found is None else f"{row[str(found)] * 1000:.1f}" + (f" (r={r})" if r else ""))
        rows.append([layer["path"], choice_label(layer["rank"]),
                     choice_label(latency["budget_ranks"].get(layer["path"], 0)), f"{row['keep'] * 1000:.1f}"]
                    + cells + [f"{layer['ms'] * 1000:.1f}", ", ".join(choice_label(k) for k in layer["slower"])])
    text = tabulate(rows, headers=["layer", "chosen", "for accuracy alone", "us kept"]
                    + [f"us {header}" for header, _ in columns]
                    + ["us chosen", "slower than kept (never chosen)"], tablefmt="simple", disable_numparse=True)
    device = table["device"]
    text += (f"\nlatency: each layer alone, p50 on {table['where']} ({device.get('pi_model') or device.get('cpu')}, "
             f"{table['runtime']}, {table['format']} {table['quantize']}, {table['threads']} thread(s), "
             f"{describe_xnnpack(table['xnnpack'])}; {table['measured']} timed, {table['cached']} cached); whole "
             f"model predicted {choice['predicted_ms']:.4f} ms against the original's {table['original_ms']:.4f} ms "
             f"({table['original_ms'] / choice['predicted_ms']:.2f}x)")
    if choice["target_ms"] is not None:
        text += f"; target {choice['target_ms']:.4f} ms"
    for artifact in artifacts:
        speed = artifact.speed
        if speed is not None and speed.predicted_ms is not None:
            text += (f"\n{Path(artifact.path).name}: measured {speed.artifact_ms:.4f} ms, predicted "
                     f"{speed.predicted_ms:.4f} ms (error {speed.error:+.1%}), {speed.interval()} against the "
                     f"original timed beside it")
    return text



"""SeparationReport: one row per convolution-like layer (separated, kept or unsupported) and totals."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from tabulate import tabulate

SEPARATED = "separated"
KEPT = "kept"
UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class LayerRow:
    """What happened to one layer. `path` is the layer's name, prefixed by the nested models it sits in."""

    path: str
    layer_class: str
    status: str  # SEPARATED, KEPT or UNSUPPORTED
    reason: str | None = None  # why it was kept or is unsupported; None when separated
    kernel: tuple[int, int] | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    rank: int | None = None  # the depth multiplier K of the separated layer (spatial: the channels r between halves)
    full_rank: int | None = None  # the exact rank: min(kh*kw, cout) (spatial: min(kh*cin, kw*cout))
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None  # per sample, summed over the layer's calls; None when a spatial size is unknown
    macs_after: int | None = None
    relative_error: float | None = None  # ||W - W_K||_F / ||W||_F of the kernel
    retained_energy: float | None = None  # 1 - relative_error**2
    form: str | None = None  # separated: "depthwise" (SeparableConv2D) or "spatial" (kh x 1 then 1 x kw Conv2D)

    def __post_init__(self):
        if self.status == SEPARATED and self.form is None:
            object.__setattr__(self, "form", "depthwise")


@dataclass(frozen=True)
class SeparationReport:
    """The outcome of `separate`: per-layer rows, whole-model parameter counts and the policy used."""

    rows: tuple[LayerRow, ...]
    model_params_before: int
    model_params_after: int
    policy: dict = field(default_factory=dict)

    def by_status(self, status: str) -> tuple[LayerRow, ...]:
        return tuple(row for row in self.rows if row.status == status)

    @property
    def separated(self) -> tuple[LayerRow, ...]:
        return self.by_status(SEPARATED)

    @property
    def kept(self) -> tuple[LayerRow, ...]:
        return self.by_status(KEPT)

    @property
    def unsupported(self) -> tuple[LayerRow, ...]:
        return self.by_status(UNSUPPORTED)

    def why_not_separated(self, groups: int = 3, names: int = 3) -> str:
        """Why the layers not separated were not, in one short line: the rows grouped by their reason (in the order
        they first appear), at most `groups` reasons with at most `names` layers each; the manifest lists every row."""
        by_reason: dict[str, list[str]] = {}
        for row in self.rows:
            if row.status != SEPARATED:
                by_reason.setdefault(row.reason or row.status, []).append(row.path)
        if not by_reason:
            return "every layer was separated"
        parts = [f"{paths[0]}: {reason}" if len(paths) == 1 else
                 f"{reason}: {len(paths)} layers ({', '.join(paths[:names])}"
                 + (f" and {len(paths) - names} more)" if len(paths) > names else ")")
                 for reason, paths in list(by_reason.items())[:groups]]
        rest = sum(len(paths) for paths in list(by_reason.values())[groups:])
        if rest:
            parts.append(f"{rest} more layer{'s' * (rest > 1)} for other reasons")
        return "; ".join(parts)

    def row(self, path: str) -> LayerRow:
        for row in self.rows:
            if row.path == path:
                return row
        raise KeyError(f"No layer {path!r} in the report; layers: {[r.path for r in self.rows]}")

    @property
    def totals(self) -> dict:
        """Sums over the rows, plus the whole model's parameters and the size ratio."""
        macs_known = all(r.macs_before is not None for r in self.rows)
        return {
            "layers": len(self.rows),
            "separated": len(self.separated),
            "kept": len(self.kept),
            "unsupported": len(self.unsupported),
            "conv_params_before": sum(r.params_before for r in self.rows),
            "conv_params_after": sum(r.params_after for r in self.rows),
            "macs_before": sum(r.macs_before for r in self.rows) if macs_known else None,
            "macs_after": sum(r.macs_after for r in self.rows) if macs_known else None,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "params_ratio": self.model_params_before / max(1, self.model_params_after),
        }

    def to_dict(self) -> dict:
        return {"policy": self.policy, "totals": self.totals, "layers": [asdict(row) for row in self.rows]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, tablefmt: str = "simple") -> str:
        """The per-layer table and a totals line; `tablefmt` is any tabulate format ("github" for Markdown)."""
        headers = ["layer", "kernel", "in", "out", "K (r=: spatial)", "params", "MACs", "rel. error", "status"]
        body = [_table_row(row) for row in self.rows]
        t = self.totals
        body.append(
            ["total (conv layers)", "", "", "", "", _change(t["conv_params_before"], t["conv_params_after"]),
             _change(t["macs_before"], t["macs_after"]), "", f"{t['separated']} separated"]
        )
        summary = (
            f"model parameters: {t['model_params_before']:,} -> {t['model_params_after']:,} "
            f"({t['params_ratio']:.2f}x smaller); policy: {_policy_text(self.policy)}"
        )
        return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True) + "\n" + summary

    def __str__(self) -> str:
        return self.table()


def _table_row(row: LayerRow) -> list[str]:
    kernel = f"{row.kernel[0]}x{row.kernel[1]}" if row.kernel else ""
    rank = f"{row.rank}/{row.full_rank}" if row.rank is not None else ""
    if row.form == "spatial":
        rank = f"r={rank}"
    error = f"{row.relative_error:.2e}" if row.relative_error is not None else ""
    status = row.status if row.reason is None else f"{row.status}: {row.reason}"
    return [row.path, kernel, _opt(row.in_channels), _opt(row.out_channels), rank,
            _change(row.params_before, row.params_after), _change(row.macs_before, row.macs_after), error, status]


def _opt(value) -> str:
    return "" if value is None else str(value)


def _change(before, after) -> str:
    if before is None or after is None:
        return "?"
    if before == after:
        return f"{before:,}"
    return f"{before:,} -> {after:,}"


def _policy_text(policy: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in policy.items() if value not in (None, ()))

"""The analysis report on disk (JSON) and its summary on the terminal."""
from __future__ import annotations

import json
import math
from pathlib import Path

REPORT_FILE = "analysis.json"


def _finite(x):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write `report` to out_dir/analysis.json (strict JSON) and return the path."""
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(report), f, indent=1, allow_nan=False)
    return path


def summary_lines(report: dict) -> list[str]:
    """A few lines for the terminal: thought norms, and the value curves when there are any."""
    lines = [f"{report['num_records']} records, {report['num_thoughts']} thoughts each"]
    n = report["num_thoughts"]
    for i in range(n):
        norms = [r["thoughts"][i]["norm"] for r in report["records"]]
        lines.append(f"thought {i}: mean norm {sum(norms) / len(norms):.3f}")
    switch = report.get("learned_switch")
    if switch:
        lines.append(f"answers: fixed {switch['max_thoughts']} thoughts accuracy {switch['fixed']['accuracy']:.4f}; "
                     f"learned switch (p >= {switch['threshold']}) accuracy {switch['learned']['accuracy']:.4f}, "
                     f"mean thoughts {switch['learned']['mean_thoughts']:.2f}")
    curves = report["value_curves"]
    if curves:
        def fmt(v):
            return "-" if v is None else f"{v:.4f}"

        lines.append("thought  hops  value(lead)  value(other)  mass(lead)  mass(other)")
        for i in range(n):
            lines.append(f"{i:>7}  {curves['hops'][i]:>4}  {fmt(curves['lead_value_mean'][i]):>11}  "
                         f"{fmt(curves['other_value_mean'][i]):>12}  {fmt(curves['lead_mass_mean'][i]):>10}  "
                         f"{fmt(curves['other_mass_mean'][i]):>11}")
    return lines

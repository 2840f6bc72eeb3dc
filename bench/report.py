"""Medians, ratios, the printed table and the results file."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

from common import BENCH, ROOT
from scenarios import Row, Sizes, metrics_of

SERVERS = ("orgcast", "node-seed")


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(runs: list[dict[str, Any]], rows: list[Row], sizes: Sizes) -> list[dict[str, Any]]:
    """One entry per row: each server's values over the rounds, their median, the ratio."""
    per: dict[tuple[str, str], list[tuple[dict[str, float | None], dict[str, str]]]] = {}
    for r in runs:
        if "error" in r or "discarded" in r:
            continue
        per.setdefault((r["scenario"], r["server"]), []).append(metrics_of(r["scenario"], r, sizes))
    out = []
    for row in rows:
        entry: dict[str, Any] = {"scenario": row.scenario, "key": row.key, "label": row.label, "better": row.better}
        for name in SERVERS:
            got = per.get((row.scenario, name), [])
            values = [m.get(row.key) for m, _ in got]
            marks = sorted({mk[row.key] for _, mk in got if row.key in mk})
            entry[name] = {"median": median_or_none(values), "values": values, "marks": marks,
                           "rounds": len(got)}
        a, b = entry["orgcast"]["median"], entry["node-seed"]["median"]
        entry["ratio"] = a / b if a is not None and b else None
        out.append(entry)
    return out


def _cell(e: dict[str, Any], rounds: int) -> str:
    med = e["median"]
    if med is None:
        return "—"
    digits = 0 if abs(med) >= 100 or med == 0 else 1 if abs(med) >= 1 else 2
    text = f"{med:,.{digits}f}"
    if "≥" in e["marks"]:
        text = "≥ " + text
    if "g" in e["marks"]:
        text += " ᵍ"
    if e["rounds"] < rounds:
        text += f" ({e['rounds']}/{rounds})"
    return text


def render_table(agg: list[dict[str, Any]], rounds: int, servers: list[str]) -> str:
    if len(servers) == 1:
        lines = [f"| metric | {servers[0]} (median) |", "|---|---:|"]
    else:
        lines = ["| metric | orgcast (median) | node-seed (median) | orgcast ÷ node |", "|---|---:|---:|---:|"]
    for e in agg:
        arrow = "↑" if e["better"] == "higher" else "↓"
        cells = [_cell(e[name], rounds) for name in servers]
        if len(servers) > 1:
            cells.append("—" if e["ratio"] is None else f"{e['ratio']:.2f}×")
        lines.append(f"| {e['label']} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLE_NOTES = ("↑ higher is better, ↓ lower is better. `≥`: every ladder step passed, the figure is a floor; "
               "`ᵍ`: the load generator's core was saturated at the step where the server failed "
               "(the generator may be the limit); `(k/n)`: only k of n rounds gave a value.")


def results_path(stem: str, output: Path | None) -> Path:
    if output is not None:
        return output
    base = dt.date.today().isoformat() + (f"-{stem}" if stem else "")
    path = BENCH / "results" / f"{base}.json"
    n = 2
    while path.exists():
        path = BENCH / "results" / f"{base}-{n}.json"
        n += 1
    return path


def save(results: dict[str, Any], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)

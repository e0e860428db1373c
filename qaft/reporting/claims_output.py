"""The files of a claims report: ``claims.json`` (the source of truth), ``claims.csv``, ``claims.md`` and the
forest plot ``claims.png``, one row per claim (:func:`qaft.reporting.claims.evaluate` makes the rows).

Every file is a pure function of the rows (no dates, no library version stamps), so a rerun on the same records
rewrites the same bytes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ["id", "verdict", "effect", "ci_low", "ci_high", "unit", "n_seeds", "n_items", "paired_seeds",
           "metric", "better", "note"]


def _number(value: Any, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _markdown(rows: list[dict[str, Any]]) -> str:
    counts = pd.Series([r["verdict"] for r in rows]).value_counts()
    lines = ["# Claims: verdicts", "",
             ("Effect > 0: the claim's direction holds (perplexity: log ratio b/a, or a/b where higher is "
              "claimed better; accuracy: points a - b, or b - a where lower is). 95% bootstrap interval over "
              "seeds and eval items (qaft.reporting.bootstrap)."), "",
             "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()), "",
             "| id | verdict | effect | 95% CI | unit | seeds | items | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ci = f"[{_number(r['ci_low'])}, {_number(r['ci_high'])}]"
        lines.append(f"| {r['id']} | {r['verdict']} | {_number(r['effect'])} | {ci} | {r['unit']} | "
                     f"{r['n_seeds']} | {r['n_items']} | {r['note']} |")
    lines += ["", "## Sources", ""] + [f"* `{r['id']}`: {r['source']}" for r in rows]
    return "\n".join(lines) + "\n"


def _forest(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per unit (log ratio, points): each claim's effect and interval, 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = sorted({r["unit"] for r in rows})
    heights = [sum(r["unit"] == u for r in rows) for u in units]
    fig, axes = plt.subplots(len(units), 1, figsize=(7, 1.2 + 0.22 * len(rows)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colours = {"held": "tab:green", "reversed": "tab:red", "inconclusive": "tab:gray", "missing": "white"}
    for ax, unit in zip(axes[:, 0], units):
        mine = [r for r in rows if r["unit"] == unit][::-1]
        for y, r in enumerate(mine):
            if r["effect"] is None:
                continue
            if r["ci_low"] is not None:
                ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=colours[r["verdict"]], linewidth=2)
            ax.plot([r["effect"]], [y], "o", color=colours[r["verdict"]], markeredgecolor="black", markersize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(mine)), [f"{r['id']} ({r['verdict']})" for r in mine], fontsize=6)
        ax.set_ylim(-0.7, len(mine) - 0.3)
        ax.set_xlabel(f"effect ({unit}; > 0: claim holds)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: regenerated files stay equal
    plt.close(fig)
    return path


def write_outputs(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The four files in ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"claims.{ext}" for ext in ("json", "csv", "md", "png")]
    paths[0].write_text(json.dumps(rows, indent=1) + "\n")
    pd.DataFrame(rows, columns=COLUMNS + ["source"]).to_csv(paths[1], index=False)
    paths[2].write_text(_markdown(rows))
    _forest(rows, paths[3])
    return paths

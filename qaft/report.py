"""Tables and plots from logged runs: the papers' comparison tables, regenerated from run records.

Runs are found by their records, not their dates: every folder under the run store that holds a
``record.json`` (or only a ``config.yaml``: a run that never finished) is one row; a wandb project can be
read the same way. A report spec (``experiments/reports/*.yaml``) names the rows (e.g. method x bits), the metric
columns, an optional filter, the grid of cells that should exist, and the paper's numbers where it reports
the same cell. Missing and failed runs appear as such in the tables, never silently dropped.

    qaft-report --spec experiments/reports/groupwise.yaml --runs runs --out results
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

MISSING, FAILED = "missing", "failed"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def _row(record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    _flatten("", {k: v for k, v in record.items() if k not in ("traceback", "environment")}, row)
    metrics = record.get("metrics") or {}
    # The deployed model: the merged integer model, or the PTQ of a float merge (the papers' "+PTQ").
    deployed = metrics.get("ppl_merged_ptq", metrics.get("ppl_merged"))
    if deployed is not None:
        row["metrics.deployed"] = deployed
    return row


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run folder under ``root`` (flattened ``record.json``; ``status='incomplete'`` without one)."""
    rows = []
    for folder in sorted({p.parent for p in Path(root).rglob("config.yaml")} |
                         {p.parent for p in Path(root).rglob("record.json")}):
        if (folder / "record.json").is_file():
            rows.append(_row(json.loads((folder / "record.json").read_text())))
        elif not (folder.name == ".hydra"):
            rows.append({"status": "incomplete", "run_dir": str(folder)})
    return pd.DataFrame(rows)


def load_wandb_runs(project: str) -> pd.DataFrame:
    """The same frame from a wandb project (``entity/project``), through wandb's public API."""
    import wandb

    rows = []
    for run in wandb.Api().runs(project):
        record = {**run.config, "status": "ok" if run.state == "finished" else FAILED,
                  "metrics": {k: v for k, v in run.summary.items() if not k.startswith("_")}}
        rows.append(_row(record))
    return pd.DataFrame(rows)


def _select(frame: pd.DataFrame, where: dict[str, Any]) -> pd.DataFrame:
    for key, value in where.items():
        if key not in frame:
            return frame.iloc[0:0]
        allowed = value if isinstance(value, list) else [value]
        frame = frame[frame[key].isin(allowed)]
    return frame


def _cell(values: pd.Series, decimals: int) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return MISSING
    if len(values) == 1:
        return f"{values.iloc[0]:.{decimals}f}"
    return f"{values.mean():.{decimals}f} ± {values.std(ddof=1):.{decimals}f}"


def build_table(frame: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """Rows ``spec['rows']`` x metric columns ``spec['columns']`` (label -> column), mean ± std over seeds.

    Every combination of ``spec['expect']`` gets a row: ``missing`` where no run exists, ``failed`` where
    only failed runs exist.
    """
    keys, columns = list(spec["rows"]), dict(spec["columns"])
    frame = _select(frame, spec.get("where", {}))
    expect = spec.get("expect") or {k: sorted(frame[k].dropna().unique().tolist()) for k in keys if k in frame}
    out = []
    for combo in itertools.product(*(expect[k] for k in keys)):
        runs = _select(frame, dict(zip(keys, combo)))
        ok = runs[runs["status"] == "ok"] if "status" in runs else runs
        row = dict(zip(keys, combo))
        for label, column in columns.items():
            if ok.empty:
                row[label] = FAILED if len(runs) else MISSING
            else:
                row[label] = _cell(ok[column] if column in ok else pd.Series(dtype=float), spec.get("decimals", 2))
        row["seeds"] = len(ok)
        out.append(row)
    return pd.DataFrame(out)


def paper_vs_reproduced(table: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame | None:
    """Cells the paper reports (``spec['paper']``: list of {rows..., column, value}) beside ours."""
    if not spec.get("paper"):
        return None
    keys, rows = list(spec["rows"]), []
    for cell in spec["paper"]:
        match = _select(table, {k: cell[k] for k in keys})
        ours = match[cell["column"]].iloc[0] if len(match) else MISSING
        rows.append({**{k: cell[k] for k in keys}, "metric": cell["column"], "paper": cell["value"],
                     "reproduced": ours, "paper setting": cell.get("setting", "")})
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, out_dir: Path, name: str, caption: str) -> list[Path]:
    """``name``.md (with the caption), ``name``.tex and ``name``.csv in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, tex, csv = (out_dir / f"{name}.{ext}" for ext in ("md", "tex", "csv"))
    md.write_text(f"{caption}\n\n{table.to_markdown(index=False)}\n")
    tex.write_text(table.to_latex(index=False, caption=caption, label=f"tab:{name}"))
    table.to_csv(csv, index=False)
    return [md, tex, csv]


def plot_vs_bits(frame: pd.DataFrame, spec: dict[str, Any], out: Path) -> Path | None:
    """``spec['plot']`` (a column) against bits, one line per method (mean over seeds of ok runs)."""
    column = spec.get("plot")
    frame = _select(frame, spec.get("where", {}))
    if not column or column not in frame or "bits" not in frame:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"].dropna(subset=[column, "bits"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, group in ok.groupby("method"):
        means = group.groupby("bits")[column].mean().sort_index()
        ax.plot(means.index, means.values, marker="o", label=method)
    ax.set_xlabel("bits")
    ax.set_ylabel(column)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(spec_path: str | Path, runs: str | Path | None, out: str | Path, wandb_project: str | None = None) -> list[Path]:
    """Write the tables (and plot) that ``spec_path`` describes; returns the files written."""
    spec = yaml.safe_load(Path(spec_path).read_text())
    frames = [load_runs(runs)] if runs else []
    if wandb_project:
        frames.append(load_wandb_runs(wandb_project))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out = Path(out)
    table = build_table(frame, spec)
    written = write_table(table, out, spec["name"], spec.get("caption", spec["name"]))
    versus = paper_vs_reproduced(table, spec)
    if versus is not None:
        written += write_table(versus, out, f"{spec['name']}_paper_vs_reproduced",
                               f"Paper vs reproduced: {spec.get('caption', spec['name'])}")
    plot = plot_vs_bits(frame, spec, out / f"{spec['name']}.png") if not frame.empty else None
    return written + ([plot] if plot else [])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="qaft-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, nargs="+", help="report spec YAML file(s), e.g. experiments/reports/*.yaml")
    p.add_argument("--runs", default="runs", help="run store (folder of run folders)")
    p.add_argument("--wandb", default=None, help="also read runs from this wandb project (entity/project)")
    p.add_argument("--out", default="results", help="folder for the tables and plots")
    args = p.parse_args(argv)
    for spec in args.spec:
        for path in report(spec, args.runs, args.out, args.wandb):
            print(path)


if __name__ == "__main__":
    main()

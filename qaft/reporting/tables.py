"""Tables and plots from logged runs: the papers' comparison tables, regenerated from run records.

Runs are found by their records, not their dates: every folder under the run store that holds a
``record.json`` (or only a ``config.yaml``: a run that never finished) is one row; a wandb project can be
read the same way. A report spec (``experiments/reports/*.yaml``) names

* ``where``: which runs (e.g. ``{experiment: groupwise, scale: tiny}``), matched on flattened record keys;
* ``rows``: the keys that make a row (e.g. ``[method, bits]``), and ``expect``: the grid of rows that should
  exist, so that missing runs show as ``missing`` and runs that only failed as ``failed`` (a list of grids where
  not every row key crosses every other, e.g. a no-training baseline at one step count only);
* ``columns``: label -> record key, or a list of keys whose per-run mean is the cell (the papers' "Avg"),
  or ``{keys: <key or list>, factor: 100}`` (accuracies as the papers' percentages);
* ``relative``: optional ``{to: {method: lora}, columns: [...]}``, adding "label / lora" ratio columns;
* ``paper``: the paper's numbers where it reports the same cell (a "paper vs reproduced" table);
* ``plot``: ``{x, y, series, log, kind, categorical, where}`` (``kind``: line or bar; ``categorical``: x values
  evenly spaced in table order; ``where``: a further filter), or just the ``y`` key for y against bits.

A cell is the value of its one run, or over several seeds their mean with a 95% confidence interval and the
number of seeds: ``44.79 ± 0.31 (n=3)``, the half-width being Student's ``t(0.975, n-1) · sd / sqrt(n)`` (sd with
``n - 1``; :func:`t_quantile`). One seed's cell is the bare value: a single run has no interval.

Reading the store (run folders, an archive with its item scores, wandb) is :mod:`qaft.reporting.store`.

    qaft-report spec='experiments/reports/*.yaml' runs=runs out=results/tiny archive=results/tiny/records.jsonl
    qaft-report spec='experiments/reports/*.yaml' runs=results/tiny/records.jsonl out=results/tiny  # same tables
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from qaft.reporting.store import archive_runs, load_runs, load_wandb_runs, warn  # noqa: F401 - the report's API
from qaft.run_folder import Status

MISSING = "missing"  # a cell no run matches (not a run's status)
NOT_APPLICABLE = "—"
# What a cell without an ok run says, most telling first.
NOT_OK = tuple(s.value for s in (Status.FAILED, Status.DIVERGED, Status.INTERRUPTED, Status.CORRUPT, Status.INCOMPLETE))


def select_runs(frame: pd.DataFrame, where: dict[str, Any]) -> pd.DataFrame:
    """The runs whose flattened keys hold the values ``where`` names (a list: any of them)."""
    for key, value in where.items():
        if key not in frame:
            return frame.iloc[0:0]
        allowed = value if isinstance(value, list) else [value]
        frame = frame[frame[key].isin(allowed)]
    return frame


def _values(runs: pd.DataFrame, column: str | list[str] | dict[str, Any]) -> pd.Series:
    """One number per run: the column, or the mean of several (a run missing any of them gives NaN);
    ``{keys: ..., factor: 100}`` scales it (fractions as the papers' percentages)."""
    spec = column if isinstance(column, dict) else {"keys": column}
    keys = spec["keys"] if isinstance(spec["keys"], list) else [spec["keys"]]
    if runs.empty or any(k not in runs for k in keys):
        return pd.Series(dtype=float)
    values = runs[keys].apply(pd.to_numeric, errors="coerce").mean(axis=1, skipna=False)
    return values * spec.get("factor", 1)


# t(0.975, df) for df = 1..30 (scipy.stats.t.ppf, 6 decimals): what t_quantile uses where scipy is not installed
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.13145, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.04523, 2.042272)
_T975_TAIL = ((40, 2.021075), (60, 2.000298), (120, 1.97993))  # beyond 30 without scipy: the next df below


def t_quantile(df: int) -> float:
    """Student's t at 0.975 with ``df`` degrees of freedom: the 95% two-sided interval's multiplier."""
    try:
        from scipy import stats
    except ImportError:
        if df <= len(_T975):
            return _T975[df - 1]
        return next((t for d, t in reversed(_T975_TAIL) if df >= d), _T975[-1])
    return float(stats.t.ppf(0.975, df))


def _cell(values: pd.Series, decimals: int) -> str:
    """One run's value, or over seeds ``mean ± half-width of the 95% t interval (n=seeds)`` (module doc)."""
    values = values.dropna().astype(float)
    if values.empty:  # finished runs without this value (e.g. a +GPTQ column of an integer method)
        return NOT_APPLICABLE
    n = len(values)
    if n == 1:
        return f"{values.iloc[0]:.{decimals}f}"
    half = t_quantile(n - 1) * values.std(ddof=1) / math.sqrt(n)
    return f"{values.mean():.{decimals}f} ± {half:.{decimals}f} (n={n})"


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == Status.OK.value] if "status" in runs else runs


def _not_ok(runs: pd.DataFrame) -> str:
    """What a cell without a finished run says (the first of :data:`NOT_OK` among its runs, else missing)."""
    statuses = set(runs["status"]) if "status" in runs else set()
    return next((s for s in NOT_OK if s in statuses), MISSING)


def _newest_per_seed(ok: pd.DataFrame, row: dict[str, Any]) -> pd.DataFrame:
    """One run per seed: where a cell holds several records of one seed, the newest, with a warning."""
    if "seed" not in ok or not ok["seed"].duplicated().any():
        return ok
    order = ok.sort_values("finished", na_position="first") if "finished" in ok else ok
    for seed, runs in order.groupby("seed"):
        if len(runs) > 1:
            warn(f"{row}: {len(runs)} records of seed {seed} ({', '.join(map(str, runs.get('run_dir', [])))}); "
                 "kept the newest")
    return order.drop_duplicates("seed", keep="last")


def _expected_grids(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """``expect`` as a list of grids: one mapping (a full grid), or a list of them (rows not in every product)."""
    expect = spec.get("expect") or {}
    return list(expect) if isinstance(expect, list) else [expect]


def _grid(frame: pd.DataFrame, spec: dict[str, Any]) -> list[tuple]:
    keys, rows = list(spec["rows"]), []
    for expect in _expected_grids(spec):
        values = [expect.get(k) or sorted(frame[k].dropna().unique().tolist()) if k in frame or k in expect else []
                  for k in keys]
        rows += [r for r in itertools.product(*values) if r not in rows]
    return rows


def _ratios(frame: pd.DataFrame, spec: dict[str, Any], row: dict[str, Any], runs: pd.DataFrame,
            own: str) -> dict[str, str]:
    """``label / <reference>`` cells: this row's mean over the reference row's mean (same other row keys).

    A row without an ok run shows its own status there (``own``); a reference without one, ``ref. <status>``."""
    relative = spec.get("relative")
    if not relative:
        return {}
    candidates = select_runs(frame, {**{k: v for k, v in row.items() if k not in relative["to"]}, **relative["to"]})
    reference = _ok(candidates)
    name = "/".join(str(v) for v in relative["to"].values())
    out = {}
    for label in relative["columns"]:
        mine, ref = _values(runs, spec["columns"][label]).mean(), _values(reference, spec["columns"][label]).mean()
        if pd.isna(mine) or pd.isna(ref) or not ref:
            cell = own if runs.empty else f"ref. {_not_ok(candidates)}" if reference.empty else MISSING
        else:
            cell = f"{mine / ref:.2f}"
        out[f"{label} / {name}"] = cell
    return out


def build_table(frame: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """Rows ``spec['rows']`` x metric columns ``spec['columns']``, mean ± 95% CI over seeds (see the module doc)."""
    keys, columns = list(spec["rows"]), dict(spec["columns"])
    frame = select_runs(frame, spec.get("where", {}))
    out = []
    for combo in _grid(frame, spec):
        row = dict(zip(keys, combo))
        runs = select_runs(frame, row)
        ok = _newest_per_seed(_ok(runs), row)
        for label, column in columns.items():
            row[label] = _not_ok(runs) if ok.empty else _cell(_values(ok, column), spec.get("decimals", 2))
        row |= _ratios(frame, spec, dict(zip(keys, combo)), ok, _not_ok(runs))
        row["seeds"] = len(ok)
        out.append(row)
    return pd.DataFrame(out)


def paper_vs_reproduced(table: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame | None:
    """Cells the paper reports (``spec['paper']``: list of {rows..., column, value}) beside ours."""
    if not spec.get("paper"):
        return None
    keys, rows = list(spec["rows"]), []
    for cell in spec["paper"]:
        match = select_runs(table, {k: cell[k] for k in keys})
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


def _plot_spec(spec: dict[str, Any]) -> dict[str, Any] | None:
    plot = spec.get("plot")
    if not plot:
        return None
    plot = {"y": plot} if isinstance(plot, str) else dict(plot)
    return {"x": "bits", "series": "method", "log": True, "kind": "line", **plot}


def _draw(ax: Any, ok: pd.DataFrame, plot: dict[str, Any], order: list[Any]) -> None:
    x, y, series = plot["x"], plot["y"], plot["series"]
    if plot.get("categorical"):  # e.g. group sizes with -1 for per channel: evenly spaced, in table order
        ok = ok.assign(**{x: ok[x].map({v: i for i, v in enumerate(order)})})
        ax.set_xticks(range(len(order)), [str(v) for v in order])
    if plot["kind"] == "bar":
        means = ok.groupby(x)[y].mean()
        ax.bar([str(k) for k in means.index], means.values)
        ax.tick_params(axis="x", labelrotation=45)
        return
    for name, group in ok.groupby(series):
        means = group.groupby(x)[y].mean().sort_index()
        ax.plot(means.index, means.values, marker="o", label=str(name))
    ax.legend(fontsize=7)


def plot_table(frame: pd.DataFrame, spec: dict[str, Any], out: Path) -> Path | None:
    """The spec's plot (mean over seeds of ok runs), or None when the spec has none or no run has the data."""
    plot = _plot_spec(spec)
    frame = select_runs(frame, {**spec.get("where", {}), **((plot or {}).get("where") or {})})
    if plot is None or any(k not in frame for k in (plot["x"], plot["y"])):
        return None
    ok = _ok(frame).dropna(subset=[plot["y"], plot["x"]])
    if ok.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [x for grid in _expected_grids(spec) for x in grid.get(plot["x"]) or []]
    _draw(ax, ok, plot, list(dict.fromkeys(xs)) or sorted(ok[plot["x"]].unique()))
    ax.set_xlabel(plot["x"])
    ax.set_ylabel(plot.get("label", plot["y"]))
    if plot["log"]:
        ax.set_yscale("log")
    ax.set_title(spec["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120, metadata={"Software": None})  # no version stamp: regenerated files stay equal
    plt.close(fig)
    return out


def load_store(runs: str | Path | None, wandb_project: str | None = None) -> pd.DataFrame:
    """Every run of the local store and, when given, of a wandb project (or a folder of wandb run files), as
    one frame."""
    frames = [load_runs(runs)] if runs else []
    if wandb_project:
        frames.append(load_wandb_runs(wandb_project))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def report(spec_path: str | Path, runs: str | Path | None, out: str | Path, wandb_project: str | None = None,
           frame: pd.DataFrame | None = None) -> list[Path]:
    """Write the tables (and plot) that ``spec_path`` describes; returns the files written."""
    spec = yaml.safe_load(Path(spec_path).read_text())
    frame = load_store(runs, wandb_project) if frame is None else frame
    out = Path(out)
    table = build_table(frame, spec)
    written = write_table(table, out, spec["name"], spec.get("caption", spec["name"]))
    versus = paper_vs_reproduced(table, spec)
    if versus is not None:
        written += write_table(versus, out, f"{spec['name']}_paper_vs_reproduced",
                               f"Paper vs reproduced: {spec.get('caption', spec['name'])}")
    plot = plot_table(frame, spec, out / f"{spec['name']}.png") if not frame.empty else None
    return written + ([plot] if plot else [])

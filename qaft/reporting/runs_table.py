"""``qaft-report runs=STORE`` without a spec: one table of every run in a store, for runs no spec describes.

A row per run (:func:`qaft.reporting.store.load_runs`): its folder name, its status, the headline metrics where
any run has them, and a column per config key whose value differs between the runs (keys equal in every run that
records them say nothing about a difference, so they are named once under the table instead). The metrics:

* ``ppl deployed``: the perplexity of the model the run deployed, from the run's own final evaluation
  (``eval.seq_len``-token windows, 512 by default, over ``metrics.eval_tokens`` tokens);
* ``<task> acc`` / ``acc_norm``: lm-eval accuracies of the run's final evaluation;
* ``qaft-eval <form> ppl (<n>-token windows)`` and ``qaft-eval <form> <task> acc``: what ``qaft-eval run_dir=``
  added to the record (its windows are 2,048 tokens by default: a lower number than the run's own on the same model).
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

# Columns of a run's row that are not its config: what happened, when, where, and what it measured.
NOT_CONFIG = ("status", "finished", "identity", "run_dir", "error", "wakv", "sha256")
NOT_CONFIG_PREFIXES = ("metrics.", "timings.", "eval.", "environment", "item_scores", "traceback", "non_finite")
ACCURACIES = "acc|acc_norm"
RUN_ACC = re.compile(rf"metrics\.lm_eval\.results\.(?P<task>[^.]+)\.scores\.(?P<metric>{ACCURACIES})")
EVAL_ACC = re.compile(rf"eval\.(?P<form>[^.]+)\.lm_eval\.results\.(?P<task>[^.]+)\.scores\.(?P<metric>{ACCURACIES})")
EVAL_PPL = re.compile(r"eval\.(?P<form>[^.]+)\.perplexity\.value")
DECIMALS = 4


def config_columns(frame: pd.DataFrame) -> list[str]:
    """The config keys of the frame's rows (``method``, ``bits``, ``method_config.init``, ...); a
    ``method_config.<key>`` that repeats a top-level key of the same values is left out."""
    keys = [c for c in frame.columns if c not in NOT_CONFIG and not c.startswith(NOT_CONFIG_PREFIXES)]
    return [k for k in keys if not (k.startswith("method_config.") and _repeats(frame, k, k.split(".", 1)[1]))]


def _repeats(frame: pd.DataFrame, key: str, top: str) -> bool:
    """Whether ``key`` holds ``top``'s value in every run that has it."""
    if top not in frame:
        return False
    values = _text(frame[key])
    return bool(((values == "") | (values == _text(frame[top]))).all())


def _value_text(value: object) -> str:
    """A config value as a cell: blank where a run has none; an integer read as a float (a column with blanks)
    as the integer."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _text(column: pd.Series) -> pd.Series:
    return column.map(_value_text)


def varying(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """The keys with more than one value among the runs that record them (a run that never finished may lack one)."""
    return [k for k in keys if _text(frame[k]).replace("", pd.NA).nunique() > 1]


def metric_columns(frame: pd.DataFrame) -> dict[str, str]:
    """Headline metric column -> its label, in the order: the run's deployed perplexity, its lm-eval accuracies,
    then what ``qaft-eval`` added."""
    labels: dict[str, str] = {}
    if "metrics.deployed" in frame:
        labels["metrics.deployed"] = "ppl deployed"
    labels |= {c: f"{m['task']} {m['metric']}" for c in frame.columns if (m := RUN_ACC.fullmatch(c))}
    for column in frame.columns:
        if m := EVAL_PPL.fullmatch(column):
            lengths = _text(frame.get(f"eval.{m['form']}.perplexity.seq_len", pd.Series(dtype=object)).dropna())
            windows = f" ({'/'.join(sorted(set(lengths)))}-token windows)" if len(lengths) else ""
            labels[column] = f"qaft-eval {m['form']} ppl{windows}"
    labels |= {c: f"qaft-eval {m['form']} {m['task']} {m['metric']}" for c in frame.columns
               if (m := EVAL_ACC.fullmatch(c))}
    return labels


def runs_table(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, object]]:
    """The table of every run, and the config keys that are the same in every run (with their one value)."""
    if frame.empty:
        return pd.DataFrame(columns=["run", "status"]), {}
    keys = config_columns(frame)
    differs = varying(frame, keys)
    same = {k: frame[k].dropna().iloc[0] for k in keys if k not in differs and frame[k].notna().any()}
    metrics = metric_columns(frame)
    table = pd.DataFrame({"run": frame["run_dir"].map(lambda p: Path(str(p)).name), "status": frame["status"]})
    for column, label in metrics.items():  # before the config columns, which can be many
        values = pd.to_numeric(frame[column], errors="coerce")
        table[label] = values.map(lambda v: "" if pd.isna(v) else f"{v:.{DECIMALS}f}")
    for key in differs:
        table[key] = _text(frame[key])
    sort = [k for k in ("experiment", "method", "bits", "group_size", "seed") if k in differs] + ["run"]
    return table.sort_values(sort, kind="stable").reset_index(drop=True), same


def render(table: pd.DataFrame, same: dict[str, object], store: str) -> str:
    """The table as Markdown, with the store it came from and the keys every run shares."""
    body = table.to_markdown(index=False, disable_numparse=True) if len(table) else "(no runs)"
    shared = ", ".join(f"{k}={v}" for k, v in same.items())
    notes = [f"{len(table)} runs in {store}"] + ([f"the same in every run that records it: {shared}"] if shared else [])
    notes.append("ppl deployed: the run's own final evaluation (eval.seq_len-token windows, 512 by default)")
    return body + "\n\n" + "\n".join(notes) + "\n"


def write_runs_table(text: str, table: pd.DataFrame, out: Path) -> list[Path]:
    """``runs.md`` (what was printed) and ``runs.csv`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.md").write_text(text)
    table.to_csv(out / "runs.csv", index=False)
    return [out / "runs.md", out / "runs.csv"]


__all__ = ["config_columns", "metric_columns", "render", "runs_table", "varying", "write_runs_table"]

"""Claims as data: every claim of the papers (and our own findings) tested against run records, with a verdict.

A claim file (``experiments/claims/*.yaml``) holds ``claims:``, a list of::

    id: dlqat_beats_qalora_g64_w4          # unique across the files read together
    source: 'DL-QAT, Sec. 4.2: "our technique surpasses the benchmark across different quantization bits ..."'
    metric: metrics.deployed               # a record key: metrics.deployed, metrics.ppl_<form> (a scored model
                                           # form), metrics.ppl_<corpus> (eval.corpus: ppl_wikitext2), or an
                                           # lm-eval metrics.lm_eval.results.<task>.scores.acc / acc_norm
    better: lower                          # lower | higher: the direction in which a is claimed better
    a: {preset: dlqat}                     # the side claimed better: record filters (flattened keys, as
    b: {preset: qalora}                    #   report specs' ``where``; a list value matches any of them)
    where: {experiment: groupwise, scale: tiny, bits: 4}   # filters common to both sides

The claims of ``experiments/claims/*.yaml`` name no ``scale``: run them on one scale's store
(``results/tiny/records.jsonl``); on a store holding both, every side matches two configs (they differ in
``scale``) and is refused. Their group sizes and experiment names are tiny scale's (groups of 64; 32 / 64 / 192
in Table 6). ``experiments/claims/paper/*.yaml`` holds the same claims, under the same ids, at ``scale: paper``
(groups of 128, so ``g192`` ids read ``g128``; Table 1c's ``*_64_steps_*`` are tiny scale only), measured as the
papers measure (WikiText-2 perplexity, lm-eval tasks: each file's header says which and why), plus claims with an
``_mmlu0`` / ``_mmlu5`` / ``_hellaswag`` suffix beside a perplexity claim where the paper printed accuracies.
They carry the papers' own numbers and protocol in an optional ``paper:`` field
(:mod:`qaft.reporting.claims_paper`: its keys, their checks, and the paper's effect, computed as ours, beside
ours in every output file)::

    qaft-report claims='experiments/claims/paper/*.yaml' runs=runs out=results/paper

A side may also name ``metric:`` (e.g. QLoRA's ``metrics.ppl_merged_gptq`` against QA-LoRA-on-GPTQ's deployed
perplexity), which replaces the claim's metric for that side; both must be of the same kind.

Effect (positive: the claim's direction holds): for perplexities the log ratio, ``log(ppl_b / ppl_a)`` where
lower is better (``log(ppl_a / ppl_b)`` where higher is); for accuracies the difference in points,
``100 (acc_a - acc_b)`` where higher is better (``100 (acc_b - acc_a)`` where lower is). Its 95% interval comes
from :mod:`qaft.reporting.bootstrap` (seeds, paired where both sides share two or more, and eval items, paired) and
the verdict is ``held`` (interval above 0), ``reversed`` (below), ``inconclusive``, or ``missing`` (a side
without an ok run with the metric; the runs absent are named).

Runs without item scores (records written before :func:`item_scores` existed): the seed bootstrap runs on the
recorded metric alone where each side has at least 2 seeds (paired: 2 shared seeds); otherwise the verdict is
``inconclusive`` with no interval and ``n_items`` 0 -- one run per side cannot tell a difference from noise.
Where only some runs have item scores, none are used (items must be the same on every run compared).

Bad claim files are refused before anything is written (:class:`ClaimError`, one line naming the claim and the
field): an unknown metric (a ``metrics.ppl_<corpus>`` no record of the store has is unknown), a bad ``paper:``
field, a filter key no record of the store has (nor any run record has by construction:
:data:`BASE_KEYS`), or a side whose ok runs differ in anything but their seed (e.g. ``preset: dlqat`` in
Table 2's experiment matches both weight-only and 4-8-8 runs: add ``wakv``).

    qaft-report claims='experiments/claims/*.yaml' runs=results/tiny/records.jsonl out=results/tiny
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from qaft.evaluation.deployed import DEPLOYED_FORMS, ModelForm
from qaft.reporting.bootstrap import SideScores, bootstrap_effect, verdict
from qaft.reporting.claims_output import write_outputs
from qaft.reporting.claims_paper import PaperError, PaperNumbers, parse_paper
from qaft.reporting.store import _archived, _read, _row, warn
from qaft.reporting.tables import _newest_per_seed, _not_ok, _ok, select_runs
from qaft.run_folder import RECORD_FILE, CorruptRun, read_item_scores

# The perplexities a run record can hold: the deployed model's and each scored form's (qaft.evaluation.deployed),
# on the held-out split of the run's data; and the deployed model's on eval.corpus (metrics.ppl_<corpus name>,
# a name the config chooses: known only to the store, checked by validate).
FORM_PERPLEXITY = re.compile(rf"^metrics\.(deployed|{'|'.join(form.key for form in ModelForm)})$")
PERPLEXITY = re.compile(r"^metrics\.(deployed|ppl_[a-z0-9_]+)$")
ACCURACY = re.compile(r"^metrics\.lm_eval\.results\..+\.scores\.(acc|acc_norm)$")
BETTER = ("lower", "higher")
# Keys every run record has (or its report row derives), whether or not this store holds a run with them.
BASE_KEYS = frozenset({"method", "preset", "bits", "group_size", "experiment", "scale", "model", "data", "rank",
                       "steps", "seed", "status", "wakv"})
# Row keys that say how a run went, not what it was asked to compute: two runs differing only here (and in the
# seed) are one config.
OUTCOME_KEYS = frozenset({"seed", "run_dir", "finished", "status", "error", "identity", "sha256", "item_scores",
                          "item_scores_sha256", "item_scores_rows", "non_finite", "traceback", "eval"})
OUTCOME_PREFIXES = ("metrics.", "timings.", "environment.", "item_scores.", "item_scores_sha256.",
                    "item_scores_rows.", "non_finite.", "eval.")
MISSING = "missing"
ROW_ID = "_record"  # the frame column holding each row's index into the raw records


class ClaimError(ValueError):
    """A bad claim file: one line naming the claim and the field; exit status 2, nothing written."""


@dataclass(frozen=True)
class Claim:
    """One claim (module doc): ``a`` is the side claimed better by ``metric`` in direction ``better``."""

    id: str
    source: str
    metric: str
    better: str
    a: dict[str, Any]
    b: dict[str, Any]
    where: dict[str, Any] = field(default_factory=dict)
    metric_a: str = ""
    metric_b: str = ""
    paper: PaperNumbers | None = None

    @property
    def kind(self) -> str:
        return "perplexity" if PERPLEXITY.match(self.metric) else "accuracy"


def _metric_kind(claim_id: str, name: str, metric: Any) -> str:
    if isinstance(metric, str) and PERPLEXITY.match(metric):
        return "perplexity"
    if isinstance(metric, str) and ACCURACY.match(metric):
        return "accuracy"
    raise ClaimError(f"claim {claim_id!r}: {name} {metric!r} is not a known metric (metrics.deployed, "
                     f"{', '.join(f'metrics.{f.key}' for f in ModelForm)}, metrics.ppl_<eval.corpus name>, "
                     "metrics.lm_eval.results.<task>.scores.acc|acc_norm)")


def _claim(entry: Any, path: Path) -> Claim:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        raise ClaimError(f"{path}: every claim needs an 'id' (got {entry!r:.80})")
    cid = entry["id"]
    unknown = set(entry) - {"id", "source", "metric", "better", "a", "b", "where", "paper"}
    if unknown:
        raise ClaimError(f"claim {cid!r}: unknown field {min(unknown)!r}")
    for name in ("source", "metric", "better", "a", "b"):
        if name not in entry:
            raise ClaimError(f"claim {cid!r}: missing field {name!r}")
    if entry["better"] not in BETTER:
        raise ClaimError(f"claim {cid!r}: better {entry['better']!r} is not lower or higher")
    for name in ("a", "b", "where"):
        if not isinstance(entry.get(name, {}), dict):
            raise ClaimError(f"claim {cid!r}: {name} must be a mapping of record filters")
    kind = _metric_kind(cid, "metric", entry["metric"])
    sides = {name: dict(entry[name]) for name in ("a", "b")}
    metrics = {name: side.pop("metric", entry["metric"]) for name, side in sides.items()}
    for name, metric in metrics.items():
        if _metric_kind(cid, f"{name}.metric", metric) != kind:
            raise ClaimError(f"claim {cid!r}: {name}.metric {metric!r} is not a {kind} like {entry['metric']!r}")
    try:
        paper = parse_paper(entry["paper"], kind, (metrics["a"], metrics["b"])) if "paper" in entry else None
    except PaperError as err:
        raise ClaimError(f"claim {cid!r}: {err}") from None
    return Claim(cid, str(entry["source"]), entry["metric"], entry["better"], sides["a"], sides["b"],
                 dict(entry.get("where") or {}), metrics["a"], metrics["b"], paper)


def load_claims(paths: list[Path]) -> list[Claim]:
    """The claims of ``paths``, in order; :class:`ClaimError` for a malformed one or a repeated id."""
    claims: list[Claim] = []
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ClaimError(f"{path}: unreadable claim file ({type(err).__name__})") from None
        entries = data.get("claims") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ClaimError(f"{path}: expected a top-level 'claims:' list")
        for entry in entries:
            claim = _claim(entry, Path(path))
            if any(c.id == claim.id for c in claims):
                raise ClaimError(f"claim {claim.id!r}: id repeated")
            claims.append(claim)
    return claims


def load_records(store: str | Path) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The store's run records (a folder of run folders, or a records ``.jsonl``) and their report rows; each
    row's :data:`ROW_ID` is its record's index. A run folder's ``run_dir`` is where it is now."""
    store = Path(store)
    if store.is_file():
        records = _archived(store)
    else:
        records = [{**r, "run_dir": str(p.parent)} for p in sorted(store.rglob(RECORD_FILE)) if (r := _read(p))]
    frame = pd.DataFrame([{**_row(r), ROW_ID: i} for i, r in enumerate(records)])
    return records, frame


def _config(row: pd.Series) -> dict[str, str]:
    return {k: json.dumps(v if not (isinstance(v, float) and math.isnan(v)) else None, default=str)
            for k, v in row.items() if k != ROW_ID and k not in OUTCOME_KEYS and not k.startswith(OUTCOME_PREFIXES)}


def _check_one_config(claim: Claim, side: str, runs: pd.DataFrame) -> None:
    configs = [_config(row) for _, row in runs.iterrows()]
    for other in configs[1:]:
        differ = sorted(k for k in set(configs[0]) | set(other) if configs[0].get(k) != other.get(k))
        if differ:
            raise ClaimError(f"claim {claim.id!r}: side {side} matches runs of different configs "
                             f"(they differ in {', '.join(map(repr, differ))}); "
                             f"add a filter on one of them to {side} or where")


def side_runs(claim: Claim, side: str, frame: pd.DataFrame) -> pd.DataFrame:
    """The ok runs a side selects, one per seed (the newest), checked to be one config."""
    filters = {**claim.where, **(claim.a if side == "a" else claim.b)}
    runs = _ok(select_runs(frame, filters)) if not frame.empty else frame
    _check_one_config(claim, side, runs)
    return _newest_per_seed(runs, filters) if len(runs) else runs


def validate(claims: list[Claim], frame: pd.DataFrame) -> None:
    """:class:`ClaimError` for a corpus perplexity or a filter key unknown to this store, or a side matching two
    configs."""
    known = BASE_KEYS | set(frame.columns)
    for claim in claims:
        for side, metric in (("a", claim.metric_a), ("b", claim.metric_b)):
            name = "metric" if metric == claim.metric else f"{side}.metric"
            if not FORM_PERPLEXITY.match(metric) and PERPLEXITY.match(metric) and metric not in frame:
                raise ClaimError(f"claim {claim.id!r}: {name} {metric!r} is in no run record of this store "
                                 "(metrics.ppl_<eval.corpus name>: did the runs set eval.corpus?)")
        for name, filters in (("where", claim.where), ("a", claim.a), ("b", claim.b)):
            for key in filters:
                if key not in known:
                    raise ClaimError(f"claim {claim.id!r}: {name} filter key {key!r} is in no run record")
        for side in ("a", "b"):
            side_runs(claim, side, frame)


def item_scores(record: dict[str, Any], key: str, base: str | Path | None = None) -> pd.DataFrame | None:
    """The per-item scores a run record names for metric ``key`` (:func:`qaft.run_folder.read_item_scores`: rows an
    archive embeds, else the run folder's file, checked against the record's digest), or None where it names none or
    they cannot be read (named on stderr: the recorded metric alone is used then)."""
    try:
        return pd.DataFrame(read_item_scores(record, key, base))
    except KeyError:
        return None
    except CorruptRun as err:
        warn(f"{err}; using the recorded {key} alone")
        return None


def _item_table(record: dict[str, Any], metric: str) -> pd.DataFrame | None:
    """A run's items for ``metric`` as ``num`` / ``den`` indexed by item id (``metrics.deployed``: the deployed
    form's own scores where the run names none for ``metrics.deployed`` itself)."""
    keys = [metric]
    if metric == "metrics.deployed":
        metrics = record.get("metrics") or {}
        form = DEPLOYED_FORMS.get((metrics.get("deployed") or {}).get("form"),
                                  ModelForm.MERGED_PTQ if ModelForm.MERGED_PTQ.key in metrics else ModelForm.MERGED)
        keys.append(f"metrics.{form.key}")
    table = next((t for k in keys if (t := item_scores(record, k)) is not None), None)
    if table is None or table.empty:
        return None
    if "item" not in table or not ("correct" in table or {"nll_sum", "tokens"} <= set(table.columns)):
        warn(f"{record.get('run_dir')}: item scores for {metric} lack item and correct or nll_sum + tokens; "
             "using the recorded value alone")
        return None
    if "correct" in table:
        num, den = table["correct"].astype(float), pd.Series(1.0, index=table.index)
    else:
        num, den = table["nll_sum"].astype(float), table["tokens"].astype(float)
    return pd.DataFrame({"num": num.values, "den": den.values}, index=table["item"].astype(str).values)


@dataclass
class Sides:
    """Both sides' scores, aligned: shared seeds (paired) or each side's own, shared items or none."""

    a: SideScores
    b: SideScores
    items: bool


def _scalar(value: float, kind: str) -> float:
    return math.log(value) if kind == "perplexity" else value


def build_sides(claim: Claim, runs: dict[str, pd.DataFrame], records: list[dict[str, Any]]) -> Sides:
    """Each side's runs as :class:`SideScores`: only shared seeds where at least two are shared (paired by
    seed), else each side's own (unpaired: a pairing over one seed would resample no seed at all, and a side of
    one run, e.g. RTN PTQ, whose every seed is the same run, would throw away the other side's other seeds);
    the items every run has for its metric, or, where a run has none, each run's recorded value."""
    metric = {"a": claim.metric_a, "b": claim.metric_b}
    seeds = {s: [int(x) for x in runs[s]["seed"].fillna(0)] for s in runs}
    shared = sorted(set(seeds["a"]) & set(seeds["b"]))
    chosen = {s: runs[s].assign(seed=seeds[s]).set_index("seed").loc[shared if len(shared) > 1 else sorted(seeds[s])]
              for s in runs}
    tables = {s: [_item_table(records[int(i)], metric[s]) for i in chosen[s][ROW_ID]] for s in runs}
    items = all(t is not None for ts in tables.values() for t in ts)
    if items:
        common = sorted(set.intersection(*(set(t.index) for ts in tables.values() for t in ts)))
        items = bool(common)
    out = {}
    for s, frame in chosen.items():
        if items:
            num = np.stack([t.loc[common, "num"].to_numpy() for t in tables[s]])
            den = np.stack([t.loc[common, "den"].to_numpy() for t in tables[s]])
        else:
            num = np.array([[_scalar(float(v), claim.kind)] for v in frame[metric[s]]])
            den = np.ones_like(num)
        out[s] = SideScores(tuple(frame.index), num, den)
    return Sides(out["a"], out["b"], items)


def _absent(claim: Claim, runs: dict[str, pd.DataFrame], frame: pd.DataFrame) -> str:
    """Which side has no ok run with the metric, by its filters, and what its runs did instead (``failed``,
    ``diverged``, ...; ``missing``: no run at all, or ok runs without the metric)."""
    gone = []
    for side in ("a", "b"):
        if runs[side].empty:
            filters = {**claim.where, **(claim.a if side == "a" else claim.b)}
            status = _not_ok(select_runs(frame, filters)) if not frame.empty else MISSING
            gone.append(f"{side} {status}: {{{', '.join(f'{k}: {v}' for k, v in filters.items())}}}")
    return "no ok run with the metric for " + "; ".join(gone)


def _run_names(runs: pd.DataFrame) -> list[str]:
    """The run folders' names (not their paths: a store moves between machines, the names do not)."""
    return sorted(Path(str(d)).name for d in runs.get("run_dir", []))


def evaluate(claim: Claim, frame: pd.DataFrame, records: list[dict[str, Any]],
             resamples: int | None = None) -> dict[str, Any]:
    """The claim's row of ``claims.json`` (see the module doc for the effect, interval and verdict), with the
    paper's numbers and effect where the claim has them (:mod:`qaft.reporting.claims_paper`)."""
    row = _evaluate(claim, frame, records, resamples)
    if claim.paper is None:
        return row
    return row | claim.paper.row(claim.kind, claim.better, (row["ci_low"], row["ci_high"]))


def _evaluate(claim: Claim, frame: pd.DataFrame, records: list[dict[str, Any]],
              resamples: int | None) -> dict[str, Any]:
    runs = {}
    for s in ("a", "b"):
        found = side_runs(claim, s, frame)
        col = claim.metric_a if s == "a" else claim.metric_b
        runs[s] = found[found[col].notna()] if col in found else found.iloc[0:0]
    row: dict[str, Any] = {"id": claim.id, "metric": claim.metric, "better": claim.better,
                           "unit": "log ratio" if claim.kind == "perplexity" else "points",
                           "verdict": MISSING, "effect": None, "ci_low": None, "ci_high": None,
                           "n_seeds": 0, "seeds_a": 0, "seeds_b": 0, "n_items": 0, "paired_seeds": False, "note": "",
                           "source": claim.source,
                           "a_runs": _run_names(runs["a"]), "b_runs": _run_names(runs["b"])}
    if runs["a"].empty or runs["b"].empty:
        return row | {"note": _absent(claim, runs, frame)}
    sides = build_sides(claim, runs, records)
    paired = sides.a.seeds == sides.b.seeds
    n_seeds = min(len(sides.a.seeds), len(sides.b.seeds))
    row |= {"n_seeds": n_seeds, "seeds_a": len(sides.a.seeds), "seeds_b": len(sides.b.seeds),
            "n_items": sides.a.num.shape[1] if sides.items else 0, "paired_seeds": paired}
    scale = 1.0 if claim.kind == "perplexity" else 100.0  # log perplexity; accuracy in points
    sign = -1.0 if claim.better == "lower" else 1.0
    if not sides.items and n_seeds < 2:
        effect = sign * (sides.a.stat(scale) - sides.b.stat(scale))
        return row | {"verdict": "inconclusive", "effect": effect,
                      "note": "no item scores and fewer than 2 seeds a side: no interval"}
    rng = np.random.default_rng(zlib.crc32(claim.id.encode()))  # per claim: adding claims changes no other
    kwargs = {"resamples": resamples} if resamples else {}
    interval = bootstrap_effect(sides.a, sides.b, sign, scale, items=sides.items, rng=rng, **kwargs)
    return row | {"verdict": verdict(interval.low, interval.high), "effect": interval.effect,
                  "ci_low": interval.low, "ci_high": interval.high, "note": _interval_note(sides)}


def _interval_note(sides: Sides) -> str:
    """What the interval does not cover: training noise of a side with one run, or the eval items."""
    counts = {"a": len(sides.a.seeds), "b": len(sides.b.seeds)}
    if max(counts.values()) < 2:
        return "one seed a side: the interval covers eval items only"
    if min(counts.values()) < 2:  # e.g. RTN PTQ: the seed changes nothing it computes, so all seeds are one run
        one, other = sorted(counts, key=counts.get)
        return (f"{one}: one run (one seed, or a method the seed does not change), so the interval covers "
                f"{other}'s {counts[other]} seeds and the eval items")
    return "" if sides.items else "no item scores: seeds resampled on the recorded metric"


def prepare(paths: list[Path], store: str | Path) -> tuple[list[Claim], pd.DataFrame, list[dict[str, Any]]]:
    """Claims read and checked against the store, before anything is computed or written."""
    claims = load_claims(paths)
    records, frame = load_records(store)
    validate(claims, frame)
    return claims, frame, records


def report_claims(claims: list[Claim], frame: pd.DataFrame, records: list[dict[str, Any]],
                  out: str | Path) -> list[Path]:
    """Every claim's verdict as ``claims.md``, ``claims.csv``, ``claims.json`` and ``claims.png`` in ``out``."""
    rows = [evaluate(claim, frame, records) for claim in claims]
    return write_outputs(rows, Path(out))

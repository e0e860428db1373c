"""Claims as data (qaft.reporting.claims): the bootstrap against known truth, verdicts end to end through
``qaft-report claims=``, bad claim files refused in one line, the shipped claim files valid on the tiny
records, and the paper-scale claim files (with the papers' numbers) valid on a synthetic paper-scale store."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from qaft.reporting.bootstrap import SideScores, bootstrap_effect
from qaft.reporting.claims import Claim, load_claims, load_records, validate
from qaft.reporting.claims_output import COLUMNS
from qaft.reporting.cli import main
from qaft.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[2]
ACC = "metrics.lm_eval.results.quiz_mc:0.scores.acc"
PAPER = {"a": 6.3, "b": 9.5, "table": "a table", "protocol": {"metric": "token_perplexity", "window": 2048}}


def test_null_claims_cover_zero_95_percent() -> None:
    """400 claims with no true difference: both sides answer the same 60 questions (each of its own difficulty,
    shared by the sides) with independent 0/1 outcomes, one seed a side, so the paired item bootstrap is the
    whole story. 1,000 resamples (not 2,000) keep it to ~2 s; the Monte Carlo error of a 2.5% percentile at
    B = 1,000 moves coverage by well under the 3% allowed. The interval must cover 0 in 95% +- 3% of them."""
    rng = np.random.default_rng(2025)
    covered = 0
    for _ in range(400):
        difficulty = rng.beta(2, 2, size=60)
        a, b = (SideScores((0,), (rng.random((1, 60)) < difficulty).astype(float), np.ones((1, 60)))
                for _ in range(2))
        interval = bootstrap_effect(a, b, 1.0, 100.0, items=True, rng=rng, resamples=1000)
        covered += interval.low <= 0 <= interval.high
    assert 0.92 <= covered / 400 <= 0.98, covered / 400


def _run(tmp_path: Path, name: str, seed: int, preset: str, nll: np.ndarray, correct: np.ndarray | None = None,
         files: bool = True) -> dict:
    """A run record whose perplexity and accuracy are exactly its item scores' (as qaft writes them)."""
    tokens = np.full(len(nll), 512)
    folder = tmp_path / "runs" / name
    metrics: dict = {"ppl_merged": float(np.exp(nll.sum() / tokens.sum()))}
    record = {"status": "ok", "experiment": "toy", "scale": "tiny", "preset": preset, "method": preset, "bits": 4,
              "group_size": 64, "seed": seed, "run_dir": str(folder), "metrics": metrics}
    items = {"metrics.ppl_merged": [{"item": i, "nll_sum": float(n), "tokens": int(t)}
                                    for i, (n, t) in enumerate(zip(nll, tokens))]}
    if correct is not None:
        metrics["lm_eval"] = {"results": {"quiz_mc:0": {"scores": {"acc": float(correct.mean())}}}}
        items[ACC] = [{"item": f"q{i}", "correct": int(c)} for i, c in enumerate(correct)]
    if files:  # written as a run writes them (qaft.run_folder), named and digested in the record
        record |= RunFolder(folder).store_item_scores(items)
    return record


def _store(tmp_path: Path, seeds: int = 3, files: bool = True, bad_seeds_from: int = 0) -> Path:
    """Presets good / bad: good's windows 0.1 nat per token lower (log-ratio 0.1), good's questions 20 points
    more often right; a fixed per-window difficulty shared by both, and run-by-window noise. Bad's seeds start
    at ``bad_seeds_from`` (not 0: no seed shared, unpaired)."""
    rng = np.random.default_rng(7)
    window = rng.normal(3.5, 0.4, size=32)
    p = rng.uniform(0.3, 0.7, size=200)
    records = []
    for seed in range(seeds):
        for preset, shift, bonus in (("good", 0.0, 0.2), ("bad", 0.1, 0.0)):
            nll = (window + shift + rng.normal(0, 0.05, size=32)) * 512
            correct = (rng.random(200) < np.clip(p + bonus, 0, 1)).astype(int)
            run_seed = seed + (bad_seeds_from if preset == "bad" else 0)
            records.append(_run(tmp_path, f"{preset}-s{run_seed}", run_seed, preset, nll, correct, files))
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _claims(tmp_path: Path, *claims: dict) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": list(claims)}))
    return path


def _claim(cid: str, a: str, b: str, metric: str = "metrics.deployed", better: str = "lower", **extra) -> dict:
    return {"id": cid, "source": "test", "metric": metric, "better": better, "a": {"preset": a},
            "b": {"preset": b}, "where": {"experiment": "toy"}, **extra}


def _report(tmp_path: Path, claims: Path, store: Path) -> dict[str, dict]:
    main([f"claims={claims}", f"runs={store}", f"out={tmp_path / 'out'}"])
    return {row["id"]: row for row in json.loads((tmp_path / "out" / "claims.json").read_text())}


def test_planted_difference_held_and_its_mirror_reversed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    claims = _claims(tmp_path, _claim("good_wins", "good", "bad"), _claim("bad_wins", "bad", "good"),
                     _claim("good_more_right", "good", "bad", metric=ACC, better="higher"),
                     _claim("bad_more_right", "bad", "good", metric=ACC, better="higher"))
    rows = _report(tmp_path, claims, store)
    assert [rows[c]["verdict"] for c in ("good_wins", "bad_wins", "good_more_right", "bad_more_right")] == [
        "held", "reversed", "held", "reversed"]
    held = rows["good_wins"]
    assert held["effect"] == pytest.approx(0.1, abs=0.01)  # the planted log ratio
    assert held["ci_low"] < held["effect"] < held["ci_high"]
    assert rows["bad_wins"]["effect"] == pytest.approx(-held["effect"])
    assert (held["n_seeds"], held["n_items"], held["paired_seeds"]) == (3, 32, True)
    assert rows["good_more_right"]["n_items"] == 200  # the embedded rows of an archive
    assert rows["good_more_right"]["effect"] == pytest.approx(20, abs=4)  # points
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    _report(tmp_path, claims, store)  # a fixed bootstrap seed: the same files again
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first
    assert {"claims.md", "claims.csv", "claims.json", "claims.png"} <= set(first)
    # no claim carries a paper's numbers: the files are what they were before the paper: field existed
    assert first["claims.csv"].decode().splitlines()[0] == ",".join(COLUMNS + ["source"])
    assert all(not k.startswith("paper") for r in rows.values() for k in r)


def test_without_item_scores_seeds_alone_or_inconclusive(tmp_path: Path) -> None:
    """Records without item scores: a seed bootstrap of the recorded metric with >= 2 seeds a side; with one,
    inconclusive, no interval, n_items 0. A side no run matches is missing, named."""
    claims = _claims(tmp_path, _claim("good_wins", "good", "bad"), _claim("absent", "good", "nobody"))
    rows = _report(tmp_path, claims, _store(tmp_path, seeds=3, files=False))
    assert (rows["good_wins"]["n_seeds"], rows["good_wins"]["n_items"]) == (3, 0)
    assert rows["good_wins"]["ci_low"] is not None and rows["good_wins"]["verdict"] == "held"
    assert rows["absent"]["verdict"] == "missing" and "preset: nobody" in rows["absent"]["note"]
    one = tmp_path / "one"
    one.mkdir()
    rows = _report(one, claims, _store(one, seeds=1, files=False))
    assert rows["good_wins"]["verdict"] == "inconclusive" and rows["good_wins"]["ci_low"] is None
    assert rows["good_wins"]["n_items"] == 0 and rows["good_wins"]["effect"] > 0


def test_sides_without_shared_seeds_are_unpaired(tmp_path: Path) -> None:
    rows = _report(tmp_path, _claims(tmp_path, _claim("good_wins", "good", "bad")),
                   _store(tmp_path, bad_seeds_from=10))
    assert (rows["good_wins"]["paired_seeds"], rows["good_wins"]["n_seeds"]) == (False, 3)
    assert rows["good_wins"]["verdict"] == "held"


def test_a_one_run_side_against_three_seeds_says_so(tmp_path: Path) -> None:
    """RTN PTQ is one run for every seed: against a 3-seed side the seeds are counted per side and the note says
    the interval covers the other side's seeds and the items (not "one seed a side")."""
    store = _store(tmp_path)
    records = [json.loads(line) for line in store.read_text().splitlines()]
    store.write_text("".join(json.dumps(r) + "\n" for r in records if r["preset"] == "good" or r["seed"] == 0))
    row = _report(tmp_path, _claims(tmp_path, _claim("good_wins", "good", "bad")), store)["good_wins"]
    assert (row["n_seeds"], row["seeds_a"], row["seeds_b"], row["paired_seeds"]) == (1, 3, 1, False)
    assert row["verdict"] == "held" and row["note"].startswith("b: one run") and "a's 3 seeds" in row["note"]
    assert "| 3 / 1 |" in (tmp_path / "out" / "claims.md").read_text()


@pytest.mark.parametrize("claim, field", [
    (_claim("bad_metric", "good", "bad", metric="metrics.ppl_nonsense"), "metric"),
    (_claim("bad_key", "good", "bad", where={"experiment": "toy", "method_config.colour": "red"}),
     "method_config.colour"),
    ({**_claim("two_configs", "good", "bad"), "a": {"experiment": "toy"}}, "preset"),  # good and bad
    ({**_claim("paper_text", "good", "bad"), "paper": {**PAPER, "a": "six"}}, "paper.a"),
    ({**_claim("paper_key", "good", "bad"), "paper": {**PAPER, "page": 3}}, "paper.page"),
    ({**_claim("paper_protocol_key", "good", "bad"),
      "paper": {**PAPER, "protocol": {"metric": "token_perplexity", "temperature": 0}}}, "paper.protocol.temperature"),
    ({**_claim("paper_acc_norm_for_acc", "good", "bad", metric=ACC, better="higher"),
      "paper": {**PAPER, "a": 60, "b": 55, "protocol": {"metric": "acc_norm", "shots": 0}}}, "paper.protocol.metric"),
])
def test_bad_claim_file_is_one_line_exit_2_nothing_written(tmp_path: Path, capsys, claim: dict,
                                                           field: str) -> None:
    store = _store(tmp_path, seeds=1)
    with pytest.raises(SystemExit) as exit_:
        main([f"claims={_claims(tmp_path, claim)}", f"runs={store}", f"out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert claim["id"] in err and field in err
    assert not (tmp_path / "out").exists()


def test_shipped_claims_parse_and_match_the_tiny_records() -> None:
    """Every claim file in experiments/claims/ parses, its filter keys are keys of the tiny records, and no
    side matches runs of two configs there."""
    claims = load_claims(sorted((ROOT / "experiments" / "claims").glob("*.yaml")))
    _, frame = load_records(ROOT / "results" / "tiny" / "records.jsonl")
    keys = {k for c in claims for side in (c.a, c.b, c.where) for k in side}
    assert keys <= set(frame.columns), keys - set(frame.columns)
    assert len(claims) >= 40
    validate(claims, frame)


def _nested(filters: dict) -> dict:
    """A run record with these report-row values (``method_config.x`` nested; ``wakv`` as bits and the
    activation / KV bits it is derived from)."""
    record: dict = {}
    for key, value in filters.items():
        if key == "wakv":
            bits, act, kv = (int(v) for v in value.split("-"))
            record.setdefault("method_config", {}).update({"act_bits": act, "kv_bits": kv})
            record["bits"] = bits
        elif "." in key:
            head, tail = key.split(".", 1)
            record.setdefault(head, {})[tail] = value
        else:
            record[key] = value
    return record


def _paper_store(tmp_path: Path, claims: list[Claim]) -> Path:
    """Three seeds of an ok run for every side of every claim (one config per distinct set of filters), with
    every metric a claim reads of it; numbers drawn at random (verdicts are not the point, only that each claim
    gets one)."""
    rng = np.random.default_rng(3)
    sides: dict[str, dict] = {}
    for claim in claims:
        for side, metric in ((claim.a, claim.metric_a), (claim.b, claim.metric_b)):
            filters = {**claim.where, **side}
            sides.setdefault(json.dumps(filters, sort_keys=True), {"filters": filters, "metrics": set()})[
                "metrics"].add(metric)
    records = []
    for n, cell in enumerate(sides.values()):
        for seed in range(3):
            metrics: dict = {"ppl_merged": float(rng.uniform(6, 10))}
            for metric in cell["metrics"]:
                key = metric.removeprefix("metrics.")
                if key.startswith("lm_eval."):
                    task, score = key.removeprefix("lm_eval.results.").split(".scores.")
                    metrics.setdefault("lm_eval", {"results": {}})["results"].setdefault(
                        task, {"scores": {}})["scores"][score] = float(rng.uniform(0.3, 0.7))
                elif key != "deployed":
                    metrics[key] = float(rng.uniform(6, 10))
            records.append({"status": "ok", "seed": seed, "run_dir": f"runs/cell{n}-s{seed}", "metrics": metrics,
                            **_nested(cell["filters"])})
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_paper_claims_get_verdicts_beside_the_papers_numbers(tmp_path: Path) -> None:
    """experiments/claims/paper/: every tiny claim again at scale: paper under its id (groups of 192 become 128;
    Table 1c is tiny only), each gets a verdict on a paper-scale store, and the papers' numbers, their effect
    (computed as ours) and protocol are in claims.json / .csv / .md."""
    files = sorted((ROOT / "experiments" / "claims" / "paper").glob("*.yaml"))
    claims = load_claims(files)
    tiny = load_claims(sorted((ROOT / "experiments" / "claims").glob("*.yaml")))
    ids = {c.id for c in claims}
    assert {c.id.replace("g192", "g128") for c in tiny if "_64_steps_" not in c.id} <= ids
    assert all(c.where.get("scale") == "paper" for c in claims)
    assert sum(c.paper is not None for c in claims) >= 10
    rows = _report(tmp_path, Path(str(ROOT / "experiments" / "claims" / "paper" / "*.yaml")),
                   _paper_store(tmp_path, claims))
    assert set(rows) == ids and {r["verdict"] for r in rows.values()} <= {"held", "reversed", "inconclusive"}
    ppl, acc = rows["dlqat_beats_qalora_per_channel_w4"], rows["dlqat_beats_qalora_groupwise_w3_mmlu0"]
    assert (ppl["paper_a"], ppl["paper_b"]) == (6.3, 9.5)  # DL-QAT Table 2, LLaMA2-7B, Wikitext2 ppl
    assert ppl["paper_effect"] == pytest.approx(math.log(9.5 / 6.3)) and ppl["unit"] == "log ratio"
    assert ppl["paper_protocol"] == {"metric": "token_perplexity", "context": 2048, "window": 2048}
    assert acc["paper_effect"] == pytest.approx(40.5 - 37.9) and acc["paper_protocol"] == {"metric": "acc", "shots": 0}
    assert acc["paper_in_ci"] == (acc["ci_low"] <= acc["paper_effect"] <= acc["ci_high"])
    assert "paper_a" not in rows["dlqat_magnitude_helps_dynamic_w4"]  # Table 3: averages only, no paper: field
    out = tmp_path / "out"
    assert "paper_effect" in (out / "claims.csv").read_text().splitlines()[0]
    md = (out / "claims.md").read_text()
    assert "| paper a | paper b | paper effect | in CI |" in md and "acc_norm, 0-shot" in md

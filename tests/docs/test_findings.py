"""README's findings are generated: records -> results/tiny/claims.json -> README's block, each step checked."""
from __future__ import annotations

import json
import re

import pytest

from qaft.reporting.claims import evaluate, prepare
from qaft.reporting.findings import BEGIN, END, FindingsError, block, main, render, updated

from helpers import ROOT

README = ROOT / "README.md"
CLAIMS = ROOT / "results" / "tiny" / "claims.json"


def test_readme_findings_are_the_generated_list() -> None:
    text = README.read_text()
    start, end = block(text)
    assert text[start:end].strip("\n") == render(json.loads(CLAIMS.read_text())), (
        "README's findings block is not generated from results/tiny/claims.json: run "
        "python -m qaft.reporting.findings results/tiny/claims.json README.md")


def test_committed_claims_are_those_of_the_committed_records() -> None:
    """claims.json is what qaft-report claims= computes today from results/tiny/records.jsonl (json round-trip:
    the file holds what json.dumps wrote)."""
    claims, frame, records = prepare(sorted((ROOT / "experiments" / "claims").glob("*.yaml")),
                                     ROOT / "results" / "tiny" / "records.jsonl")
    fresh = json.loads(json.dumps([evaluate(c, frame, records) for c in claims]))
    assert fresh == json.loads(CLAIMS.read_text())


def test_no_hand_written_verdict_counts_outside_the_block() -> None:
    """Prose may explain a verdict, never restate the tally (it would go stale when the records change)."""
    text = README.read_text()
    start, end = block(text)
    prose = text[:start] + text[end:]
    assert not re.search(r"\b\d+ `?(held|reversed|inconclusive)\b(?!-)|every claim comes out", prose)


def test_render_lists_every_claim_under_its_verdict() -> None:
    rows = [{"id": "a", "verdict": "held", "effect": 0.2, "ci_low": 0.1, "ci_high": 0.3, "unit": "log ratio",
             "n_seeds": 3, "n_items": 32, "note": ""},
            {"id": "b", "verdict": "inconclusive", "effect": -1.0, "ci_low": -2.0, "ci_high": 0.5,
             "unit": "points", "n_seeds": 3, "n_items": 150, "note": ""}]
    text = render(rows)
    assert "1 held, 0 reversed, 1 inconclusive, 0 missing" in text
    held = text[text.index("**Held (1)**"):text.index("**Reversed")]
    assert "`a`: effect +0.200 log ratio, 95% CI [+0.100, +0.300] (3 seed(s) a side, 32 item(s))" in held
    assert "`b`" in text[text.index("Inconclusive (1)"):] and "`b`" not in held
    with pytest.raises(FindingsError, match="unknown verdicts"):
        render([{**rows[0], "verdict": "probably"}])


def test_update_rewrites_only_the_block(tmp_path) -> None:
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps([{"id": "x", "verdict": "missing", "effect": None, "ci_low": None,
                                   "ci_high": None, "unit": "points", "n_seeds": 0, "n_items": 0, "note": "gone"}]))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nstale text\n{END}\noutro\n")
    assert main([str(claims), str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n") and text.endswith(f"\n{END}\noutro\n") and "stale" not in text
    assert updated(text, json.loads(claims.read_text())) == text
    readme.write_text("no block\n")
    assert main([str(claims), str(readme)]) == 2 and readme.read_text() == "no block\n"

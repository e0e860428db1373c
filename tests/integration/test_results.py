"""The committed tiny-scale tables are what qaft-report makes from the committed run records."""

import pytest

from qaft.reporting import tables as report

from helpers import ROOT

ARCHIVE = ROOT / "results" / "tiny" / "records.jsonl"
SPECS = sorted((ROOT / "experiments" / "reports").glob("*.yaml"))


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_committed_table_regenerates_from_the_archive(spec, tmp_path):
    written = report.report(spec, ARCHIVE, tmp_path)
    tables = [p for p in written if p.suffix in (".md", ".csv", ".tex")]
    assert tables
    for path in tables:
        assert path.read_text() == (ROOT / "results" / "tiny" / path.name).read_text(), path.name
    assert "missing" not in (tmp_path / f"{spec.stem}.csv").read_text()  # every cell of every table was run

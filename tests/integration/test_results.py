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


def test_run_times_sums_each_experiments_timings_and_leaves_paused_and_resumed_runs_apart(tmp_path):
    import importlib.util
    import json

    script = ROOT / "experiments" / "analysis" / "run_times.py"
    spec = importlib.util.spec_from_file_location("run_times", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = [("a", "groupwise", 0, {"total_s": 120.0}), ("b", "groupwise", 1, {"total_s": 240.0}),
            ("c", "groupwise", 2, {"total_s": 3000.0}), ("d", "steps", 0, {"total_s": 60.0}),
            ("e", "steps", 1, {"total_s": 20.0, "resumed_at_step": 10})]  # e: the last process's time only
    archive = tmp_path / "records.jsonl"
    archive.write_text("".join(json.dumps({"status": "ok", "identity": name, "experiment": exp, "seed": seed,
                                           "run_dir": f"/somewhere/{name}", "timings": timings}) + "\n"
                               for name, exp, seed, timings in runs))
    table = module.run_times(archive, paused=["c"])
    assert table.loc["groupwise"].tolist() == [2, 2, 6.0, 180.0, 1, 0]
    assert table.loc["steps"].tolist() == [1, 1, 1.0, 60.0, 0, 1]
    named = module.run_times(archive, paused=["c"], resumed=["a"])  # a record written before the field existed
    assert named.loc["groupwise"].tolist() == [1, 1, 4.0, 240.0, 1, 1]
    # records written before the field: a run whose training seconds fall short of its own logged steps was resumed
    from qaft.run_folder import RunFolder

    for name, train_s, field in (("whole", 50.0, {}), ("resumed", 10.0, {}), ("says_so", 10.0, {"resumed_at_step": 3})):
        folder = RunFolder(tmp_path / "store" / name)
        for step in range(1, 5):
            folder.append_metrics({"step": step, "train/step_s": 10.0})
        folder.write_record({"status": "ok", "timings": {"train_s": train_s, "total_s": train_s + 5, **field}})
    assert module.resumed_before_the_field(tmp_path / "store") == ["resumed"]

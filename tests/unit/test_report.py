"""qaft-report: tables from a fixture run store, missing and failed runs shown, identical when regenerated."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from qaft.reporting import tables as report

SPEC = {
    "name": "groupwise", "caption": "Held-out perplexity, groups of 64.", "rows": ["method", "bits"],
    "columns": {"ppl (deployed)": "metrics.deployed", "ppl (trained)": "metrics.ppl_trained"},
    "expect": {"method": ["l4q", "qlora", "dlqat"], "bits": [4, 3]}, "where": {"data": "austen"},
    "paper": [{"method": "l4q", "bits": 4, "column": "ppl (deployed)", "value": 5.9, "setting": "LLaMA-7B"}],
    "plot": "metrics.deployed",
}


def _record(root: Path, name: str, **fields):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    base = {"status": "ok", "data": "austen", "model": "smollm2-135m", "group_size": 64, "seed": 0}
    (folder / "record.json").write_text(json.dumps({**base, **fields}))


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "runs"
    _record(root, "a", method="l4q", bits=4, seed=0, metrics={"ppl_merged": 40.0, "ppl_trained": 40.0})
    _record(root, "b", method="l4q", bits=4, seed=1, metrics={"ppl_merged": 42.0, "ppl_trained": 42.0})
    _record(root, "c", method="qlora", bits=4, metrics={"ppl_merged": 35.0, "ppl_merged_ptq": 44.0, "ppl_trained": 35.0})
    _record(root, "d", method="l4q", bits=3, status="failed", error="RuntimeError: boom")
    _record(root, "e", method="l4q", bits=4, data="quiz", metrics={"ppl_merged": 1.0})  # filtered out
    (root / "f").mkdir()  # a run that never finished: a config, no record
    (root / "f" / "config.yaml").write_text("seed: 0\nmethod: {name: dlqat, bits: 3, group_size: 64}\n"
                                           "data: {name: austen}\n")
    spec = tmp_path / "groupwise.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return root, spec


def test_table_cells(store):
    root, _ = store
    table = report.build_table(report.load_runs(root), SPEC).set_index(["method", "bits"])
    assert table.loc[("l4q", 4), "ppl (deployed)"] == "41.00 ± 12.71 (n=2)"
    assert table.loc[("l4q", 4), "seeds"] == 2
    assert table.loc[("qlora", 4), "ppl (deployed)"] == "44.00"  # +PTQ of the float merge
    assert table.loc[("qlora", 4), "ppl (trained)"] == "35.00"
    assert table.loc[("l4q", 3), "ppl (deployed)"] == "failed"
    assert table.loc[("dlqat", 4), "ppl (deployed)"] == "missing"
    assert table.loc[("dlqat", 3), "ppl (deployed)"] == "incomplete"
    assert len(table) == 6
    assert (report.load_runs(root)["status"] == "incomplete").sum() == 1


def test_expect_as_a_list_of_grids_crosses_keys_only_within_each(store):
    """A baseline that exists at one setting only (qlora at 4 bits) is not expected at the others."""
    root, _ = store
    spec = {**SPEC, "expect": [{"method": ["qlora"], "bits": [4]}, {"method": ["l4q", "dlqat"], "bits": [4, 3]}]}
    table = report.build_table(report.load_runs(root), spec)
    assert list(zip(table["method"], table["bits"])) == [("qlora", 4), ("l4q", 4), ("l4q", 3), ("dlqat", 4),
                                                          ("dlqat", 3)]
    assert table.set_index(["method", "bits"]).loc[("qlora", 4), "ppl (deployed)"] != "missing"


def test_report_regenerates_identical_files(store, tmp_path):
    root, spec = store
    first = report.report(spec, root, tmp_path / "out1")
    second = report.report(spec, root, tmp_path / "out2")
    names = sorted(p.name for p in first)
    assert names == sorted(p.name for p in second)
    assert {"groupwise.md", "groupwise.tex", "groupwise.csv", "groupwise_paper_vs_reproduced.md",
            "groupwise.png"} <= set(names)
    for a in first:
        if a.suffix != ".png":
            assert a.read_text() == (tmp_path / "out2" / a.name).read_text()
    versus = (tmp_path / "out1" / "groupwise_paper_vs_reproduced.md").read_text()
    assert "5.9" in versus and "41.00 ± 12.71 (n=2)" in versus


def test_mean_columns_and_ratios(store):
    root, _ = store
    spec = {"rows": ["method"], "where": {"data": "austen", "bits": 4},
            "columns": {"avg": ["metrics.ppl_merged", "metrics.ppl_trained"], "ppl": "metrics.ppl_merged"},
            "relative": {"to": {"method": "qlora"}, "columns": ["ppl"]}}
    table = report.build_table(report.load_runs(root), spec).set_index("method")
    assert table.loc["l4q", "avg"] == "41.00 ± 12.71 (n=2)"  # per-run mean of the two, then over seeds
    assert table.loc["qlora", "avg"] == "35.00"
    assert table.loc["l4q", "ppl / qlora"] == f"{41.0 / 35.0:.2f}" and table.loc["qlora", "ppl / qlora"] == "1.00"


def test_ratio_cells_say_why_a_side_has_no_value(store):
    """A row without an ok run shows its status; a row whose reference has none shows the reference's."""
    root, _ = store
    spec = {"rows": ["method", "bits"], "where": {"data": "austen"}, "columns": {"ppl": "metrics.ppl_trained"},
            "expect": {"method": ["l4q", "qlora"], "bits": [4, 3]}, "relative": {"to": {"bits": 3}, "columns": ["ppl"]}}
    table = report.build_table(report.load_runs(root), spec).set_index(["method", "bits"])
    assert table.loc[("l4q", 3), "ppl / 3"] == "failed"
    assert table.loc[("l4q", 4), "ppl / 3"] == "ref. failed"
    assert table.loc[("qlora", 4), "ppl / 3"] == "ref. missing"
    assert table.loc[("qlora", 3), "ppl / 3"] == "missing"


def test_bar_plot(store, tmp_path):
    root, _ = store
    spec = {"name": "cost", "rows": ["method"], "columns": {}, "where": {"data": "austen"},
            "plot": {"x": "method", "y": "metrics.ppl_merged", "kind": "bar", "log": False}}
    assert report.plot_table(report.load_runs(root), spec, tmp_path / "cost.png").stat().st_size > 0


def test_archive_reproduces_the_tables(store, tmp_path):
    root, _ = store
    archive = report.archive_runs(root, tmp_path / "records.jsonl", [{"data": "austen"}])
    assert len(archive.read_text().splitlines()) == 4  # the recorded austen runs; quiz filtered out
    assert report.archive_runs(archive, tmp_path / "again.jsonl").read_text() == archive.read_text()
    from_store = report.build_table(report.load_runs(root), SPEC).set_index(["method", "bits"])
    from_archive = report.build_table(report.load_runs(archive), SPEC).set_index(["method", "bits"])
    # a run without a record (killed mid-way) is not archived: its cell reads missing instead of incomplete
    assert from_store.loc[("dlqat", 3), "ppl (deployed)"] == "incomplete"
    assert from_archive.loc[("dlqat", 3), "ppl (deployed)"] == "missing"
    pd.testing.assert_frame_equal(from_store.drop(("dlqat", 3)), from_archive.drop(("dlqat", 3)))


def test_diverged_and_interrupted_cells_say_so(store):
    root, _ = store
    _record(root, "g", method="dlqat", bits=4, status="diverged", error="Diverged: non-finite loss (nan) at step 2",
            metrics={"ppl_merged": None})
    _record(root, "h", method="qlora", bits=3, status="interrupted", error="RunInterrupted: interrupted by SIGTERM")
    table = report.build_table(report.load_runs(root), SPEC).set_index(["method", "bits"])
    assert table.loc[("dlqat", 4), "ppl (deployed)"] == "diverged"
    assert table.loc[("qlora", 3), "ppl (deployed)"] == "interrupted"


def test_a_corrupt_record_is_named_and_marked_and_the_report_goes_on(store, capsys):
    root, _ = store
    folder = root / "g"
    folder.mkdir()
    (folder / "config.yaml").write_text("seed: 0\nmethod: {name: qlora, bits: 3, group_size: 64}\ndata: {name: austen}\n")
    (folder / "record.json").write_text('{"status": "ok", "metrics": {"ppl_merged": 4')  # cut short
    table = report.build_table(report.load_runs(root), SPEC).set_index(["method", "bits"])
    assert table.loc[("qlora", 3), "ppl (deployed)"] == "corrupt"
    assert table.loc[("l4q", 4), "ppl (deployed)"] == "41.00 ± 12.71 (n=2)"  # the rest as before
    err = capsys.readouterr().err
    assert f"{folder / 'record.json'}: unreadable record (JSONDecodeError" in err


def test_two_records_of_one_seed_keep_the_newest_and_say_so(store, capsys):
    root, _ = store
    _record(root, "a2", method="l4q", bits=4, seed=0, finished="2099-01-01T00:00:00",
            metrics={"ppl_merged": 50.0, "ppl_trained": 50.0})
    table = report.build_table(report.load_runs(root), SPEC).set_index(["method", "bits"])
    assert table.loc[("l4q", 4), "ppl (deployed)"] == "46.00 ± 50.82 (n=2)"  # seeds 0 (newest: 50) and 1 (42)
    assert table.loc[("l4q", 4), "seeds"] == 2
    err = capsys.readouterr().err
    assert "2 records of seed 0" in err and "kept the newest" in err and "a2" in err


# --- the command line: qaft-report key=value, like qaft-train / qaft-eval / qaft-export -----------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_key_value_writes_what_report_writes(store, tmp_path, monkeypatch, capsys):
    from qaft.reporting import cli

    root, spec = store
    other = tmp_path / "other.yaml"  # a second spec, for the glob and the comma-separated list
    other.write_text(yaml.safe_dump({**SPEC, "name": "other", "plot": None}))
    expected = tmp_path / "expected"
    for s in (spec, other):
        report.report(s, root, expected)
    report.archive_runs(root, expected / "records.jsonl", [SPEC["where"], SPEC["where"]])

    monkeypatch.chdir(tmp_path)  # a relative glob, as the shell would pass it quoted
    cli.main(["spec=*.yaml", f"runs={root}", "out=glob", "archive=glob/records.jsonl"])
    assert _files(tmp_path / "glob") == _files(expected)
    assert len(capsys.readouterr().out.splitlines()) == len(_files(expected))
    cli.main([f"spec={other},{spec}", f"runs={root}", "out=listed", "archive=listed/records.jsonl", "wandb=null"])
    assert _files(tmp_path / "listed") == _files(expected)
    cli.main(["--spec", str(spec), str(other), "--runs", str(root), "--out", "flags", "--archive",
              "flags/records.jsonl"])  # the old flags still work
    assert _files(tmp_path / "flags") == _files(expected)


@pytest.mark.parametrize("argv, message", [
    (["runs="], "nothing to report: no spec=, claims=, runs= or wandb="),
    (["runs=nowhere"], "runs=nowhere: no such run store"),
    (["spec=nowhere/*.yaml"], "spec 'nowhere/*.yaml' matches no file"),
    (["spec=SPEC", "colour=red"], "unknown key 'colour' (keys: spec, claims, runs, out, archive, wandb)"),
    (["SPEC"], "expected key=value, got"),
    (["spec=SPEC", "runs=", "archive=records.jsonl"], "needs runs="),  # no local store to archive
])
def test_cli_bad_arguments_exit_2_in_one_line(store, tmp_path, capsys, argv, message):
    from qaft.reporting import cli

    _, spec = store
    with pytest.raises(SystemExit) as done:
        cli.main([a.replace("SPEC", str(spec)) for a in argv])
    assert done.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qaft-report:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "results").exists()


def test_cli_without_a_spec_prints_one_table_of_every_run(store, tmp_path, monkeypatch, capsys):
    """Every run of the store, its status, its headline metrics (the run's and qaft-eval's, windows named), and a
    column only for the config keys that differ; saved only where out= says."""
    from qaft.reporting import cli

    root, _ = store
    lm_eval = {"results": {"quiz_mc:0": {"scores": {"acc": 0.5, "acc_norm": 0.25}}}}
    qaft_eval = {"merged": {"perplexity": {"value": 30.0, "seq_len": 2048, "tokens": 4096}}}
    _record(root, "g", method="qlora", bits=3, metrics={"ppl_merged": 50.0, "lm_eval": lm_eval}, eval=qaft_eval)
    monkeypatch.chdir(tmp_path)
    cli.main([f"runs={root}"])
    printed = capsys.readouterr().out
    assert not (tmp_path / "results").exists()  # no out=: printed only
    header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in printed.split("\n\n")[0].splitlines()]
    table = pd.DataFrame(rows, columns=header).set_index("run")
    assert sorted(table.index) == ["a", "b", "c", "d", "e", "f", "g"]
    assert table.loc["d", "status"] == "failed" and table.loc["f", "status"] == "incomplete"
    assert table.loc["c", "ppl deployed"] == "44.0000" and table.loc["g", "quiz_mc:0 acc"] == "0.5000"
    assert table.loc["g", "qaft-eval merged ppl (2048-token windows)"] == "30.0000"
    assert {"method", "bits", "seed", "data"} <= set(header) and not {"model", "group_size"} & set(header)
    assert "the same in every run that records it: " in printed and "model=smollm2-135m" in printed
    assert table.loc["e", "data"] == "quiz" and table.loc["b", "seed"] == "1"

    cli.main([f"runs={root}", "out=adhoc"])
    assert (tmp_path / "adhoc" / "runs.md").read_text() in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "adhoc" / "runs.csv")) == 7


def test_cli_spec_matching_no_run_says_so_and_writes_nothing(store, tmp_path, capsys):
    from qaft.reporting import cli

    root, spec = store
    stray = tmp_path / "stray.yaml"
    stray.write_text(yaml.safe_dump({**SPEC, "name": "stray", "where": {"data": "wikitext"}}))
    with pytest.raises(SystemExit) as done:
        cli.main([f"spec={stray}", f"runs={root}", f"out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 1 and len(err) == 1 and str(stray) in err[0] and "matches no run" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # with a spec that matches: its tables are written, the stray's are not
        cli.main([f"spec={spec},{stray}", f"runs={root}", f"out={tmp_path / 'out'}"])
    written = {p.stem for p in (tmp_path / "out").iterdir()}
    assert "groupwise" in written and "stray" not in written


def test_cli_help(capsys):
    from qaft.reporting import cli

    cli.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: qaft-report [spec=") and "archive" in out and "wandb" in out


def test_cli_finds_the_shipped_specs_from_anywhere(tmp_path, monkeypatch):
    """``spec='experiments/reports/*.yaml'`` outside a checkout: the specs installed with qaft."""
    from qaft.paths import experiments_dir
    from qaft.reporting import cli

    monkeypatch.chdir(tmp_path)
    found = cli.expand_specs(["experiments/reports/*.yaml"])
    assert found == sorted((experiments_dir() / "reports").glob("*.yaml")) and found

"""The tables' experiment configs: every sweep point composes and validates at both scales, every sweep runs
end to end for two steps on the tiny model (one seed, its first bit width), and a failed run in a sweep leaves the
rest and the report intact."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from qaft.reporting import tables as report
from qaft.run_folder import Status
from qaft.training.cli import CONF_DIR
from qaft.training.config import experiments_dir, register_conf, validate

EXPERIMENTS = sorted(p.stem for p in (Path(experiments_dir()) / "experiment").glob("*.yaml"))
# Rows of a table that do not cross its main sweep (DL-QAT's W-A-KV 4-8-8 rows) have their own experiment file
# and record the table's experiment name, so that one report holds them all.
TABLE = {"channelwise_wakv": "channelwise", "cost_wakv": "cost"}
SCALES = ("tiny", "paper")
# The tiny random LLaMA's widths are 64 and 128: the tiny scale's group of 192 does not divide them.
TINY_MODEL = ["model=tiny-llama", "scale.group_sizes='32,64,-1'"]
# Two steps (the scales' phase lengths shortened to fit them): trainer.fast_dev_run is refused, since its one step
# could not be recorded ok. One seed: the tables' three (seed=0,1,2) only repeat the same points.
SHORT = ["seed=0", "trainer.max_steps=2", "data.datamodule.seq_len=32", "data.datamodule.max_train_tokens=1024",
        "eval.seq_len=32", "eval.max_tokens=64", "eval.baselines=false", "eval.tasks=[]"]


def _compose(overrides: list[str], hydra: bool = False):
    register_conf()  # conf/train.yaml's ${qaft.*} (importing qaft registers none)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra)


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The override lists of every job that ``qaft-train -m OVERRIDES`` launches (the basic sweeper's grid)."""
    params = _compose(overrides, hydra=True).hydra.sweeper.params or {}
    given = {o.split("=", 1)[0] for o in overrides}  # a command-line value replaces the file's sweep of that key
    axes = [[f"{key}={value}" for value in OverridesParser.create().parse_overrides([f"{key}={spec}"])[0]
             .sweep_string_iterator()] for key, spec in params.items() if key not in given]
    points = [[]]
    for axis in axes:
        points = [point + [choice] for point in points for choice in axis]
    return points


def test_there_is_one_experiment_per_table():
    assert EXPERIMENTS == ["channelwise", "channelwise_wakv", "cost", "cost_wakv", "dlqat_ablation", "groupsize",
                           "groupwise", "l4q_ablation", "steps", "zero_point"]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_point_composes_and_validates(name, scale):
    base = [f"experiment={name}", f"scale={scale}", "seed=0"]
    points = sweep_points(base)
    assert len(points) >= 2
    for point in points:
        cfg = _compose(base + point)
        spec = validate(cfg, resources=scale == "tiny")  # paper scale: LLaMA-2 and Alpaca from the hub
        assert cfg.experiment_name == TABLE.get(name, name) and cfg.scale.name == scale
        if scale == "tiny":
            assert cfg.model.name_or_path == "smollm2-135m" and cfg.data.name == "austen"
        else:
            assert cfg.model.name_or_path.startswith("meta-llama/") and cfg.data.name == "alpaca"
        assert spec.method.name == cfg.method.name
        for override in point:  # the swept value reached the composed config
            key, value = override.split("=", 1)
            if key == "method":  # a preset of a method (loftq_int, ptq_gptq, qalora_gptq) or the method itself
                assert value == cfg.method.name or value.startswith(f"{cfg.method.name}_"), (value, cfg.method.name)
            elif key == "quant":  # a preset of method settings (bits, group size, act / KV bits): each one arrived
                preset = OmegaConf.load(Path(CONF_DIR) / "quant" / f"{value}.yaml")
                assert all(cfg.method[k] == v for k, v in preset.method.items()), (value, cfg.method)
            else:
                assert str(OmegaConf.select(cfg, key)).lower() == value.lower()


def test_every_table_whose_rows_claims_compare_sweeps_three_seeds():
    for name in EXPERIMENTS:
        seeds = {p[-1] for p in sweep_points([f"experiment={name}"]) if p[-1].startswith("seed=")}
        one_seed = name.startswith("cost") or name == "zero_point"  # no claim compares their rows
        assert seeds == (set() if one_seed else {"seed=0", "seed=1", "seed=2"}), name


def test_tiny_scale_group_sizes_fit_smollm2():
    points = sweep_points(["experiment=groupsize"])
    assert {p[1] for p in points} == {"method.group_size=32", "method.group_size=64", "method.group_size=192",
                                     "method.group_size=-1"}


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("record.json"))]


def _multirun(overrides: list[str], monkeypatch: pytest.MonkeyPatch, fails: bool = False) -> None:
    """``qaft-train -m OVERRIDES`` in this process; Hydra runs every job, then exits non-zero if one failed."""
    from qaft.training.cli import main

    monkeypatch.setattr(sys, "argv", ["qaft-train", "-m", *overrides])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    assert bool(code) == fails, code


def _first_bits(name: str) -> list[str]:
    """The sweep's first bit width only, where bits is one of its axes: the other widths change no config but that
    number, and every point composes and validates above."""
    params = _compose([f"experiment={name}"], hydra=True).hydra.sweeper.params or {}
    return [f"method.bits={str(params['method.bits']).split(',')[0]}"] if "method.bits" in params else []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_on_the_tiny_model(name, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    overrides = [f"experiment={name}", *TINY_MODEL, *SHORT, "scale.dlqat_quant_steps=1", "scale.l4q_warmup_steps=1",
                 *_first_bits(name), f"runs_root={root}"]
    _multirun(overrides, monkeypatch)
    records = _records(root)
    assert len(records) == len(sweep_points(overrides))
    assert all(r["status"] == "ok" and r["experiment"] == TABLE.get(name, name) and r["scale"] == "tiny"
               for r in records)
    assert len({r["run_dir"] for r in records}) == len(records)  # no two points share a run folder


def test_a_failed_run_leaves_the_others_and_the_report_intact(tmp_path, monkeypatch, capsys):
    from qaft.models import load_causal_lm

    local, broken = tmp_path / "tiny", tmp_path / "broken"
    for folder in (local, broken):  # local copies of the built-in tiny model: model and tokenizer
        for part in load_causal_lm("tiny-llama"):
            part.save_pretrained(folder)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # passes validation, fails to load
    root = tmp_path / "runs"
    # the failing job runs first: the sweep goes on after it
    _multirun(["model=hf", f"model.name_or_path={broken},{local}", "model.dtype=float32",
               "experiment_name=robust", *SHORT, f"runs_root={root}"], monkeypatch, fails=True)
    by_model = {Path(r["model"]).name: r for r in _records(root)}
    assert by_model["tiny"]["status"] == "ok"
    assert by_model["broken"]["status"] == "failed" and by_model["broken"]["error"]
    out = capsys.readouterr()  # the sweep's summary: each job's status and folder, then what failed
    jobs = [line.split() for line in out.out.splitlines() if line.startswith(("     0", "     1"))]
    assert [j[:3] for j in jobs] == [["0", "failed", "-"], ["1", "ok", jobs[1][2]]], out.out
    assert float(jobs[1][2]) == pytest.approx(by_model["tiny"]["metrics"]["ppl_merged"], abs=5e-4)
    assert jobs[0][-1] == by_model["broken"]["run_dir"] and jobs[1][-1] == by_model["tiny"]["run_dir"]
    assert "sweep: 1 of 2 jobs did not end ok (exit status non-zero)" in out.out
    spec = {"name": "robust", "where": {"experiment": "robust"}, "rows": ["model"],
            "columns": {"ppl": "metrics.deployed"}}
    table = report.build_table(report.load_runs(root), spec).set_index("model")
    assert table.loc[str(local), "ppl"] not in (Status.FAILED.value, report.MISSING)
    assert table.loc[str(broken), "ppl"] == Status.FAILED.value


def test_a_sweep_with_an_unknown_option_names_it_and_leaves_nothing(tmp_path):
    from helpers import run_qaft_train

    root = tmp_path / "runs"
    proc = run_qaft_train(["-m", "model=tiny-llama", f"runs_root={root}", "method=lora,no_such,l4q",
                           "trainer.max_steps=2"])
    assert proc.returncode != 0 and "Could not find 'method/no_such'" in proc.stderr
    assert not root.exists() or not list(root.rglob("*")), list(root.rglob("*"))

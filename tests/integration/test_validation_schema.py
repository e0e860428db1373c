"""Every field of the run config is checked before anything is written: a bad value of any of them is one line on
stderr, exit 2, and nothing under ``runs_root``.

The fields are found by walking the composed default config (``qaft-train model=tiny-llama``), so a field added to
``conf/`` without an entry in :data:`BAD` fails :func:`test_every_field_of_the_default_config_has_bad_values`, and
one whose bad value gets through fails :func:`test_a_bad_value_of_each_field_is_refused_naming_it`. Those values are
tried in-process, on the composed config with the override applied as Hydra applies it (Hydra's own refusals, of a
typed method field, come from a real composition); the command line's way of refusing (the Hydra callback that
validates before the run folder exists, Hydra's errors turned into the same line, the run folder's place, the
cleanup of what a refused job made) is checked through ``qaft-train``'s ``main()`` and two real processes.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qaft.training.app import hydra_error_line
from qaft.training.cli import CONF_DIR, main
from qaft.training.config import ConfigError, register_conf, validate

from helpers import run_qaft_train

# Bad overrides of every field of the default config, by field. The message must name the field (its path, or its
# last part where the method's own check speaks: "rank must be a positive integer").
BAD: dict[str, list[str]] = {
    "method.name": ["method.name=nope"], "method.bits": ["method.bits=5"],
    "method.group_size": ["method.group_size=48"], "method.init": ["method.init=nope"],
    "method.symmetric": ["method.symmetric=maybe"], "method.zero_point": ["method.zero_point=nope"],
    "method.lsq_grad_scale": ["method.lsq_grad_scale=maybe"], "method.rank": ["method.rank=0", "method.rank=abc"],
    "method.alpha": ["method.alpha=-16"], "method.dropout": ["method.dropout=1.5"],
    "method.target_modules": ["method.target_modules=[]", "method.target_modules=[nope_proj]"],
    "method.act_bits": ["method.act_bits=1"], "method.kv_bits": ["method.kv_bits=1"],
    "method.warmup_steps": ["method.warmup_steps=-1"], "method.memory_efficient": ["method.memory_efficient=maybe"],
    "method.compile_backward": ["method.compile_backward=maybe"],
    "model.name_or_path": ["model.name_or_path=/no/such/model"], "model.dtype": ["model.dtype=float8"],
    "data.name": ["data.name='/../../../x'", "data.name=''"], "data.kind": ["data.kind=nope"],
    "data.source": ["data.source=/no/such/corpus.txt"], "data.config": ["data.config=5"],
    "data.datamodule._target_": ["data.datamodule._target_=qaft.data.NoSuchModule"],
    "data.datamodule.source": ["data.datamodule.source=austen_typo"],
    "data.datamodule.config": ["data.datamodule.config=x"],
    "data.datamodule.seq_len": ["data.datamodule.seq_len=abc", "data.datamodule.seq_len=1",
                                "data.datamodule.seq_len=4096"],
    "data.datamodule.batch_size": ["data.datamodule.batch_size=0"],
    "data.datamodule.max_train_tokens": ["data.datamodule.max_train_tokens=0", "data.datamodule.max_train_tokens=16"],
    "data.datamodule.max_eval_tokens": ["data.datamodule.max_eval_tokens=-1"],
    "data.datamodule.seed": ["data.datamodule.seed=-1"],
    "trainer._target_": ["trainer._target_=pytorch_lightning.NoTrainer"],
    "trainer.accelerator": ["trainer.accelerator=npu9"], "trainer.devices": ["trainer.devices=0"],
    "trainer.num_nodes": ["trainer.num_nodes=0"], "trainer.strategy": ["trainer.strategy=nope"],
    "trainer.precision": ["trainer.precision=fp8"],
    "trainer.max_steps": ["trainer.max_steps=abc", "trainer.max_steps=nan", "trainer.max_steps=0"],
    "trainer.max_epochs": ["trainer.max_epochs=0"],
    "trainer.accumulate_grad_batches": ["trainer.accumulate_grad_batches=0"],
    "trainer.gradient_clip_val": ["trainer.gradient_clip_val=nan", "trainer.gradient_clip_val=-1"],
    "trainer.log_every_n_steps": ["trainer.log_every_n_steps=0"],
    "trainer.limit_val_batches": ["trainer.limit_val_batches=-1"],
    "trainer.num_sanity_val_steps": ["trainer.num_sanity_val_steps=-2"],
    "trainer.enable_progress_bar": ["trainer.enable_progress_bar=maybe"],
    "trainer.enable_model_summary": ["trainer.enable_model_summary=2"],
    "trainer.use_distributed_sampler": ["trainer.use_distributed_sampler=yes"],
    "trainer.fast_dev_run": ["trainer.fast_dev_run=-1"], "logger": ["+logger.project=qaft"],
    "eval.gptq_options.calib_batches": ["eval.gptq_options.calib_batches=0"],
    "eval.gptq_options.act_order": ["eval.gptq_options.act_order=maybe"],
    "eval.gptq_options.percdamp": ["eval.gptq_options.percdamp=-1"], "eval.split": ["eval.split=foo"],
    "eval.seq_len": ["eval.seq_len=1", "eval.seq_len=4096"],
    "eval.max_tokens": ["eval.max_tokens=0", "eval.max_tokens=-5"], "eval.max_batches": ["eval.max_batches=0"],
    "eval.batch_size": ["eval.batch_size=0"], "eval.autocast": ["eval.autocast=fp16"],
    "eval.baselines": ["eval.baselines=maybe"], "eval.gptq": ["eval.gptq=1"],
    "eval.corpus": ["eval.corpus=5", "eval.corpus={name: x}"],
    "eval.tasks": ["eval.tasks=quiz_mc", "eval.tasks=[mmlu:x]"],
    "eval.lm_eval.batch_size": ["eval.lm_eval.batch_size=auto"],
    "eval.lm_eval.max_length": ["eval.lm_eval.max_length=1"], "eval.lm_eval.limit": ["eval.lm_eval.limit=0"],
    "seed": ["seed=abc", "seed=-1", "seed=1.5"], "experiment_name": ["experiment_name=''"],
    "runs_root": ["runs_root=''", "runs_root={file}/runs"], "resume": ["resume=/no/such/last.ckpt"],
    "save_model": ["save_model=maybe"],
    "callbacks": ["+callbacks.probe={every: 1}", "+callbacks.probe={_target_: no.Such}"],
    "optim.lr.lora": ["optim.lr.lora=-1"], "optim.lr.quant": ["optim.lr.quant=nan"],
    "optim.lr.weight": ["optim.lr.weight=inf"], "optim.weight_decay.lora": ["optim.weight_decay.lora=-1"],
    "optim.weight_decay.quant": ["optim.weight_decay.quant=nan"],
    "optim.weight_decay.weight": ["optim.weight_decay.weight=abc"],
    "optim.betas": ["optim.betas=[2,2]", "optim.betas=[0.9]"], "optim.eps": ["optim.eps=nan", "optim.eps=0"],
    "optim.schedule": ["optim.schedule=linear"],
    "optim.warmup_steps": ["optim.warmup_steps=-1", "optim.warmup_steps=abc"],
    "optim.gradient_checkpointing": ["optim.gradient_checkpointing=maybe"],
    "divergence.loss_vs_uniform": ["divergence.loss_vs_uniform=0.5", "divergence.loss_vs_uniform=nan"],
    "checkpoint.every_n_steps": ["checkpoint.every_n_steps=-1"],
    "progress.every_n_steps": ["progress.every_n_steps=-1"], "progress.every_s": ["progress.every_s=-1"],
}
CASES = [(field, override) for field, overrides in BAD.items() for override in overrides]


def _compose(overrides: list[str]) -> DictConfig:
    register_conf()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def leaves(node: DictConfig, prefix: str = "") -> list[str]:
    """Every field's path (an empty mapping, a list, an interpolation: one field each)."""
    paths = []
    for key in node:
        path = f"{prefix}{key}"
        child = None if OmegaConf.is_interpolation(node, key) else node[key]
        paths += leaves(child, f"{path}.") if OmegaConf.is_dict(child) and len(child) else [path]
    return paths


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """A file (for a runs_root below a file) and the runs_root the default config writes to."""
    top = tmp_path_factory.mktemp("schema")
    (top / "file").write_text("not a folder")
    return {"file": top / "file", "root": top / "runs"}


@pytest.fixture(scope="module")
def default(places) -> DictConfig:
    return _compose(["model=tiny-llama", f"runs_root={places['root']}"])


def refusal(cfg: DictConfig, override: str) -> str:
    """The line ``override`` is refused with: :func:`validate` on ``cfg`` with it applied as Hydra applies it, or,
    where OmegaConf refuses the value itself (a typed field), Hydra's composition error as ``qaft-train`` words it."""
    parsed = OverridesParser.create().parse_override(override)
    cfg = copy.deepcopy(cfg)
    try:
        OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), force_add=parsed.is_add())
    except OmegaConfBaseException:
        with pytest.raises(HydraException) as refused:
            _compose(["model=tiny-llama", override])
        return hydra_error_line(refused.value)
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    return str(refused.value)


def test_every_field_of_the_default_config_has_bad_values(default):
    assert sorted(leaves(default)) == sorted(BAD), "a field without bad values here (or one that is gone)"


@pytest.mark.parametrize("field,override", CASES, ids=[o for _, o in CASES])
def test_a_bad_value_of_each_field_is_refused_naming_it(field, override, default, places):
    line = refusal(default, override.replace("{file}", str(places["file"])))
    assert "\n" not in line and (field in line or field.rsplit(".", 1)[-1] in line), line
    assert not places["root"].exists()


def test_the_default_config_and_its_extremes_pass(default):
    """The rules refuse what is wrong, not what is merely unusual."""
    validate(default)
    for override in ("trainer.max_epochs=-1", "trainer.devices=auto", "trainer.limit_val_batches=0.5",
                     "eval.max_tokens=null", "divergence.loss_vs_uniform=null",
                     "checkpoint.every_n_steps=0", "eval.tasks=[quiz_mc]", "eval.lm_eval.limit=0.5", "seed=4294967295"):
        cfg = copy.deepcopy(default)
        parsed = OverridesParser.create().parse_override(override)
        OmegaConf.update(cfg, parsed.key_or_group, parsed.value())
        validate(cfg, resources=False)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(i: int, **fields) -> dict:
    return {"instruction": f"Name a colour ({i}).", "input": "", "output": "Blue."} | fields


DATA_FILES = {
    "first record's input a number": ([_record(0, input=5), *map(_record, range(1, 20))],
                                      r"record 1: field 'input' must be a string or null, got a number"),
    "a later record's input an object": ([*map(_record, range(20)), _record(20, input={"a": 1})],
                                         r"record 21: field 'input' must be a string or null, got an object"),
    "one record": ([_record(0)], r"holds 1 record; a run needs at least 2"),
    "a field of two types": ([_record(0, id=1), _record(1, id="b")],
                             r"record 2: field 'id' is a string where record 1's is a number"),
    "a record that is no object": ([_record(0), ["a", "list"]], r"record 2 is a list, not an object"),
}


@pytest.mark.parametrize("name", list(DATA_FILES))
def test_instruction_files_are_checked_record_by_record(name, tmp_path):
    records, words = DATA_FILES[name]
    path = _jsonl(tmp_path / "data.jsonl", records)
    cfg = _compose(["model=tiny-llama", "data=json", f"data.source={path}", f"runs_root={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=rf"^data: {path}: {words}"):
        validate(cfg)


def test_a_corpus_too_small_for_a_training_block_or_an_eval_window_is_refused(tmp_path):
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. "
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(text * 3 + "\n")
    base = ["model=tiny-llama", f"runs_root={tmp_path / 'runs'}", f"data.source={one_line}"]
    with pytest.raises(ConfigError, match=r"its training part \(one file is cut 90/5/5 by lines\) holds fewer than"):
        validate(_compose(base))
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, body in (("train", text * 40), ("valid", text), ("test", "\n")):
        (folder / f"{split}.txt").write_text(body)
    with pytest.raises(ConfigError, match=r"its test part holds fewer than 2 tokens"):
        validate(_compose([*base[:2], f"data.source={folder}", "data.datamodule.seq_len=32"]))
    validate(_compose([*base[:2], f"data.source={folder}", "data.datamodule.seq_len=32", "eval.split=validation"]))


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """``qaft-train ARGS`` through ``main()`` in this process: its exit status and its stderr lines."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["qaft-train", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


COMMAND_LINES = {
    "a step count that is no number": (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be a whole number"),
    "an unknown key": (["foo=1"], "Could not override 'foo': Key 'foo' is not in struct (to append to your config"),
    "an unknown option": (["method=nonexistent"], "Could not find 'method/nonexistent'; available: dlqat, efficientqat,"),
    "a value of the wrong type": (["method.rank=abc"], "Error merging override method.rank=abc: Value 'abc'"),
    "an override that does not parse": (["method.bits=[4"], "method.bits=[4: "),
    "a data name with a path in it": (["data.name='/../../../x'"], "data.name='/../../../x' must be a plain name"),
    "a checkpoint that is not one": (["resume={root}/../not.ckpt"], "resume: "),
}


@pytest.mark.parametrize("name", list(COMMAND_LINES))
def test_the_command_line_refuses_in_one_line_and_keeps_a_runs_root_it_did_not_make(name, tmp_path, monkeypatch,
                                                                                    capsys):
    root = tmp_path / "made_by_the_user"
    root.mkdir()
    (tmp_path / "not.ckpt").write_text("not a checkpoint")  # passes validation, refused when the run opens it
    args, words = COMMAND_LINES[name]
    code, lines = run_main(["model=tiny-llama", f"runs_root={root}", *(a.format(root=root) for a in args)],
                           monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qaft-train: ") and words in lines[0], lines
    assert root.is_dir() and not any(root.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made_by_the_user", "not.ckpt"]


def test_a_sweep_whose_jobs_are_all_refused_leaves_nothing(tmp_path, monkeypatch, capsys):
    root = tmp_path / "new" / "runs"
    code, lines = run_main(["-m", "model=tiny-llama", f"runs_root={root}", "seed=-1,-2"], monkeypatch, capsys)
    # Hydra names the sweep job that failed first ("Error executing job with overrides: [...]"), then qaft-train
    assert code == 2 and lines[-1] == "qaft-train: invalid config: seed=-1 must be a whole number in [0, 4294967295]"
    assert len(lines) == 2 and "'seed=-1'" in lines[0], lines
    assert not (tmp_path / "new").exists()
    user_made = tmp_path / "runs"
    user_made.mkdir()
    code, _ = run_main(["-m", "model=tiny-llama", f"runs_root={user_made}", "seed=-1,-2"], monkeypatch, capsys)
    assert code == 2 and user_made.is_dir() and not any(user_made.iterdir())


# What importing this machine's torchao / torch prints before qaft-train runs at all (not qaft-train's output).
IMPORT_NOISE = ("torchao/_C", "torch/utils/_pytree.py")


@pytest.mark.parametrize("args,words", [
    (["foo=1"], "qaft-train: invalid config: Could not override 'foo'"),
    (["data.datamodule.seq_len=abc"], "qaft-train: invalid config: data.datamodule.seq_len='abc' must be"),
])
def test_qaft_train_processes_refuse_in_one_line_with_exit_2(args, words, tmp_path):
    root = tmp_path / "runs"
    proc = run_qaft_train(["model=tiny-llama", f"runs_root={root}", *args], timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not any(n in line for n in IMPORT_NOISE)]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(words), proc.stderr[-3000:]
    assert not root.exists() and not proc.stdout.strip()


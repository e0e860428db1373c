"""Every YAML in conf/ composes through Hydra's compose API, and the composed configs validate."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from qaft.methods import available
from qaft.training.cli import CONF_DIR
from qaft.training.config import ConfigError, register_conf, run_name, validate
from qaft.training.identity import config_digest

CONF = Path(CONF_DIR)
OPTIONS = sorted((str(p.parent.relative_to(CONF)), p.stem) for p in CONF.rglob("*.yaml") if p.parent != CONF)
# Options that need a value only the user can give.
REQUIRED = {("model", "hf"): ["model.name_or_path=org/some-model"], ("data", "json"): ["data.source={json}"],
            # the papers' g128 does not divide SmolLM2's width 576; it is for models like LLaMA-2
            ("quant", "w4g128"): ["model=hf", "model.name_or_path=meta-llama/Llama-2-7b-hf"]}


def _compose(overrides: list[str], hydra: bool = False):
    register_conf()  # conf/train.yaml's ${qaft.*} (importing qaft registers none)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra)


def test_conf_has_every_group():
    groups = {group for group, _ in OPTIONS}
    assert {"method", "quant", "model", "data", "trainer", "logger", "experiment", "hydra/launcher"} <= groups


def test_one_method_yaml_per_registered_method():
    """Each registered method has its YAML; other method options are presets of one (e.g. loftq_int)."""
    options = [option for group, option in OPTIONS if group == "method"]
    assert set(available()) <= set(options)
    for preset in set(options) - set(available()):
        assert _compose([f"method={preset}"]).method.name in available()


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_yaml_composes(group, option, tmp_path):
    json_file = tmp_path / "data.jsonl"
    json_file.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n')
    extra = [o.format(json=json_file) for o in REQUIRED.get((group, option), [])]
    # ${hydra:...} interpolations only resolve inside a Hydra run; compose those with the hydra node instead.
    with_hydra = group.startswith("hydra") or "${hydra:" in (CONF / group / f"{option}.yaml").read_text()
    cfg = _compose([f"{group}={option}", *extra], hydra=with_hydra)
    if group.startswith("hydra"):
        return
    if with_hydra:
        HydraConfig.instance().set_config(cfg)  # as a Hydra app does before calling its task function
        with open_dict(cfg):
            del cfg["hydra"]  # a Hydra app's task function never sees this node either
    else:
        OmegaConf.resolve(cfg)  # every interpolation resolves
    spec = validate(cfg, resources=False)  # the config alone: hub models and datasets are not reachable here
    assert spec.method.name == cfg.method.name


def test_default_is_the_main_job():
    cfg = _compose([])
    spec = validate(cfg)
    assert (spec.method.name, spec.bits, spec.group_size) == ("l4q", 4, 64)
    assert cfg.model.name_or_path == "smollm2-135m" and cfg.data.name == "austen"
    assert run_name(cfg.method, cfg.model.name_or_path, cfg.data.name, cfg.seed) == "l4q-w4g64-r16-s0-smollm2-135m-austen"


def test_quant_presets_set_bits_and_group_size():
    cfg = _compose(["method=qalora", "quant=w3g64"])
    assert (cfg.method.bits, cfg.method.group_size, cfg.method.rank, cfg.method.alpha) == (3, 64, 64, 16.0)
    assert validate(_compose(["quant=w4pc"])).group_size == -1


def test_slurm_launcher_composes():
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node
    cfg = _compose(["experiment=slurm_ddp"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.trainer.strategy == "ddp_find_unused_parameters_true"
    assert OmegaConf.to_container(cfg.trainer)["devices"] == "${hydra:launcher.gpus_per_node}"


def test_fsdp_strategy_composes_and_instantiates():
    cfg = _compose(["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"


def test_wandb_logger_offline_by_default():
    cfg = _compose(["logger=wandb"])
    assert cfg.logger._target_ == "pytorch_lightning.loggers.WandbLogger" and cfg.logger.mode == "offline"


@pytest.mark.parametrize("override,words", [
    (["method.name=nope"], "unknown method"),
    (["method.bits=5"], "bits"),
    (["model=tiny-llama", "method.group_size=48"], "group_size=48"),
    (["model=hf", "model.name_or_path=/no/such/model"], "does not exist"),
    (["data=json", "data.source=/no/such/file.jsonl"], "does not exist"),
    (["method=lora", "+method.init=mse"], "no field"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["eval.autocast=fp16"], r"^eval.autocast='fp16' must be null \(float32\) or one of \['bf16'\]$"),
    (["method=ptq", "method.algorithm=smoothquant", "method.smooth_alpha=0"], r"smooth_alpha must be .* \(0, 1\]"),
    (["data=generated", "data.datamodule.count=0"], r"^data.datamodule: count must be an integer >= 1, got 0$"),
    (["data=generated", "data.datamodule.greedy_tokens=[5,3]"], r"^data.datamodule: greedy_tokens must be \[low, high\]"),
    (["model=tiny-llama", "data=generated", "data.datamodule.seq_len=4096"],
     r"^data.datamodule.seq_len=4096 exceeds the model's max_position_embeddings=2048$"),
    (["method=llm_qat", "+method.init=mse"], "no field"),
    # a ??? that an interpolation points to, and an interpolation that cannot resolve: named, not a traceback
    (["data=json"], r"^missing required value\(s\) \['data.source'\]"),
    (["model.name_or_path=${oc.env:QAFT_NO_SUCH_VARIABLE}"], r"^model.name_or_path cannot be resolved: .*QAFT_NO_SUCH"),
    (["~seed"], r"^data.datamodule.seed cannot be resolved: Interpolation key 'seed' not found"),
    # a preset's keys that its data module does not take (instantiating it would fail after the folder exists)
    (["experiment=qalora_paper", "scale=tiny"],
     r"^data.datamodule has \['max_eval_tokens', 'max_train_tokens', 'seq_len'\], which qaft.data.InstructDataModule"),
    # targets resolve on the model built from its config (on the meta device), before any weight loads
    (["model=tiny-gpt2", "method.target_modules=[wte]"], (r"^model 'tiny-gpt2': method.target_modules=\['wte'\]: "
     r"'wte' is a Embedding, not a linear layer qaft can quantize; the model's linear layers: \['c_attn', 'c_fc', "
     r"'c_proj', 'lm_head'\]")),
    (["model=tiny-gpt2", "method.group_size=48"], (r"^method.group_size=48 does not fit model 'tiny-gpt2': "
     r"transformer.h.0.attn.c_attn: group_size=48 does not divide in_features=64")),
])
def test_validation_rejects(override, words):
    with pytest.raises(ConfigError, match=words):
        validate(_compose(override))


def test_smoothquant_reaches_the_ptq_method_from_the_command_line_and_its_preset():
    spec = validate(_compose(["method=ptq", "method.algorithm=smoothquant", "method.smooth_alpha=0.8",
                              "quant=w8a8kv8"]), resources=False)
    assert (spec.method.algorithm, spec.method.smooth_alpha, spec.method.act_bits) == ("smoothquant", 0.8, 8)
    assert spec.method.calibration_options() is not None  # qaft-train gives it the first training batches, as GPTQ
    cfg = _compose(["method=ptq_smoothquant", "quant=w4a8kv8"])
    assert validate(cfg, resources=False).method.algorithm == "smoothquant"
    assert run_name(cfg.method, "tiny-llama", "austen", 0, "ptq_smoothquant").startswith("ptq_smoothquant-w4pc-a8kv8")


def test_w_a_kv_quant_presets_reach_the_method_and_the_run_name():
    cfg = _compose(["quant=w4a8kv8", "method=dlqat"])
    spec = validate(cfg, resources=False)
    assert (spec.method.bits, spec.method.group_size, spec.method.act_bits, spec.method.kv_bits) == (4, -1, 8, 8)
    assert run_name(cfg.method, "tiny-llama", "austen", 0) == "dlqat-w4pc-a8kv8-r16-s0-tiny-llama-austen"
    lora = validate(_compose(["quant=w4a16kv8", "method=lora"]), resources=False).method
    assert (lora.act_bits, lora.kv_bits) == (16, 8)
    with pytest.raises(ConfigError, match=r"^act_bits must be one of \[2, 3, 4, 5, 6, 7, 8\] or 16 \(off\), got 1$"):
        validate(_compose(["method.act_bits=1"]), resources=False)


def test_llm_qat_on_generated_data_composes_with_its_recipe_and_the_generation_is_in_the_identity():
    cfg = _compose(["experiment=llm_qat_paper", "model=tiny-llama"])
    spec = validate(cfg, resources=False)
    assert (spec.method.name, spec.bits, spec.group_size, spec.method.act_bits, spec.method.kv_bits) == (
        "llm_qat", 4, -1, 8, 8)
    assert (cfg.data.name, cfg.optim.lr.weight, cfg.optim.warmup_steps) == ("generated", 2e-5, 0)
    assert run_name(cfg.method, "tiny-llama", cfg.data.name, 0) == "llm_qat-w4pc-a8kv8-s0-tiny-llama-generated"
    base = ["method=llm_qat", "data=generated"]
    digest = config_digest(_compose(base))
    for override in ["count=64", "generation_seed=1", "greedy_tokens=[2,4]", "top_k=40", "seq_len=128",
                     "generation_batch_size=8"]:
        assert config_digest(_compose([*base, f"data.datamodule.{override}"])) != digest, override
    assert config_digest(_compose([*base, "data.datamodule.cache_dir=/somewhere/else"])) == digest


def test_override_tag_names_what_the_run_name_does_not_show():
    """The readable part of a run folder's name: ``key@value`` per override the name does not show yet, in an order
    that does not depend on the command line's, Hydra-safe (no ``=`` or ``,``), portable and bounded."""
    from qaft.training.naming import TAG_CHARS, override_tag

    given = ["trainer.max_steps=2", "method.init=minmax", "model=tiny-llama", "method.bits=3", "runs_root=/r",
             "progress.every_s=5", "+callbacks.p={_target_: x.Y}", "data.datamodule.seq_len=32", "eval.seq_len=32",
             "data.source=/data/my file.jsonl", "~eval.corpus", "trainer=debug"]
    tag = override_tag(given)
    assert tag == ("init@minmax-trainer@debug-datamodule.seq_len@32-source@my_file.jsonl-corpus@deleted-"
                   "eval.seq_len@32-max_steps@2")
    assert override_tag(reversed(given)) == tag and override_tag(["seed=1", "logger=wandb"]) == ""
    # a sweep job's overrides are rebuilt from parsed values: the same value, the same name
    assert override_tag(["eval.baselines=False"]) == override_tag(["eval.baselines=false"]) == "baselines@false"
    assert override_tag(["eval.tasks=[quiz_mc,austen_ppl]"]) == "tasks@quiz_mc+austen_ppl"
    long = override_tag([f"optim.k{i}={'v' * 40}" for i in range(20)])
    assert len(long) <= TAG_CHARS + 4 and long.endswith("-+17") and "v" * 33 not in long


def test_a_long_sweep_summary_fits_a_screen_and_keeps_every_job_that_did_not_end_ok():
    from qaft.training.sweep_summary import JobLine, render

    lines = [JobLine(i, "ok", 40.0 + i, f"run-{i}") for i in range(40)]
    lines[33] = JobLine(33, "failed", None, "run-33", "RuntimeError: boom")
    text = render(lines, "runs", screen=10).splitlines()
    assert text[:2] == ["sweep: 40 jobs in runs", "   job  status       ppl (deployed)  folder"]
    jobs = [line.split()[0] for line in text[2:] if line.split()[0].isdigit()]
    assert jobs == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "33"]  # in job order, the failed one kept
    assert "        RuntimeError: boom" in text and text[-2:] == ["  ... and 30 more ok",
                                                              "sweep: 1 of 40 jobs did not end ok (exit status non-zero)"]
    assert render(lines[:2], "runs").splitlines()[-1] == "sweep: every job ended ok"


def test_the_seed_is_in_the_identity_only_where_it_can_change_the_run():
    """RTN PTQ neither trains nor reads calibration data: all its seeds are one run. Everything that trains, or
    calibrates on the seed-ordered training stream (GPTQ, SmoothQuant, a GPTQ baseline), keeps the seed."""
    def digests(*overrides: str) -> set[str]:
        return {config_digest(_compose([*overrides, f"seed={seed}"])) for seed in (0, 1)}

    assert len(digests("method=ptq")) == 1
    # GPTQ deploys a float merge, never PTQ's own integer one
    assert len(digests("method=ptq", "eval.gptq=true", "eval.baselines=false")) == 1
    for overrides in (["method=ptq", "eval.gptq=true", "eval.baselines=true"], ["method=ptq_gptq"],
                      ["method=ptq_smoothquant", "quant=w8a8kv8"], ["method=lora"], ["method=l4q"]):
        assert len(digests(*overrides)) == 2, overrides

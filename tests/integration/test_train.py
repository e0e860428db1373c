"""qaft-train end to end on the tiny model: every method, bad configs, resume, sweeps, the real model (slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import qaft
from qaft.methods import DEFAULT_TARGETS, available
from qaft.methods.targets import resolve_targets
from qaft.models import load_causal_lm

from helpers import run_qaft_train, signal_at_step, tiny_run_overrides


def run_main(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``qaft-train OVERRIDES`` in this process (saves the seconds a fresh interpreter spends importing)."""
    from qaft.training.cli import main

    monkeypatch.setattr(sys, "argv", ["qaft-train", *overrides])
    main()


def records(root: Path) -> list[dict]:
    """Every record under ``root``, with ``run_dir`` where its folder is (as qaft's readers set it); the record
    itself names only the folder, relative to the runs root."""
    found = [(p, json.loads(p.read_text())) for p in sorted(root.rglob("record.json"))]
    assert all(r["run_dir"] == p.parent.name and p.parent.parent == root for p, r in found)
    return [{**r, "run_dir": str(p.parent)} for p, r in found]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




@pytest.mark.parametrize("method", available())
def test_every_method_runs_end_to_end(method, tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root, steps=2), f"method={method}", "save_model=true"], monkeypatch)
    (record,) = records(root)
    assert record["status"] == "ok" and record["method"] == method
    assert (record["bits"], record["group_size"], record["model"], record["data"]) == (4, 64, "tiny-llama", "austen")
    run_dir = Path(record["run_dir"])
    assert run_dir.name.startswith(f"{method}-w4g64") and "-s0-tiny-llama-austen" in run_dir.name
    assert (run_dir / "config.yaml").is_file() and (run_dir / record["metrics"]["merged_model_path"]).is_dir()
    ppl = record["metrics"]
    if method != "ptq":
        assert ppl["global_step"] == 2 and [r["step"] for r in metric_rows(run_dir)] == [1, 2]
    if "ppl_merged_ptq" not in ppl:  # integer methods: the deployed model is the trained one
        assert ppl["ppl_merged"] == pytest.approx(ppl["ppl_trained"], rel=1e-3)
    # the table says what its perplexities were measured on (qaft-eval's windows are longer by default)
    scored = f"perplexity on austen test: 32-token windows (eval.seq_len), {ppl['eval_tokens']} tokens scored"
    assert scored in capsys.readouterr().out


BAD = {
    "unknown method (group option)": ["method=nope"],
    "no GPTQ calibration batches": ["method=qalora", "method.base_quant=gptq", "method.calib_batches=0"],
    "negative GPTQ dampening at deployment": ["eval.gptq=true", "eval.gptq_options.percdamp=-1"],
    "SmoothQuant alpha above 1": ["method=ptq_smoothquant", "method.smooth_alpha=1.5"],
    "unknown method (name)": ["method.name=nope"],
    "bits 5": ["method.bits=5"],
    "group size not dividing the widths": ["method.group_size=48"],
    "missing model path": ["model=hf", "model.name_or_path=/no/such/model"],
    "unknown schedule": ["optim.schedule=linear"],
    "missing data file": ["data=json", "data.source=/no/such/data.jsonl"],
    "second corpus missing on disk": ["eval.corpus={name: x, source: /no/such/corpus.txt, split: test, seq_len: 32, "
                                      "batch_size: 1}"],
    "second corpus without a name": ["eval.corpus={source: austen, split: test, seq_len: 32, batch_size: 1}"],
    "negative LoRA alpha": ["method.alpha=-16"],
    "negative learning rate": ["optim.lr.lora=-2e-4"],
    "NaN learning rate": ["optim.lr.quant=nan"],
    "training blocks longer than the model's positions": ["data.datamodule.seq_len=4096"],
    "evaluation windows longer than the model's positions": ["eval.seq_len=4096"],
    "empty data file": ["data=json", "data.source={files}/empty.jsonl"],
    "data file not JSON": ["data=json", "data.source={files}/text.jsonl"],
    "data file not UTF-8": ["data=json", "data.source={files}/latin1.jsonl"],
    "data records without an output": ["data=json", "data.source={files}/no_output.jsonl"],
    "every example longer than max_length": ["data=json", "data.source={files}/long.jsonl",
                                             "data.datamodule.max_length=16"],
    "hub model not reachable offline": ["model=hf", "model.name_or_path=org/not-in-any-cache"],
    "hub dataset not reachable offline": ["data=alpaca"],
    "DL-QAT phase 1 outlasting the run": ["method=dlqat", "method.quant_steps=1000", "trainer.max_steps=32"],
    "L4Q warm-up outlasting the run": ["method.warmup_steps=32", "trainer.max_steps=32"],
    "divergence limit below a uniform guess": ["divergence.loss_vs_uniform=0.5"],
    "negative progress interval": ["progress.every_n_steps=-1"],
    "no generated sequences": ["method=llm_qat", "data=generated", "data.datamodule.count=0"],
    "generated sequences longer than the model's positions": ["data=generated", "data.datamodule.seq_len=4096"],
    "greedy tokens leaving none to sample": ["data=generated", "data.datamodule.seq_len=32",
                                             "data.datamodule.greedy_tokens=[3,31]"],
}
BAD_FILES = {
    "empty.jsonl": b"",
    "text.jsonl": b"Once upon a time\n",
    "latin1.jsonl": '{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1"),
    "no_output.jsonl": b'{"instruction": "Say hi", "input": ""}\n',
    "long.jsonl": json.dumps({"instruction": "word " * 40, "input": "", "output": "yes"}).encode() + b"\n",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_fails_fast_with_one_message_and_no_record(name, tmp_path, monkeypatch, capsys):
    root, files = tmp_path / "runs", tmp_path / "files"
    files.mkdir()
    for file_name, content in BAD_FILES.items():
        (files / file_name).write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        run_main(["model=tiny-llama", f"runs_root={root}", *(o.replace("{files}", str(files)) for o in BAD[name])], monkeypatch)
    assert exit_info.value.code == 2 or name == "unknown method (group option)"
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "GPU available" not in out.out + out.err  # no Trainer, no model
    assert "qaft-train: invalid config" in out.err or "Could not find 'method/nope'" in out.err, out.err
    assert len([line for line in out.err.splitlines() if line.startswith("qaft-train:")]) <= 1
    assert not root.exists() or not any(root.iterdir()), list(root.rglob("*"))


GPU_ONLY = {  # what needs a CUDA GPU: refused on a machine without one, before a model loads or a folder is made
    "FSDP, even with a CPU accelerator": (["trainer=fsdp", "trainer.accelerator=cpu"], "trainer.strategy=FSDPStrategy"),
    "FSDP as the preset has it": (["trainer=fsdp"], "trainer.accelerator=gpu"),
    "DeepSpeed by name": (["trainer.strategy=deepspeed_stage_2"], "trainer.strategy=deepspeed_stage_2"),
    "fp16 mixed precision": (["trainer.precision=16-mixed"], "trainer.precision=16-mixed"),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="these settings are valid where there is a CUDA GPU")
@pytest.mark.parametrize("name", list(GPU_ONLY))
def test_gpu_only_settings_are_refused_without_a_gpu(name, tmp_path, monkeypatch, capsys):
    overrides, setting = GPU_ONLY[name]
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        run_main(["model=tiny-llama", f"runs_root={root}", *overrides], monkeypatch)
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and "GPU available" not in out.out + out.err  # no Trainer, no model
    assert out.err.strip() == f"qaft-train: invalid config: {setting} needs a CUDA GPU, and this machine has none " \
        "(on a CPU: trainer=default, or trainer=ddp trainer.accelerator=cpu trainer.devices=N)"
    assert not root.exists()


def test_bad_config_exit_status_from_the_console_script(tmp_path):
    root = tmp_path / "runs"
    proc = subprocess.run(["qaft-train", "model=tiny-llama", f"runs_root={root}", "method.bits=5"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    message = [line for line in proc.stderr.splitlines() if line.startswith("qaft-train:")]
    assert message == ["qaft-train: invalid config: bits must be one of (2, 3, 4, 8), got 5"], proc.stderr
    assert "Traceback" not in proc.stderr and not root.exists()


def test_a_sweep_names_each_run_by_its_swept_values_and_ends_with_a_summary(tmp_path):
    """One ``qaft-train -m`` process: folders say the swept value (``init@minmax``) and end with the config's digest;
    the sweep ends with a table of its jobs and exit 0 (every job ok); no empty cli.log, no pid in a released lock."""
    root = tmp_path / "runs"
    proc = run_qaft_train(["-m", *tiny_run_overrides(root, steps=2), "method.init=minmax,mse"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(root)
    names = sorted(Path(r["run_dir"]).name for r in found)
    assert [n.split("-init@")[1].split("-")[0] for n in names] == ["minmax", "mse"], names
    for name, record in zip(names, sorted(found, key=lambda r: Path(r["run_dir"]).name)):
        assert name.startswith("l4q-w4g64-r16-s0-tiny-llama-austen-init@") and len(name) < 200, name
        assert name.endswith(f"-{record['identity']}") and "=" not in name and "," not in name, name
        assert "-batch_size@2-" in name and "-+4-" in name  # the tiny run's other overrides, cut to a bounded length
        folder = root / name
        assert not (folder / "cli.log").exists() and (folder / ".qaft.lock").read_text() == ""
    summary = proc.stdout[proc.stdout.index("sweep: 2 jobs in"):].splitlines()
    assert [line.split()[:2] for line in summary[2:4]] == [["0", "ok"], ["1", "ok"]], summary
    for line, record in zip(summary[2:4], sorted(found, key=lambda r: "mse" in r["run_dir"])):
        ppl, folder = line.split()[2:]
        assert float(ppl) == pytest.approx(record["metrics"]["ppl_merged"], abs=5e-4)
        assert folder == Path(record["run_dir"]).name
    assert summary[4] == "sweep: every job ended ok"


@pytest.mark.slow
def test_real_smollm2_trains_a_few_steps(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run_main([f"runs_root={root}", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
              "data.datamodule.max_train_tokens=8192", "eval.max_tokens=1024", "save_model=false"], monkeypatch)
    (record,) = records(root)
    m = record["metrics"]
    assert record["status"] == "ok" and m["global_step"] == 3
    assert m["ppl_float"] < m["ppl_ptq"] and m["ppl_merged"] == pytest.approx(m["ppl_trained"], rel=1e-3)


def test_end_of_run_lm_eval_on_the_merged_model(tmp_path, monkeypatch):
    """eval.tasks runs lm-eval on the deployed model at the end of a run and records the harness settings."""
    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root, steps=2), "method=l4q",
              "eval.tasks=[quiz_mc]", "eval.lm_eval.limit=4", "eval.lm_eval.batch_size=4"], monkeypatch)
    (record,) = records(root)
    result = record["metrics"]["lm_eval"]
    assert result["harness"]["model_form"] == "merged" and result["harness"]["limit"] == 4
    assert record["metrics"]["deployed"] == {"form": "merged"}
    (entry,) = result["results"].values()
    assert 0.0 <= entry["scores"]["acc"] <= 1.0


def test_float_method_is_scored_as_deployed_and_costs_are_recorded(tmp_path, monkeypatch):
    """A float-merged method's lm-eval and second-corpus perplexity use its deployed (RTN PTQ) model; the
    record carries what training cost."""
    from qaft.data import lm_eval_windows, load_lm_texts
    from qaft.evaluation.perplexity import perplexity
    from qaft.models import load_tokenizer

    root = tmp_path / "runs"
    corpus = "{name: austen_val, source: austen, split: validation, seq_len: 32, max_tokens: 128, batch_size: 2}"
    run_main([*tiny_run_overrides(root, steps=3), "method=lora", "save_model=true", f"eval.corpus={corpus}",
              "eval.tasks=[quiz_mc]", "eval.lm_eval.limit=4", "eval.lm_eval.batch_size=4"], monkeypatch)
    (record,) = records(root)
    m = record["metrics"]
    assert m["lm_eval"]["harness"]["model_form"] == "merged+ptq"
    assert m["deployed"] == {"form": "merged+ptq", "ptq": {"algorithm": "rtn", "init": "minmax", "zero_point": "float",
                                                      "bits": 4, "group_size": 64}}
    merged = AutoModelForCausalLM.from_pretrained(Path(record["run_dir"]) / m["merged_model_path"])
    deployed = qaft.ptq_model(merged, 4, 64)
    windows = lm_eval_windows(load_tokenizer("tiny-llama"), load_lm_texts("austen")["validation"], 32, 128)
    assert m["ppl_austen_val"] == pytest.approx(perplexity(deployed, windows, 2), rel=1e-5)
    cost = m["cost"]
    assert cost["step_s"] > 0 and cost["tokens_per_s"] > 0 and cost["peak_memory_mb"] > 0
    assert cost["trainable_params"] == qaft.count_parameters(qaft.apply_method(
        load_causal_lm("tiny-llama")[0], qaft.config_for("lora")))
    assert [row["step"] for row in metric_rows(Path(record["run_dir"]))] == [1, 2, 3]


# --- GPTQ inside qaft-train: ptq and the QA-LoRA base calibrated on training batches, and "+GPTQ" deployment ---

def _tiny_data():
    """The run data of ``tiny_run_overrides`` (same source, block length, batch size, token cap and seed)."""
    from qaft.data import LMDataModule
    from qaft.data.stream import RunData
    from qaft.models import load_tokenizer

    inner = LMDataModule(load_tokenizer("tiny-llama"), "austen", seq_len=32, batch_size=2, max_train_tokens=2048,
                         max_eval_tokens=256, seed=0)
    return RunData(inner, seed=0)


def test_calibration_batches_are_the_first_training_batches():
    from types import SimpleNamespace

    data = _tiny_data()
    data.trainer = SimpleNamespace(max_steps=4, accumulate_grad_batches=1, world_size=1, global_step=0, global_rank=0)
    first = list(data.train_dataloader())[:3]
    calib = data.calibration_batches(3)
    assert len(calib) == 3
    for a, b in zip(calib, first):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a resumed or sharded run still calibrates on the stream's start
    data.trainer = SimpleNamespace(max_steps=4, accumulate_grad_batches=1, world_size=2, global_step=2, global_rank=1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(calib, data.calibration_batches(3)))


def test_ptq_gptq_run_records_and_saves_the_gptq_model(tmp_path, monkeypatch):
    from qaft.evaluation.runs import load_run_model

    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root), "method=ptq", "method.algorithm=gptq", "method.calib_batches=3",
              "method.act_order=true", "save_model=true"], monkeypatch)
    (record,) = records(root)
    m = record["metrics"]
    assert record["status"] == "ok" and record["method_config"]["algorithm"] == "gptq"
    assert m["ppl_merged"] == m["ppl_trained"] and "global_step" not in m  # nothing trains
    saved, _, _ = load_run_model(record["run_dir"])
    _assert_gptq_codes(saved, calib_batches=3,
                       names=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"))


def test_ptq_smoothquant_w8a8kv8_run_calibrates_on_the_first_training_batches(tmp_path, monkeypatch):
    from qaft.evaluation.runs import load_run_model
    from qaft.methods.act_kv import act_kv_layout, install_act_kv
    from qaft.methods.smoothquant import smoothquant_quantize_model

    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root), "method=ptq_smoothquant", "quant=w8a8kv8", "method.calib_batches=3",
              "method.smooth_alpha=0.6", "save_model=true"], monkeypatch)
    (record,) = records(root)
    assert record["status"] == "ok" and record["method_config"]["algorithm"] == "smoothquant"
    assert record["metrics"]["ppl_merged"] == record["metrics"]["ppl_trained"]
    saved, _, _ = load_run_model(record["run_dir"])
    assert act_kv_layout(saved)["act_bits"] == act_kv_layout(saved)["kv_bits"] == 8
    expected = load_causal_lm("tiny-llama")[0]
    install_act_kv(expected, list(resolve_targets(expected, DEFAULT_TARGETS).quantized), 8, 8)
    smoothquant_quantize_model(expected, _tiny_data().calibration_batches(3), 8, -1, 0.6, inplace=True)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = saved.get_submodule(name), expected.get_submodule(name)
        assert torch.equal(a.codes(), b.codes()) and torch.equal(a.scale, b.scale), name
    smoothed = "model.layers.0.input_layernorm"
    torch.testing.assert_close(saved.get_submodule(smoothed).weight, expected.get_submodule(smoothed).weight)


def _assert_gptq_codes(model: torch.nn.Module, calib_batches: int, names: tuple[str, ...]) -> torch.nn.Module:
    """``model``'s layers hold the codes and scales of GPTQ (w4 g64, act-order) of the tiny model on the first
    training batches; returns that GPTQ model."""
    from qaft.methods.gptq_model import gptq_quantize_model
    from qaft.models import load_causal_lm

    expected = gptq_quantize_model(load_causal_lm("tiny-llama")[0], _tiny_data().calibration_batches(calib_batches),
                                   4, 64, act_order=True)
    for name in names:
        a, b = model.get_submodule(name), expected.get_submodule(name)
        assert torch.equal(a.codes(), b.codes()) and torch.equal(a.scale, b.scale), name
    return expected


def test_qalora_on_a_gptq_base_trains_and_merges_exactly(tmp_path, monkeypatch):
    from qaft.evaluation.runs import load_run_model

    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root, steps=2), "method=qalora", "method.base_quant=gptq", "method.rank=4",
              "method.calib_batches=2", "method.act_order=true", "save_model=true"], monkeypatch)
    (record,) = records(root)
    m = record["metrics"]
    assert record["status"] == "ok" and m["global_step"] == 2
    assert record["method_config"]["base_quant"] == "gptq" and "ppl_merged_ptq" not in m
    assert m["ppl_merged"] == pytest.approx(m["ppl_trained"], rel=1e-5)  # integer merge into the offsets
    # the merge keeps the base's codes and scales: they are GPTQ's, with the run's options and training batches
    merged, _, _ = load_run_model(record["run_dir"])
    base = _assert_gptq_codes(merged, calib_batches=2, names=("model.layers.0.self_attn.k_proj",
                                                              "model.layers.1.mlp.up_proj"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        assert not torch.equal(merged.get_submodule(name).offset, base.get_submodule(name).offset), name


def _linear_inputs(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for n, ts in seen.items()}


def test_eval_gptq_deploys_a_float_merge_by_gptq(tmp_path, monkeypatch):
    import qaft
    from qaft.data import lm_eval_windows, load_lm_texts
    from qaft.evaluation.perplexity import perplexity
    from qaft.evaluation.runs import load_run_model
    from qaft.methods.gptq_model import gptq_quantize_model
    from qaft.quant.gptq import layer_output_error

    root = tmp_path / "runs"
    run_main([*tiny_run_overrides(root, steps=2), "method=lora", "eval.gptq=true", "eval.baselines=true",
              "eval.gptq_options.calib_batches=3", "save_model=true"], monkeypatch)
    (record,) = records(root)
    m = record["metrics"]
    assert {"ppl_merged_ptq", "ppl_merged_gptq", "ppl_ptq", "ppl_ptq_gptq"} <= set(m)
    merged, tokenizer, _ = load_run_model(record["run_dir"])
    calib = _tiny_data().calibration_batches(3)
    gptq, rtn = gptq_quantize_model(merged, calib, 4, 64), qaft.ptq_model(merged, 4, 64)
    windows = lm_eval_windows(tokenizer, load_lm_texts("austen")["test"], 32, 256)
    assert m["ppl_merged_gptq"] == pytest.approx(perplexity(gptq, windows, 4), rel=1e-6)
    # GPTQ's objective, on the calibration data: every first-block layer (float inputs) and the sum beat RTN
    gptq_total = rtn_total = 0.0
    for name, x in _linear_inputs(merged, calib).items():
        w = merged.get_submodule(name).weight
        g = layer_output_error(x, w, gptq.get_submodule(name).dequantize_weight())
        r = layer_output_error(x, w, rtn.get_submodule(name).dequantize_weight())
        assert name.startswith("model.layers.1.") or g < r, name
        gptq_total, rtn_total = gptq_total + g, rtn_total + r
    assert gptq_total < rtn_total


def _clean_and_killed_at_step_3(tmp_path: Path, steps: list[str], monkeypatch) -> tuple[Path, Path, Path, dict]:
    """An uninterrupted run of ``steps`` and one SIGKILLed at step 3 (no record), with its last checkpoint (saved at
    step 2, naming the digest of the base it rebuilds) read back."""
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    run_main([*tiny_run_overrides(clean), *steps], monkeypatch)
    killed = signal_at_step([*tiny_run_overrides(resumed), *steps], 3, signal.SIGKILL, tmp_path / "paused")
    assert killed.returncode == -signal.SIGKILL and not records(resumed)
    (ckpt,) = resumed.rglob("last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 2 and saved["qaft"]["base_digest"]
    return clean, resumed, ckpt, saved


def _resumed_as_clean(clean: Path, resumed: Path, steps: list[str], monkeypatch) -> tuple[dict, dict, list, list]:
    """The killed run resumed to its end: its final metrics equal the clean run's; both records and metric rows."""
    run_main([*tiny_run_overrides(resumed), *steps], monkeypatch)
    (a,), (b,) = records(clean), records(resumed)
    for key in ("final_train_loss", "ppl_trained", "ppl_merged", "global_step"):
        assert b["metrics"][key] == a["metrics"][key], key
    rows_a, rows_b = (metric_rows(Path(d["run_dir"])) for d in (a, b))
    return a, b, rows_a, rows_b


def test_resume_of_a_qalora_gptq_run_rebuilds_the_same_base(tmp_path, monkeypatch):
    steps = ["method=qalora", "method.base_quant=gptq", "method.rank=4", "method.calib_batches=2",
             "trainer.max_steps=4", "checkpoint.every_n_steps=2"]
    clean, resumed, ckpt, saved = _clean_and_killed_at_step_3(tmp_path, steps, monkeypatch)
    assert not any(k.endswith("codes") for k in saved["state_dict"])  # the base is rebuilt, not stored
    _, _, rows_a, rows_b = _resumed_as_clean(clean, resumed, steps, monkeypatch)
    assert [r["train/loss"] for r in rows_b] == [r["train/loss"] for r in rows_a]
    # a checkpoint of a base that GPTQ would build differently (here: other dampening) is refused, in one line
    other = run_qaft_train([*tiny_run_overrides(tmp_path / "other"), *steps, "method.percdamp=0.5",
                            f"resume='{ckpt}'"])
    lines = [line for line in other.stderr.splitlines() if line.startswith("qaft-train:")]
    assert other.returncode == 2 and len(lines) == 1 and "method.percdamp: 0.01 -> 0.5" in lines[0], other.stderr[-2000:]
    assert not records(tmp_path / "other")


def test_an_efficientqat_run_killed_during_e2e_qp_resumes_bit_identically(tmp_path, monkeypatch):
    """Block-AP runs again on resume (nothing in it is random; its codes' digest is checked), the scales and frozen
    zero points come from the checkpoint: the resumed run ends bit-identical to an uninterrupted one."""
    from safetensors.torch import load_file

    steps = ["method=efficientqat", "method.calib_batches=2", "trainer.max_steps=4", "checkpoint.every_n_steps=2",
             "save_model=true"]
    clean, resumed, _, saved = _clean_and_killed_at_step_3(tmp_path, steps, monkeypatch)
    assert {k.rsplit(".", 1)[-1] for k in saved["state_dict"]} == {"scale", "zero"}  # the codes are rebuilt
    a, b, rows_a, rows_b = _resumed_as_clean(clean, resumed, steps, monkeypatch)
    assert [r["train/loss"] for r in rows_b] == [r["train/loss"] for r in rows_a] and len(rows_b) == 4
    ta, tb = (load_file(Path(r["run_dir"]) / "merged_model" / "model.safetensors") for r in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --- LLM-QAT: distillation on data the float model generated, cached once, resumed exactly ---

def _llm_qat_args(root: Path, cache: Path) -> list[str]:
    return ["model=tiny-llama", f"runs_root={root}", "method=llm_qat", "data=generated", "quant=w4a8kv8",
            "trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "data.datamodule.seq_len=32", "data.datamodule.batch_size=2",
            f"data.datamodule.cache_dir={cache}", "data.datamodule.max_eval_tokens=256", "eval.seq_len=32",
            "eval.max_tokens=256", "eval.baselines=false", "save_model=true", "optim.warmup_steps=1",
            "checkpoint.every_n_steps=2"]


def test_llm_qat_on_generated_data_generates_once_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    cache, clean, resumed = tmp_path / "cache", tmp_path / "clean", tmp_path / "resumed"
    run_main(_llm_qat_args(clean, cache), monkeypatch)
    out = capsys.readouterr().out  # what the run reads, 4 steps x 2, is what it generates, and it says so
    assert "generating training data (8 x 32 tokens): started (8 sequences)" in out and "asks for more" not in out
    (a,) = records(clean)
    m = a["metrics"]
    assert a["status"] == "ok" and a["method"] == "llm_qat" and m["global_step"] == 4
    assert Path(a["run_dir"]).name.startswith("llm_qat-w4pc-a8kv8-s0-tiny-llama-generated-")
    assert m["ppl_merged"] == m["ppl_trained"] and "ppl_merged_ptq" not in m  # integer merge, bit for bit
    # a bit-exact method's trained model is scored on the first batch (4 of 8 windows) and not twice
    assert m["trained_vs_merged"] == {"windows": 4, "bit_equal": True}
    assert a["item_scores"]["metrics.ppl_trained"] == a["item_scores"]["metrics.ppl_merged"]
    (data_file,) = cache.glob("*.safetensors")
    stamp = data_file.stat().st_mtime_ns
    killed = signal_at_step(_llm_qat_args(resumed, cache), 3, signal.SIGKILL, tmp_path / "paused")
    assert killed.returncode == -signal.SIGKILL and not records(resumed)
    (ckpt,) = resumed.rglob("last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 2 and len(saved["state_dict"]) == 14  # the trained weights; no teacher copy
    assert all(k.endswith("_proj.weight") for k in saved["state_dict"])
    run_main(_llm_qat_args(resumed, cache), monkeypatch)
    (b,) = records(resumed)
    for key in ("final_train_loss", "ppl_trained", "ppl_merged", "global_step"):
        assert b["metrics"][key] == m[key], key
    rows_a, rows_b = (metric_rows(Path(r["run_dir"])) for r in (a, b))
    assert [r["train/loss"] for r in rows_b] == [r["train/loss"] for r in rows_a]
    ta, tb = (load_file(Path(r["run_dir"]) / "merged_model" / "model.safetensors") for r in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # three processes, one generation: the file was written once and read since
    assert list(cache.glob("*.safetensors")) == [data_file] and data_file.stat().st_mtime_ns == stamp

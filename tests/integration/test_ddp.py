"""trainer=ddp with two CPU processes (gloo): both ranks end with identical trainable tensors, on a non-LLaMA model
(the tiny GPT-2: Conv1D layers, fused c_attn) and on the tiny LLaMA with activation / KV quantizers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_qaft_train, tiny_run_overrides


@pytest.mark.parametrize("model, quant", [("tiny-gpt2", []), ("tiny-llama", ["quant=w4a8kv8"])],
                         ids=["gpt2-weight-only", "llama-w4a8kv8"])
def test_two_cpu_ranks_hold_identical_trainable_parameters(tmp_path, model, quant):
    root, dumps = tmp_path / "runs", tmp_path / "dumps"
    # L4Q with a LoRA warm-up: the phase change (s, b start training at step 2) must be synchronised too;
    # with quant=w4a8kv8 the per-token activation / KV quantizers run on both ranks (per channel weights).
    overrides = [f"model={model}" if o.startswith("model=") else o for o in tiny_run_overrides(root, steps=3)]
    proc = run_qaft_train([*overrides, *quant, "trainer=ddp", "trainer.accelerator=cpu",
                           "trainer.devices=2", "method.warmup_steps=2",
                           f"+callbacks.dump={{_target_: run_probes.DumpTrainable, run_dir: '{dumps}'}}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (record_path,) = root.rglob("record.json")  # rank 0 alone writes the record
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok" and record["metrics"]["global_step"] == 3
    act_kv = bool(quant)
    assert (record["method_config"]["act_bits"], record["method_config"]["kv_bits"]) == ((8, 8) if act_kv else (16, 16))
    layers = record["metrics"]["layers"]  # every block linear quantized, lm_head (tied) left float
    assert sorted(k.rsplit(".", 1)[-1] for k in layers["quantized"]) == (
        ["c_attn", "c_fc", "c_proj", "c_proj"] if not act_kv else
        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert layers["float"] == {"lm_head": 1} and layers["unquantizable"] == {}
    run_dir = record_path.parent
    rank0, rank1 = (load_file(dumps / f"trainable_rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.endswith("scale") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # they trained: B left zero, and the quantizer scales moved after the warm-up
    assert any(k.endswith("lora_B") and rank0[k].abs().sum() > 0 for k in rank0)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one row per step, from rank 0 only

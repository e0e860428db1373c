"""``trainer=ddp`` (NCCL) and ``trainer=fsdp`` on one GPU, through the real ``qaft-train`` process on the tiny
LLaMA: each run ends ``ok`` with its steps logged and its deployed model scored. Hydra composes the run's
config, so these two need hydra-core, omegaconf and antlr4-python3-runtime (three pure-Python wheels an
air-gapped machine can be given); without them they skip."""
import importlib.util
import json

import pytest

from qaft.run_folder import RECORD_FILE, Status

from helpers import run_qaft_train, tiny_run_overrides

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("hydra", "omegaconf")),
    reason="qaft-train composes its config with Hydra: bring the hydra-core, omegaconf and "
           "antlr4-python3-runtime wheels")]


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_one_gpu_run_trains_and_records(trainer, tmp_path):
    root = tmp_path / "runs"
    overrides = [o for o in tiny_run_overrides(root, steps=3) if not o.startswith("trainer.accelerator=")]
    proc = run_qaft_train([*overrides, f"trainer={trainer}", "trainer.accelerator=gpu", "trainer.devices=1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (record_path,) = root.rglob(RECORD_FILE)
    record = json.loads(record_path.read_text())
    assert record["status"] == Status.OK.value and record["metrics"]["global_step"] == 3
    assert record["metrics"]["ppl_merged"] > 0

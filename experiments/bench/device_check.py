r"""The GPU path in one run: the ``cuda`` tests, training cost at Llama-2-7B's shape, and int4 inference speed.

Written for one H100 (80 GB) and under 8 minutes, on an air-gapped machine: it imports only torch, Lightning,
transformers, peft, safetensors and pandas (with pytest for the tests; tests/integration/test_device_check.py
proves it imports nothing else); no download, the model is a random initialisation of the shape, which is what
time and memory depend on. Three stages, the JSON rewritten after each (a crash keeps what came before):

1. ``tests``: pytest on tests/cuda and the ``cuda`` variants of the backward checks (``-m cuda``), in this process;
   the outcome of every test. ``trainer=ddp`` / ``trainer=fsdp`` run ``qaft-train``, which composes its config with
   Hydra: without the hydra-core, omegaconf and antlr4-python3-runtime wheels those two skip.
2. ``training``: per method (LoRA, QLoRA, QA-LoRA, L4Q, DL-QAT, full QAT, LLM-QAT W4A8KV8 with its teacher), one
   AdamW step on batch 16 x 512 tokens, gradient checkpointing on, forward under bf16 autocast (the pipeline's
   ``bf16-mixed``), the base in bf16: seconds per step (median of ``--steps`` after one warm-up step) and peak
   memory (``torch.cuda.max_memory_allocated`` from the end of model building, weights included), each as a ratio
   to LoRA's. The rows are experiments/bench/training_cost.py's (its :class:`Trainee` runs them); a method that
   does not fit the GPU is recorded as ``oom`` with the memory it held when it failed. Rows that would overrun
   ``--budget-s`` are recorded as skipped.
3. ``inference``: bf16 vs its round-to-nearest int4 model (group 128, ``prepare_for_inference(..., "auto")``:
   tinygemm ``_weight_int4pack_mm`` on CUDA): decode tokens/s (batch 1, HF ``generate``, ``--new-tokens`` forced)
   and prefill tokens/s (batch 1 x ``--prefill`` tokens), median of 3, as experiments/bench/inference.py measures
   them on CPU.

    python experiments/bench/device_check.py --json results/device_check.json              # one GPU
    python experiments/bench/device_check.py --device cpu --shape tiny --json /tmp/dc.json  # CI: seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from inference import decoder, prefill, seconds  # noqa: E402
from memory import _peak_rss_bytes, _reset_peak_rss, _rss_bytes  # noqa: E402
from training_cost import Trainee  # noqa: E402

import qaft  # noqa: E402
from qaft.deploy import backend_counts, prepare_for_inference  # noqa: E402
from qaft.models.tiny import tiny_llama_config  # noqa: E402

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[2]
# The cuda tests: tests/cuda, and the backward checks parametrised over helpers.DEVICES
CUDA_TESTS = ("tests/cuda", "tests/unit/test_lowrank_backward.py", "tests/unit/test_quant.py",
              "tests/unit/test_zero_point.py")
# label -> training_cost.METHODS row
ROWS = {"LoRA": "lora", "QLoRA": "qlora", "QA-LoRA": "qalora", "L4Q": "l4q", "DL-QAT": "dlqat", "full QAT": "qat",
        "LLM-QAT": "llm_qat-a8kv8"}
LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# shape -> the model's config and the workload: training batch x seq, group size, prefill tokens, decoded tokens
SHAPES = {"llama2-7b": {"config": LLAMA2_7B, "batch": 16, "seq": 512, "group_size": 128, "prefill": 512,
                        "new_tokens": 32, "inference_reserve_s": 90},
          "tiny": {"config": tiny_llama_config(256).to_dict(), "batch": 2, "seq": 32, "group_size": 32,
                   "prefill": 64, "new_tokens": 8, "inference_reserve_s": 0}}


class Budget:
    """Seconds left of the whole run."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Outcomes:
    """A pytest plugin: each test's outcome (passed / failed / skipped / error) and a short reason."""

    def __init__(self) -> None:
        self.outcome: dict[str, str] = {}
        self.reason: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.skipped or report.failed:
            kind = report.outcome if report.when == "call" or report.skipped else "error"
            self.outcome[report.nodeid] = kind
            if kind != "passed":
                self.reason[report.nodeid] = report.longreprtext.strip().splitlines()[-1][:300] if \
                    report.longreprtext else ""


def run_tests() -> dict:
    """pytest ``-m cuda`` on :data:`CUDA_TESTS` in this process: counts, every outcome, why the others failed."""
    try:
        import pytest
    except ImportError:
        return {"status": "pytest is not installed: the cuda tests did not run"}
    plugin = Outcomes()
    # hydra-core registers a pytest plugin wherever it is installed; these tests do not use it
    code = pytest.main([*(str(ROOT / p) for p in CUDA_TESTS), "-m", "cuda", "-q", "-p", "no:cacheprovider",
                        "-p", "no:hydra_pytest", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")],
                       plugins=[plugin])
    counts = {k: sum(v == k for v in plugin.outcome.values()) for k in ("passed", "failed", "skipped", "error")}
    return {"status": "ran", "exit_code": int(code), "counts": counts, "outcomes": plugin.outcome,
            "reasons": plugin.reason}


def build_model(shape: dict, device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    """A random LLaMA of the shape, built directly on ``device`` in bf16 (never a float32 copy)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**shape["config"]))
    finally:
        torch.set_default_dtype(default)


class Peak:
    """Peak memory from :meth:`reset` on: CUDA's allocator peak, or on CPU the process's peak RSS above its RSS
    before the model was built (in one process with other models before it: indicative only)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0 if self.cuda else _rss_bytes()

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats() if self.cuda else _reset_peak_rss()

    def bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated()) if self.cuda else _peak_rss_bytes() - self.base


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_row(row: str, shape: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """One method's step time and peak memory (``oom`` where it does not fit)."""
    peak = Peak(device)
    settings = argparse.Namespace(rank=args.rank, bits=args.bits, group_size=shape["group_size"],
                                  batch=shape["batch"], seq=shape["seq"])
    try:
        trainee = Trainee(build_model(shape, device), row, settings, device, torch.bfloat16, checkpointing=True)
        peak.reset()  # building and quantizing the model is not part of a step
        times = [trainee.step() for _ in range(1 + args.steps)][1:]
        return {"status": "ok", "step_s": statistics.median(times), "step_s_all": [round(t, 4) for t in times],
                "peak_bytes": peak.bytes(), "trainable": trainee.trainable}
    except torch.cuda.OutOfMemoryError as err:
        return {"status": "oom", "peak_bytes_at_oom": peak.bytes(), "error": str(err).splitlines()[0][:300]}


def run_training(shape: dict, args: argparse.Namespace, device: torch.device, budget: Budget) -> dict:
    rows: dict[str, dict] = {}
    last = 0.0
    for label in args.methods:
        if budget.left() < shape["inference_reserve_s"] + last:
            rows[label] = {"status": "skipped", "error": f"time budget (--budget-s {args.budget_s})"}
            continue
        start = time.monotonic()
        rows[label] = {"method": ROWS[label], **train_row(ROWS[label], shape, args, device)}
        free(device)
        last = time.monotonic() - start
        rows[label]["wall_s"] = round(last, 1)
        print(f"training {label}: {json.dumps(rows[label])}", flush=True)
    lora = rows.get("LoRA", {})
    ratios = {label: {"step_time": round(r["step_s"] / lora["step_s"], 3),
                      "peak_memory": round(r["peak_bytes"] / lora["peak_bytes"], 3)}
              for label, r in rows.items() if r["status"] == "ok" and lora.get("status") == "ok"}
    return {"memory": "cuda max_memory_allocated" if device.type == "cuda" else
            "cpu peak RSS above start, in one process (indicative only)",
            "rows": rows, "ratios_to_lora": ratios}


def _timed(fn: Callable[[], object], device: torch.device, rounds: int = 3) -> float:
    """Median seconds of ``fn()`` over ``rounds`` calls after one warm-up (CUDA: synchronised)."""
    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    call()
    return statistics.median(seconds(call) for _ in range(rounds))


def run_inference(shape: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """bf16 vs int4 (RTN, ``prepare_for_inference`` auto) decode and prefill tokens/s."""
    base = build_model(shape, device).eval()
    base.generation_config.eos_token_id = None  # a fixed number of tokens in every call
    int4 = qaft.ptq_model(base, 4, shape["group_size"])  # a quantized copy; base itself stays float
    models = {"bf16": prepare_for_inference(base, torch.bfloat16),
              "int4": prepare_for_inference(int4, torch.bfloat16, "auto")}
    gen = torch.Generator().manual_seed(0)
    vocab = shape["config"]["vocab_size"]
    prompt = torch.randint(0, vocab, (1, 8), generator=gen).to(device)
    long = torch.randint(0, vocab, (1, shape["prefill"]), generator=gen).to(device)
    n = shape["new_tokens"]
    decode = {k: n / _timed(lambda m=m: decoder(m, "hf")(prompt, n), device) for k, m in models.items()}
    fill = {k: shape["prefill"] / _timed(lambda m=m: prefill(m, long), device) for k, m in models.items()}
    return {"decode_tok_s": decode, "prefill_tok_s": fill,
            "int4/bf16 decode": round(decode["int4"] / decode["bf16"], 3),
            "int4/bf16 prefill": round(fill["int4"] / fill["bf16"], 3),
            "int4_backends": backend_counts(models["int4"]),
            "setup": f"batch 1; decode {n} tokens after 8 (HF generate); prefill {shape['prefill']} tokens; "
                     f"int4 group {shape['group_size']}; median of 3 after a warm-up"}


def machine(device: torch.device) -> dict:
    import pytorch_lightning
    import transformers
    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "lightning": pytorch_lightning.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                "cuda": torch.version.cuda, "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    p.add_argument("--methods", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--steps", type=int, default=2, help="timed training steps per method, after one warm-up")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=450, help="training rows that would overrun this are skipped")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--json", default="results/device_check.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: --device cuda, but torch.cuda.is_available() is false (use --device cpu --shape tiny "
              "for the CPU run)", file=sys.stderr)
        sys.exit(2)
    if "LoRA" not in args.methods:
        args.methods = ["LoRA", *args.methods]  # every ratio is to LoRA
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget, start = Budget(args.budget_s), time.monotonic()
    device, shape = torch.device(args.device), SHAPES[args.shape]
    if args.shape == "tiny":
        # Ops this small: CPU threads cost more in synchronisation than they save (40x on a shared 2-core machine).
        torch.set_num_threads(1)
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"setup": {k: v for k, v in vars(args).items() if k != "json"} | {
        "batch": shape["batch"], "seq": shape["seq"], "group_size": shape["group_size"],
        "model": {k: shape["config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "vocab_size")}},
        "machine": machine(device)}

    def save(stage: str, value: dict) -> None:
        result[stage] = value
        result["elapsed_s"] = round(time.monotonic() - start, 1)
        result.setdefault("stage_end_s", {})[stage] = result["elapsed_s"]
        out_path.write_text(json.dumps(result, indent=2))

    save("tests", {"status": "skipped (--skip-tests)"} if args.skip_tests else run_tests())
    free(device)
    save("training", run_training(shape, args, device, budget))
    save("inference", run_inference(shape, args, device))
    print(json.dumps({k: result[k] for k in ("elapsed_s",)} | {"training": result["training"]["ratios_to_lora"],
                      "inference": {k: v for k, v in result["inference"].items() if "/" in k}}, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
